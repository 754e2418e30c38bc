"""Readers: every data source becomes one canonical `EventLog`.

Sources and their quirks (details in docs/DATA.md):

- Tmall 2014 brand sample: the brand is the item, there is no category (every event gets
  category 0), dates are "M-D" in 2014 with no time of day (the day's 00:00 UTC is used), and
  more than half the rows are exact duplicates (dropped).
- Taobao UserBehavior: no header, `pv` is a click, and a few timestamps fall outside the
  official window, which is dropped (`TAOBAO_WINDOW`).
- The generic format (`read_events`): CSV or Parquet with user_id, item_id, category_id, action,
  timestamp; an action map translates the file's action values; non-integer ids are hashed.

No torch here: the feature store's ingestion reuses these readers in the serving install.
"""

from __future__ import annotations

import argparse
import calendar
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from feature_store.errors import UserError
from feature_store.schema import ACTION_CODE, ACTIONS
from models.data.events import EventLog
from models.data.synth import load_synthetic

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "RANKSERVE_DATA_ROOT"
TMALL_YEAR = 2014
# Taobao UserBehavior's official window, 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 in China time
# (UTC+8), as unix seconds: [2017-11-24 16:00:00 UTC, 2017-12-03 15:59:59 UTC], both inclusive.
TAOBAO_WINDOW: tuple[int, int] = (1_511_539_200, 1_512_316_799)

TMALL_COLUMNS = ("user_id", "brand_id", "type", "visit_datetime")
# Tmall `type` -> canonical action code: 0 click, 1 buy, 2 favourite, 3 add-to-cart.
TMALL_TYPES: dict[int, int] = {
    0: ACTION_CODE["click"],
    1: ACTION_CODE["buy"],
    2: ACTION_CODE["fav"],
    3: ACTION_CODE["cart"],
}
TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_ACTIONS: dict[str, str] = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "buy"}
EVENT_COLUMNS = ("user_id", "item_id", "category_id", "action", "timestamp")

# Named datasets under the data root.
DATASET_FILES: dict[str, str] = {
    "tmall": "tmall_2014/t_alibaba_data.csv",
    "taobao": "taobao_userbehavior/UserBehavior_head.csv",
    "taobao-slice": "taobao_userbehavior/UserBehavior_slice.csv",
}

IntArray = npt.NDArray[np.int64]


class DataError(UserError, ValueError):
    """An input file or dataset spec that cannot be read; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# Data root


def repo_root() -> Path:
    """The repository root (this file is models/data/readers.py)."""
    return Path(__file__).resolve().parents[2]


def default_data_root() -> Path:
    """`$RANKSERVE_DATA_ROOT` if set, else `../shared/data` next to the repository."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    return (repo_root() / ".." / "shared" / "data").resolve()


def resolve_data_root(data_root: str | Path | None) -> Path:
    """An explicit root wins over the environment, which wins over the default."""
    return Path(data_root) if data_root is not None else default_data_root()


# ---------------------------------------------------------------------------------------------
# Shared helpers


def stable_id_hash(values: Iterable[str]) -> IntArray:
    """Stable non-negative int64 ids for string ids: blake2b (8-byte digest), top bit cleared.

    Stable across processes and machines (unlike Python's `hash`), so ingestion and training
    agree. A collision needs ~2^31 distinct ids to become likely.
    """
    out = [
        int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF
        for v in values
    ]
    return np.asarray(out, dtype=np.int64)


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(f"data file not found: {path}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty: expected a CSV with events") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse CSV: {exc}") from exc


def _require_columns(df: pd.DataFrame, required: Iterable[str], path: Path) -> None:
    found = [str(c) for c in df.columns]
    missing = [c for c in required if c not in found]
    if missing:
        raise DataError(f"{path} is missing column(s) {missing}; found {found}; expected {list(required)}")


def _require_rows(df: pd.DataFrame, path: Path) -> None:
    if len(df) == 0:
        raise DataError(f"{path} has no events (only a header or an empty table)")


def _first_row(mask: npt.NDArray[np.bool_]) -> int:
    """1-based data row (header excluded) of the first true entry."""
    return int(np.flatnonzero(mask)[0]) + 1


def _check_no_nulls(col: pd.Series, name: str, path: Path) -> None:
    nulls = col.isna().to_numpy()
    if nulls.any():
        raise DataError(
            f"{path}: column {name!r} has {int(nulls.sum())} empty value(s), first in data row {_first_row(nulls)}"
        )


def _integers_or_none(col: pd.Series) -> IntArray | None:
    """The column as int64 if every value is an integer (numeric or integer text), else None."""
    if pd.api.types.is_bool_dtype(col):
        return None
    if pd.api.types.is_integer_dtype(col):
        return np.asarray(col.to_numpy(dtype=np.int64), dtype=np.int64)
    num = col if pd.api.types.is_float_dtype(col) else pd.to_numeric(col.astype(str).str.strip(), errors="coerce")
    values = num.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(values).any() or not np.all(values == np.floor(values)) or np.abs(values).max() >= 2.0**63:
        return None
    if pd.api.types.is_float_dtype(col):
        return np.asarray(values, dtype=np.int64)
    # Re-parse exactly: float64 loses precision above 2^53, and ids can be that large.
    try:
        return np.asarray([int(v) for v in col.astype(str).str.strip()], dtype=np.int64)
    except ValueError:  # integral but not integer text, such as "1e3": treat as a string id
        return None


def _id_column(col: pd.Series, name: str, path: Path) -> IntArray:
    """Integer ids as they are; any other id column is hashed value by value (`stable_id_hash`)."""
    _check_no_nulls(col, name, path)
    ints = _integers_or_none(col)
    if ints is not None:
        return ints
    codes, uniques = pd.factorize(col.astype(str).str.strip())
    log.info("column %r of %s has non-integer ids: hashing %d distinct values to int64", name, path, len(uniques))
    return np.asarray(stable_id_hash(str(u) for u in uniques)[codes], dtype=np.int64)


def _check_action_map(action_map: Mapping[str, str]) -> None:
    bad_targets = sorted({v for v in action_map.values() if v not in ACTION_CODE})
    if bad_targets:
        raise DataError(f"action map targets {bad_targets} are not canonical actions; use {list(ACTIONS)}")


def _map_actions(col: pd.Series, action_map: Mapping[str, str], path: Path, column: str) -> npt.NDArray[np.uint8]:
    """File action values -> canonical codes through `action_map` (file value -> canonical name)."""
    _check_action_map(action_map)
    _check_no_nulls(col, column, path)
    text = col.astype(str).str.strip()
    codes, uniques = pd.factorize(text)
    table = np.full(len(uniques), 255, dtype=np.uint8)
    unknown: list[str] = []
    for k, value in enumerate(uniques):
        target = action_map.get(str(value))
        if target is None:
            unknown.append(str(value))
        else:
            table[k] = ACTION_CODE[target]
    if unknown:
        first = _first_row(np.isin(text.to_numpy(dtype=object), np.asarray(unknown, dtype=object)))
        raise DataError(
            f"{path}: unknown {column} value(s) {sorted(unknown)[:5]}"
            f"{' and more' if len(unknown) > 5 else ''} (first in data row {first}); "
            f"allowed: {sorted(action_map)}; map them with --action-map canonical=value,... "
            f"(canonical actions: {list(ACTIONS)})"
        )
    return np.asarray(table[codes], dtype=np.uint8)


def _timestamps(col: pd.Series, path: Path) -> IntArray:
    """Unix seconds (integers, integral floats or integer text) or ISO-8601 text -> int64 seconds.

    ISO-8601 text without an offset is taken as UTC; fractional seconds are floored.
    """
    if pd.api.types.is_datetime64_any_dtype(col):
        _check_no_nulls(col, "timestamp", path)
        dt = pd.to_datetime(col, utc=True)
        secs = (dt - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)
        return np.asarray(secs.to_numpy(dtype=np.int64), dtype=np.int64)
    if pd.api.types.is_integer_dtype(col):
        return np.asarray(col.to_numpy(dtype=np.int64), dtype=np.int64)
    if pd.api.types.is_float_dtype(col):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            row = _first_row(bad)
            raise DataError(f"{path}: cannot parse timestamp in data row {row}: empty or not finite")
        return np.asarray(np.floor(values), dtype=np.int64)
    text = col.astype(str).str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    iso = pd.to_datetime(text.where(numeric.isna()), utc=True, format="ISO8601", errors="coerce")
    bad = (numeric.isna() & iso.isna()).to_numpy()
    if bad.any():
        row = _first_row(bad)
        raise DataError(
            f"{path}: cannot parse timestamp {text.iloc[row - 1]!r} in data row {row}: "
            "expected unix seconds or ISO-8601 (e.g. 2017-11-25T10:00:00+08:00)"
        )
    secs = (iso - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)
    out = np.where(numeric.notna(), np.floor(numeric.to_numpy(dtype=np.float64, na_value=0.0)), secs.fillna(0))
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Source readers


def read_tmall(path: str | Path) -> EventLog:
    """Tmall 2014 brand sample: brand -> item, category 0, "M-D" 2014 dates -> day start (UTC).

    Exact duplicates (same user, brand, type, day) are dropped: 182,880 rows -> 85,030 events.
    """
    p = Path(path)
    df = _read_csv(p, dtype={"visit_datetime": str})
    _require_columns(df, TMALL_COLUMNS, p)
    _require_rows(df, p)
    user = _id_column(df["user_id"], "user_id", p)
    item = _id_column(df["brand_id"], "brand_id", p)
    types = _integers_or_none(df["type"])
    if types is None or not np.isin(types, list(TMALL_TYPES)).all():
        raw = df["type"].astype(str).to_numpy(dtype=object)
        bad = ~np.isin(raw, np.asarray([str(t) for t in TMALL_TYPES], dtype=object))
        raise DataError(f"{p}: unknown Tmall type {raw[bad][0]!r} in data row {_first_row(bad)}; allowed: 0, 1, 2, 3")
    lut = np.zeros(max(TMALL_TYPES) + 1, dtype=np.uint8)
    for t, code in TMALL_TYPES.items():
        lut[t] = code
    action = lut[types]

    # Few distinct dates (one per day): parse each once.
    _check_no_nulls(df["visit_datetime"], "visit_datetime", p)
    codes, uniques = pd.factorize(df["visit_datetime"].str.strip())
    day_ts = np.empty(len(uniques), dtype=np.int64)
    for k, text in enumerate(uniques):
        try:
            month, day = (int(x) for x in str(text).split("-"))
            day_ts[k] = calendar.timegm((TMALL_YEAR, month, day, 0, 0, 0))
            if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(TMALL_YEAR, month)[1]):
                raise ValueError(text)
        except ValueError as exc:
            row = _first_row(codes == k)
            raise DataError(
                f"{p}: cannot parse visit_datetime {text!r} in data row {row}: expected M-D in 2014"
            ) from exc
    timestamp = day_ts[codes]
    events = EventLog.from_unsorted(user, item, np.zeros(len(user), dtype=np.int64), action, timestamp, dedup=True)
    log.info("read %s: %d rows, %d events after dedup", p, len(df), len(events))
    return events


def read_taobao(path: str | Path) -> EventLog:
    """Taobao UserBehavior (no header): pv -> click; rows outside `TAOBAO_WINDOW` are dropped."""
    p = Path(path)
    df = _read_csv(p, header=None, names=list(TAOBAO_COLUMNS), dtype={"behavior_type": str})
    _require_rows(df, p)
    user = _id_column(df["user_id"], "user_id", p)
    item = _id_column(df["item_id"], "item_id", p)
    category = _id_column(df["category_id"], "category_id", p)
    action = _map_actions(df["behavior_type"], TAOBAO_ACTIONS, p, "behavior_type")
    timestamp = _timestamps(df["timestamp"], p)
    inside = (timestamp >= TAOBAO_WINDOW[0]) & (timestamp <= TAOBAO_WINDOW[1])
    events = EventLog.from_unsorted(
        user[inside], item[inside], category[inside], action[inside], timestamp[inside], dedup=True
    )
    log.info(
        "read %s: %d rows, %d outside the official window dropped, %d events after dedup",
        p,
        len(df),
        int((~inside).sum()),
        len(events),
    )
    return events


def read_events(path: str | Path, action_map: Mapping[str, str] | None = None) -> EventLog:
    """The generic format: CSV or Parquet with user_id, item_id, category_id, action, timestamp.

    `action_map` maps the file's action values (as text) to canonical names; the default accepts
    the canonical names themselves. Timestamps: unix seconds or ISO-8601. Non-integer ids are
    hashed with `stable_id_hash` (a column is hashed as a whole when any value is not an integer).
    """
    p = Path(path)
    amap = dict(action_map) if action_map is not None else {a: a for a in ACTIONS}
    _check_action_map(amap)
    name = p.name.lower()
    if name.endswith((".parquet", ".pq")):
        try:
            df = pd.read_parquet(p)
        except FileNotFoundError as exc:
            raise DataError(f"data file not found: {p}") from exc
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{p}: cannot read Parquet: {exc}") from exc
    elif name.endswith((".csv", ".csv.gz")):
        df = _read_csv(p, dtype={"action": str}, skipinitialspace=True)
    else:
        raise DataError(f"{p}: unknown events file type; use .csv, .csv.gz or .parquet")
    _require_columns(df, EVENT_COLUMNS, p)
    _require_rows(df, p)
    events = EventLog.from_unsorted(
        _id_column(df["user_id"], "user_id", p),
        _id_column(df["item_id"], "item_id", p),
        _id_column(df["category_id"], "category_id", p),
        _map_actions(df["action"], amap, p, "action"),
        _timestamps(df["timestamp"], p),
        dedup=True,
    )
    log.info("read %s: %d rows, %d events after dedup", p, len(df), len(events))
    return events


# ---------------------------------------------------------------------------------------------
# Dataset specs and the shared CLI arguments


def _resolve_path(text: str, root: Path) -> Path:
    """A path as given (relative to the working directory), else relative to the data root."""
    p = Path(text).expanduser()
    if not p.exists() and not p.is_absolute() and (root / p).exists():
        return root / p
    return p


def load_dataset(
    spec: str,
    data_root: Path | None = None,
    action_map: dict[str, str] | None = None,
    max_users: int | None = None,
) -> EventLog:
    """Load `tmall`, `taobao`, `taobao-slice`, `synthetic:DIR` or `events:PATH`.

    `action_map` (file value -> canonical name) applies to `events:PATH` only. `max_users` keeps
    a deterministic subset of users of a synthetic set without reading the others.
    """
    root = resolve_data_root(data_root)
    kind, _, arg = spec.partition(":")
    if action_map is not None and kind != "events":
        raise DataError(f"an action map applies only to events:PATH datasets, not {spec!r}")
    if kind in DATASET_FILES and not arg:
        path = root / DATASET_FILES[kind]
        if not path.exists():
            raise DataError(
                f"dataset {kind!r} not found at {path}; set --data-root or ${DATA_ROOT_ENV} "
                "to the directory holding tmall_2014/ and taobao_userbehavior/"
            )
        return read_tmall(path) if kind == "tmall" else read_taobao(path)
    if kind == "synthetic" and arg:
        return load_synthetic(_resolve_path(arg, root), max_users=max_users)
    if kind == "events" and arg:
        return read_events(_resolve_path(arg, root), action_map)
    raise DataError(f"unknown dataset {spec!r}; use tmall, taobao, taobao-slice, synthetic:DIR or events:PATH")


def parse_action_map(text: str) -> dict[str, str]:
    """`click=pv,cart=cart,...` (canonical=file value) -> {file value: canonical name}."""
    out: dict[str, str] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        canonical, sep, value = part.partition("=")
        canonical, value = canonical.strip(), value.strip()
        if not sep or not value or canonical not in ACTION_CODE:
            raise DataError(
                f"bad action map entry {part!r}: expected canonical=value with canonical in {list(ACTIONS)}"
            )
        if value in out and out[value] != canonical:
            raise DataError(f"action map sends file value {value!r} to both {out[value]!r} and {canonical!r}")
        out[value] = canonical
    if not out:
        raise DataError("empty action map")
    return out


def _action_map_arg(text: str) -> dict[str, str]:
    try:
        return parse_action_map(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_dataset_arguments(parser: argparse.ArgumentParser, default: str = "tmall") -> None:
    """`--data`, `--data-root`, `--action-map`: shared by the train, evaluate and ingest commands."""
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "--data",
        default=default,
        metavar="SPEC",
        help=f"tmall | taobao | taobao-slice | synthetic:DIR | events:PATH (default {default})",
    )
    group.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"directory of the public data sets (default ${DATA_ROOT_ENV}, else ../shared/data next to the repo)",
    )
    group.add_argument(
        "--action-map",
        type=_action_map_arg,
        default=None,
        metavar="MAP",
        help="for events:PATH, canonical=file value pairs, e.g. click=pv,cart=cart,fav=fav,buy=buy",
    )


def dataset_of_run(config: Mapping[str, Any], data_root: Path | None = None) -> EventLog:
    """The EventLog a run was trained on, as its config recorded it (data set, action map, user subset)."""
    return load_dataset(config["data"], data_root, config.get("action_map"), max_users=config["train"]["max_users"])


def dataset_from_args(args: argparse.Namespace, max_users: int | None = None) -> EventLog:
    """The EventLog named by the arguments `add_dataset_arguments` added."""
    return load_dataset(args.data, args.data_root, args.action_map, max_users=max_users)
