"""Readers: a feature spec's files become one `Dataset` (events, impressions, user and item tables).

`load_spec_dataset(spec, base)` reads what a `FeatureSpec` names. Its events file is read by
`events.format`: `auto` (by suffix), `csv` and `parquet` are the generic reader with the spec's
column names; `tmall`, `taobao` and `synthetic` are the built-in sources with their parsing quirks.
Either way the file's action values are mapped through the spec's `actions` (file value -> action;
an action's code is its position among the behaviour actions), rows of the impression action are
split off into `Dataset.impressions`, and the context features are read from columns of the same
names. `preset_spec` turns the named data sets (`tmall`, `taobao`, `taobao-slice`,
`synthetic:DIR`, `synthetic-noside:DIR`, `events:PATH`) into such specs, with the default
click/cart/fav/buy actions and tasks.

Sources and their quirks (details in docs/DATA.md):

- Tmall 2014 brand sample: the brand is the item, there is no category (every event gets
  category 0), dates are "M-D" in 2014 with no time of day (the day's 00:00 UTC is used), and
  more than half the rows are exact duplicates (dropped).
- Taobao UserBehavior: no header, `pv` is a click, and a few timestamps fall outside the
  official window, which is dropped (`TAOBAO_WINDOW`).
- Synthetic sets: .npy columns with action codes 0..3 (file values "0".."3"), already sorted and
  unique; a set written with side features ships spec.yaml (items.csv, users.csv, the device and
  hour context) and spec_noside.yaml (the same events, no side features).
- The generic format: CSV or Parquet with the spec's columns; timestamps are unix seconds or
  ISO-8601; ids follow `ids` (`auto`: integer ids as they are, a column with any other value is
  hashed with `stable_id_hash`; `string`: always hashed, as text; `int`: non-integers refused).
  With an `event_id` column, rows repeating an event id are dropped (the first is kept) and no
  other deduplication happens; without one, exact duplicate rows are dropped.

Impressions and negatives: an impression (shown, not engaged) is a real negative, so a spec with
an impression action trains on the traffic that was shown; without one the sample builder draws
popularity negatives (models/data/samples.py explains what each means for calibration).

No torch here: the feature store's ingestion reuses these readers in the serving install.
"""

from __future__ import annotations

import argparse
import calendar
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from feature_store.errors import UserError
from feature_store.schema import ACTION_CODE, ACTIONS, DEFAULT_TASKS
from feature_store.spec import (
    ContextFeatures,
    EventsSource,
    FeatureSpec,
    IdType,
    SpecError,
    TableFeatures,
    TaskDecl,
    stable_id_hash,
)
from models.data.events import Dataset, EventLog, SideTable, select_users
from models.data.synth import SPEC_FILE, SPEC_NOSIDE_FILE, load_synthetic

__all__ = [
    "DATASET_FILES",
    "DATA_ROOT_ENV",
    "TAOBAO_WINDOW",
    "DataError",
    "Dataset",
    "SideTable",
    "add_dataset_arguments",
    "dataset_from_args",
    "dataset_of_run",
    "default_data_root",
    "default_spec",
    "load_args_dataset",
    "load_dataset",
    "load_spec_dataset",
    "parse_action_map",
    "preset_spec",
    "read_events",
    "read_side_table",
    "read_taobao",
    "read_tmall",
    "repo_root",
    "resolve_data_root",
    "spec_from_args",
    "stable_id_hash",
]

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "RANKSERVE_DATA_ROOT"
TMALL_YEAR = 2014
# Taobao UserBehavior's official window, 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 in China time
# (UTC+8), as unix seconds: [2017-11-24 16:00:00 UTC, 2017-12-03 15:59:59 UTC], both inclusive.
TAOBAO_WINDOW: tuple[int, int] = (1_511_539_200, 1_512_316_799)

TMALL_COLUMNS = ("user_id", "brand_id", "type", "visit_datetime")
# Tmall `type` -> action: 0 click, 1 buy, 2 favourite, 3 add-to-cart.
TMALL_ACTIONS: dict[str, list[str]] = {"click": ["0"], "cart": ["3"], "fav": ["2"], "buy": ["1"]}
TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_ACTIONS: dict[str, list[str]] = {"click": ["pv"], "cart": ["cart"], "fav": ["fav"], "buy": ["buy"]}
SYNTHETIC_ACTIONS: dict[str, list[str]] = {a: [str(code)] for code, a in enumerate(ACTIONS)}
EVENT_COLUMNS = ("user_id", "item_id", "category_id", "action", "timestamp")

# Named datasets under the data root.
DATASET_FILES: dict[str, str] = {
    "tmall": "tmall_2014/t_alibaba_data.csv",
    "taobao": "taobao_userbehavior/UserBehavior_head.csv",
    "taobao-slice": "taobao_userbehavior/UserBehavior_slice.csv",
}
PRESETS = "tmall, taobao, taobao-slice, synthetic:DIR, synthetic-noside:DIR or events:PATH"

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


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(f"data file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path} is a directory, expected a CSV file") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty: expected a CSV with a header row") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse CSV: {exc}") from exc


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise DataError(f"data file not found: {path}") from exc
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read Parquet: {exc}") from exc


def _table_kind(path: Path, what: str) -> str:
    """`csv` or `parquet` by file suffix."""
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    raise DataError(f"{path}: unknown {what} file type; use .csv, .csv.gz or .parquet")


def _require_columns(df: pd.DataFrame, required: Iterable[str], path: Path) -> None:
    found = [str(c) for c in df.columns]
    wanted = list(dict.fromkeys(required))
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"{path} is missing column(s) {missing}; found {found}; expected {wanted}")


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


def _id_text(col: pd.Series) -> pd.Series:
    """Ids as text: integral floats lose their '.0' (a Parquet float column), text is stripped."""
    if pd.api.types.is_float_dtype(col):
        values = col.to_numpy(dtype=np.float64)
        if np.all(values == np.floor(values)) and np.abs(values).max(initial=0.0) < 2.0**63:
            return pd.Series(values.astype(np.int64), index=col.index).astype(str)
    return col.astype(str).str.strip()


def _hash_text(text: pd.Series) -> IntArray:
    codes, uniques = pd.factorize(text)
    return np.asarray(stable_id_hash(str(u) for u in uniques)[codes], dtype=np.int64)


def _id_column(col: pd.Series, name: str, path: Path, id_type: str = "auto") -> tuple[IntArray, bool]:
    """(int64 ids, hashed): `auto` keeps integer ids and hashes a column with any other value,
    `string` hashes every value as text, `int` refuses non-integers."""
    _check_no_nulls(col, name, path)
    if id_type == "string":
        return _hash_text(_id_text(col)), True
    ints = _integers_or_none(col)
    if ints is not None:
        return ints, False
    if id_type == "int":
        text = col.astype(str).str.strip()
        num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(num) | (num != np.floor(num))
        row = _first_row(bad) if bad.any() else 1
        raise DataError(
            f"{path}: column {name!r} has non-integer id {text.iloc[row - 1]!r} in data row {row}, "
            "and these ids are int (declare ids as string or auto to hash them)"
        )
    hashed = _hash_text(col.astype(str).str.strip())
    log.info("column %r of %s has non-integer ids: hashing %d distinct values to int64", name, path,
             len(np.unique(hashed)))
    return hashed, True


def _ints_as_id_type(ids: IntArray, id_type: str) -> IntArray:
    """Integer ids of a source that stores integers, under the spec's id type (`string`: hashed as text)."""
    if id_type != "string":
        return ids
    uniques, codes = np.unique(ids, return_inverse=True)
    return np.asarray(stable_id_hash(str(int(u)) for u in uniques)[codes], dtype=np.int64)


def _text_values(col: pd.Series) -> npt.NDArray[Any]:
    """A categorical column as an object array of text; missing and empty values are None."""
    codes, uniques = pd.factorize(col, use_na_sentinel=True)
    texts: list[str | None] = []
    for v in uniques:
        if isinstance(v, float | np.floating) and float(v).is_integer():
            texts.append(str(int(v)))
        else:
            t = str(v).strip()
            texts.append(t or None)
    table = np.asarray([*texts, None], dtype=object)  # code -1 (missing) reads the trailing None
    return np.asarray(table[codes], dtype=object)


def _numeric_values(col: pd.Series, name: str, path: Path) -> npt.NDArray[np.float64]:
    """A numeric column as float64; empty values are NaN (the feature's default), text is refused."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return np.asarray(col.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    text = col.astype(str).str.strip().where(col.notna(), "")
    num = pd.to_numeric(text.replace("", np.nan), errors="coerce")
    bad = (num.isna() & (text != "")).to_numpy()
    if bad.any():
        row = _first_row(bad)
        raise DataError(f"{path}: column {name!r} has non-numeric value {text.iloc[row - 1]!r} in data row {row}")
    return np.asarray(num.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)


def _timestamps(col: pd.Series, path: Path, name: str = "timestamp") -> IntArray:
    """Unix seconds (integers, integral floats or integer text) or ISO-8601 text -> int64 seconds.

    ISO-8601 text without an offset is taken as UTC; fractional seconds are floored.
    """
    if pd.api.types.is_datetime64_any_dtype(col):
        _check_no_nulls(col, name, path)
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
            raise DataError(f"{path}: cannot parse {name} in data row {row}: empty or not finite")
        return np.asarray(np.floor(values), dtype=np.int64)
    text = col.astype(str).str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    iso = pd.to_datetime(text.where(numeric.isna()), utc=True, format="ISO8601", errors="coerce")
    bad = (numeric.isna() & iso.isna()).to_numpy()
    if bad.any():
        row = _first_row(bad)
        raise DataError(
            f"{path}: cannot parse {name} {text.iloc[row - 1]!r} in data row {row}: "
            "expected unix seconds or ISO-8601 (e.g. 2017-11-25T10:00:00+08:00)"
        )
    secs = (iso - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)
    out = np.where(numeric.notna(), np.floor(numeric.to_numpy(dtype=np.float64, na_value=0.0)), secs.fillna(0))
    return np.asarray(out, dtype=np.int64)


def _tmall_dates(col: pd.Series, path: Path, name: str) -> IntArray:
    """Tmall's "M-D" dates in 2014 -> the day's 00:00 UTC; few distinct dates, each parsed once."""
    _check_no_nulls(col, name, path)
    codes, uniques = pd.factorize(col.astype(str).str.strip())
    day_ts = np.empty(len(uniques), dtype=np.int64)
    for k, text in enumerate(uniques):
        try:
            month, day = (int(x) for x in str(text).split("-"))
            if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(TMALL_YEAR, month)[1]):
                raise ValueError(text)
            day_ts[k] = calendar.timegm((TMALL_YEAR, month, day, 0, 0, 0))
        except ValueError as exc:
            row = _first_row(codes == k)
            raise DataError(f"{path}: cannot parse {name} {text!r} in data row {row}: expected M-D in 2014") from exc
    return np.asarray(day_ts[codes], dtype=np.int64)


def _action_index(spec: FeatureSpec) -> dict[str, int]:
    """File value -> the action's index in `spec.actions` (declared order, impression included)."""
    return {value: k for k, values in enumerate(spec.actions.values()) for value in values}


ACTION_HINT = (
    "declare them under the spec's actions, or for --data events:PATH map them with --action-map "
    f"canonical=value,... (canonical actions: {list(ACTIONS)})"
)


def _map_actions(col: pd.Series, index: Mapping[str, int], path: Path, column: str) -> npt.NDArray[np.int16]:
    """File action values (as text) -> action indices through `index` (file value -> index)."""
    _check_no_nulls(col, column, path)
    text = col.astype(str).str.strip()
    codes, uniques = pd.factorize(text)
    table = np.full(len(uniques), -1, dtype=np.int16)
    unknown: list[str] = []
    for k, value in enumerate(uniques):
        target = index.get(str(value))
        if target is None:
            unknown.append(str(value))
        else:
            table[k] = target
    if unknown:
        first = _first_row(np.isin(text.to_numpy(dtype=object), np.asarray(unknown, dtype=object)))
        raise DataError(
            f"{path}: unknown {column} value(s) {sorted(unknown)[:5]}"
            f"{' and more' if len(unknown) > 5 else ''} (first in data row {first}); "
            f"allowed: {sorted(index)}; {ACTION_HINT}"
        )
    return np.asarray(table[codes], dtype=np.int16)


# ---------------------------------------------------------------------------------------------
# Reading a spec's events


@dataclass
class _Rows:
    """Events as read, before the split into behaviours and impressions (unsorted unless `canonical`)."""

    user: IntArray
    item: IntArray
    category: IntArray
    action: npt.NDArray[np.int16]  # index into spec.actions
    ts: IntArray
    context: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    user_hashed: bool = False
    item_hashed: bool = False
    dedup: bool = True
    canonical: bool = False  # already sorted by (user, time) and unique (a synthetic set)
    catalogue: tuple[IntArray, IntArray] | None = None


def _spec_path(text: str, base: Path) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def _events_format(source: EventsSource, path: Path) -> str:
    if source.format == "auto":
        return _table_kind(path, "events")
    return source.format


def _context_names(spec: FeatureSpec) -> tuple[list[str], list[str]]:
    ctx = spec.context_features or ContextFeatures()
    return [d.name for d in ctx.categorical], [d.name for d in ctx.numeric]


def _read_table_events(spec: FeatureSpec, path: Path, fmt: str) -> _Rows:
    """The generic reader (csv, parquet) and the Tmall and Taobao formats: a table of events."""
    ev = spec.events
    cat_ctx, num_ctx = _context_names(spec)
    text_cols = [ev.action, *cat_ctx]
    if fmt == "tmall":
        text_cols.append(ev.timestamp)
    if spec.ids.user == "string":
        text_cols.append(ev.user)
    if spec.ids.item == "string":
        text_cols.append(ev.item)
    dtypes = dict.fromkeys(text_cols, str)
    if fmt == "taobao":
        names = [ev.user, ev.item, ev.category or "category_id", ev.action, ev.timestamp]
        df = _read_csv(path, header=None, names=names, dtype=dtypes)
    elif fmt == "parquet":
        df = _read_parquet(path)
    else:
        df = _read_csv(path, dtype=dtypes, skipinitialspace=True)
    optional = [c for c in (ev.category, ev.event_id) if c is not None]
    _require_columns(df, [ev.user, ev.item, *optional, ev.action, ev.timestamp, *cat_ctx, *num_ctx], path)
    _require_rows(df, path)
    if ev.event_id is not None:
        _check_no_nulls(df[ev.event_id], ev.event_id, path)
        first = ~df[ev.event_id].astype(str).str.strip().duplicated(keep="first").to_numpy()
        if not first.all():
            log.info("%s: %d rows repeat an earlier %r: dropped", path, int((~first).sum()), ev.event_id)
            df = df[first].reset_index(drop=True)
    user, user_hashed = _id_column(df[ev.user], ev.user, path, spec.ids.user)
    item, item_hashed = _id_column(df[ev.item], ev.item, path, spec.ids.item)
    if ev.category is not None:
        category = _id_column(df[ev.category], ev.category, path)[0]
    else:
        category = np.zeros(len(df), dtype=np.int64)
    action = _map_actions(df[ev.action], _action_index(spec), path, ev.action)
    if fmt == "tmall":
        ts = _tmall_dates(df[ev.timestamp], path, ev.timestamp)
    else:
        ts = _timestamps(df[ev.timestamp], path, ev.timestamp)
    context: dict[str, npt.NDArray[Any]] = {name: _text_values(df[name]) for name in cat_ctx}
    context.update({name: _numeric_values(df[name], name, path) for name in num_ctx})
    rows = _Rows(user, item, category, action, ts, context, user_hashed, item_hashed, dedup=ev.event_id is None)
    if fmt == "taobao":
        inside = (ts >= TAOBAO_WINDOW[0]) & (ts <= TAOBAO_WINDOW[1])
        if not inside.all():
            log.info("%s: %d rows outside the official Taobao window dropped", path, int((~inside).sum()))
            rows = _Rows(user[inside], item[inside], category[inside], action[inside], ts[inside],
                         {k: v[inside] for k, v in context.items()}, user_hashed, item_hashed, rows.dedup)
    log.info("read %s: %d rows", path, len(df))
    return rows


def _read_synthetic_events(spec: FeatureSpec, path: Path, max_users: int | None) -> _Rows:
    """A synthetic set (a directory of .npy columns): action codes 0..3 are the file values "0".."3"."""
    cat_ctx, num_ctx = _context_names(spec)
    try:
        events = load_synthetic(path, max_users=max_users, context=[*cat_ctx, *num_ctx])
    except ValueError as exc:
        raise DataError(str(exc)) from None
    # File value str(k) of stored code k -> the spec's action index, through a 256-entry table.
    index = _action_index(spec)
    lut = np.asarray([index.get(str(k), -1) for k in range(256)], dtype=np.int16)
    present = np.flatnonzero(np.bincount(events.action, minlength=256))
    unknown = [str(k) for k in present if lut[k] < 0]
    if unknown:
        raise DataError(f"{path}: unknown action value(s) {unknown} in the synthetic set; allowed: "
                        f"{sorted(index)}; {ACTION_HINT}")
    # The set's context columns by kind: text for categorical features, float64 for numeric ones.
    context = {name: _text_values(pd.Series(events.context[name])) for name in cat_ctx}
    context.update({name: np.asarray(events.context[name], dtype=np.float64) for name in num_ctx})
    user = _ints_as_id_type(events.user_id, spec.ids.user)
    item = _ints_as_id_type(events.item_id, spec.ids.item)
    category = events.category_id if spec.events.category is not None else np.zeros(len(events), dtype=np.int64)
    catalogue = None
    try:
        cat_items = _ints_as_id_type(np.load(path / "catalogue_item.npy").astype(np.int64), spec.ids.item)
        cat_cats = np.load(path / "catalogue_category.npy").astype(np.int64)
        if spec.events.category is None:
            cat_cats = np.zeros_like(cat_cats)
        catalogue = (cat_items, cat_cats)
    except OSError:
        pass
    hashed = (spec.ids.user == "string", spec.ids.item == "string")
    return _Rows(user, item, category, lut[events.action], events.timestamp, context, *hashed,
                 dedup=False, canonical=not any(hashed), catalogue=catalogue)


def _split_actions(spec: FeatureSpec, rows: _Rows) -> tuple[EventLog, EventLog | None]:
    """Behaviours (action code = position among the behaviour actions) and impressions."""
    names = list(spec.actions)
    impression = spec.impression_action
    behaviour = spec.behaviour_actions
    lut = np.asarray([behaviour.index(a) if a != impression else 255 for a in names], dtype=np.uint8)
    code = lut[rows.action]
    is_imp = code == 255
    any_imp = bool(is_imp.any())

    def log_of(mask: npt.NDArray[np.bool_] | None, action: npt.NDArray[np.uint8]) -> EventLog:
        user, item, category, ts, ctx = rows.user, rows.item, rows.category, rows.ts, rows.context
        if mask is not None:
            user, item, category, ts = user[mask], item[mask], category[mask], ts[mask]
            ctx = {k: v[mask] for k, v in ctx.items()}
        if rows.canonical:
            return EventLog(user, item, category, action, ts, ctx)
        return EventLog.from_unsorted(user, item, category, action, ts, dedup=rows.dedup, context=ctx)

    events = log_of(~is_imp, code[~is_imp]) if any_imp else log_of(None, code)
    impressions: EventLog | None = None
    if impression is not None:
        impressions = log_of(is_imp, np.zeros(int(is_imp.sum()), dtype=np.uint8))
    return events, impressions


def read_side_table(
    path: str | Path,
    features: TableFeatures,
    key: str,
    id_type: IdType,
    category: str | None = None,
) -> SideTable:
    """A user table or an item catalogue (CSV, CSV.gz or Parquet), one row per id.

    `key`: the id column; its ids follow `id_type` exactly like the events' (`string`: hashed as
    text, `int`: non-integers refused). Every declared feature column must exist. `category`: the
    events' category column name; an item catalogue that has it gives its items their category.
    Missing values are allowed (the feature's default); duplicate ids are refused.
    """
    p = Path(path)
    cat_names = [d.name for d in features.categorical]
    num_names = [d.name for d in features.numeric]
    if _table_kind(p, "table") == "parquet":
        df = _read_parquet(p)
    else:
        text_cols = cat_names + ([key] if id_type == "string" else [])
        df = _read_csv(p, dtype=dict.fromkeys(text_cols, str), skipinitialspace=True)
    found = [str(c) for c in df.columns]
    missing = [c for c in [key, *cat_names, *num_names] if c not in found]
    if missing:
        raise DataError(f"{p} is missing column(s) {missing}; found {found}")
    ids = _id_column(df[key], key, p, id_type)[0]
    dup = pd.Series(ids).duplicated(keep="first").to_numpy()
    if dup.any():
        row = _first_row(dup)
        raise DataError(
            f"{p}: column {key!r} has {int(dup.sum())} repeated id(s), first {str(df[key].iloc[row - 1])!r} "
            f"in data row {row}; a table has one row per id"
        )
    columns: dict[str, npt.NDArray[Any]] = {name: _text_values(df[name]) for name in cat_names}
    columns.update({name: _numeric_values(df[name], name, p) for name in num_names})
    category_id = None
    if category is not None and category in found:
        col = df[category]
        known = col.notna().to_numpy()
        category_id = np.zeros(len(df), dtype=np.int64)
        if known.any():
            category_id[known] = _id_column(col[known].reset_index(drop=True), category, p)[0]
    log.info("read %s: %d rows", p, len(df))
    return SideTable(ids, columns, category_id, p)


def load_spec_dataset(spec: FeatureSpec, base: str | Path, max_users: int | None = None) -> Dataset:
    """Read what a feature spec names; relative paths resolve against `base`.

    `max_users` keeps a deterministic random subset of the users with behaviour events (seed 0;
    their impressions too); a synthetic set reads the chosen users' rows alone. Side tables are
    read whole (their features are fitted on the whole table).
    """
    b = Path(base)
    path = _spec_path(spec.events.path, b)
    fmt = _events_format(spec.events, path)
    rows = _read_synthetic_events(spec, path, max_users) if fmt == "synthetic" else _read_table_events(spec, path, fmt)
    events, impressions = _split_actions(spec, rows)
    if max_users is not None:
        before = len(events)
        events = select_users(events, max_users, seed=0)
        if impressions is not None and len(events) != before:
            impressions = impressions.select(np.isin(impressions.user_id, events.user_offsets()[0]))
    id_types: tuple[IdType, IdType] = (
        "string" if rows.user_hashed else "int",
        "string" if rows.item_hashed else "int",
    )
    users = items = None
    if spec.user_features is not None:
        decl = spec.user_features
        users = read_side_table(_spec_path(decl.path, b), decl, decl.key or spec.events.user, id_types[0])
    if spec.item_features is not None:
        decl = spec.item_features
        items = read_side_table(
            _spec_path(decl.path, b), decl, decl.key or spec.events.item, id_types[1], spec.events.category
        )
    log.info(
        "dataset %s: %d events, %d impressions, %s users in the user table, %s items in the item table",
        spec.name, len(events), len(impressions) if impressions is not None else 0,
        len(users) if users is not None else "no", len(items) if items is not None else "no",
    )
    return Dataset(spec, b, events, impressions, users, items, id_types, rows.catalogue)


# ---------------------------------------------------------------------------------------------
# Presets: the named data sets as feature specs


def _default_tasks() -> list[TaskDecl]:
    return [TaskDecl(name=t.name, positive=list(t.actions), parent=t.parent, weight=t.weight, transform=t.transform)
            for t in DEFAULT_TASKS]


def _preset(name: str, events: EventsSource, actions: Mapping[str, list[str]]) -> FeatureSpec:
    return FeatureSpec(name=name, events=events, actions=dict(actions), tasks=_default_tasks())


def default_spec(name: str = "default") -> FeatureSpec:
    """The built-in click/cart/fav/buy spec with the default tasks, for an event log read elsewhere
    (its schema equals `SchemaSpec()` but for the name)."""
    return _preset(name, EventsSource(path="-"), {a: [a] for a in ACTIONS})


def tmall_spec(path: str = DATASET_FILES["tmall"], name: str = "tmall") -> FeatureSpec:
    """The Tmall 2014 preset: brand as item, type 0 click, 3 cart, 2 fav, 1 buy, no category."""
    events = EventsSource(path=path, format="tmall", user="user_id", item="brand_id", action="type",
                          timestamp="visit_datetime")
    return _preset(name, events, TMALL_ACTIONS)


def taobao_spec(path: str = DATASET_FILES["taobao"], name: str = "taobao") -> FeatureSpec:
    """The Taobao UserBehavior preset: pv click, cart, fav, buy."""
    events = EventsSource(path=path, format="taobao", user="user_id", item="item_id", action="behavior_type",
                          timestamp="timestamp", category="category_id")
    return _preset(name, events, TAOBAO_ACTIONS)


def synthetic_spec(path: str = ".", name: str = "synthetic") -> FeatureSpec:
    """A synthetic set without side features (the fallback for sets that ship no spec.yaml)."""
    events = EventsSource(path=path, format="synthetic", category="category_id")
    return _preset(name, events, SYNTHETIC_ACTIONS)


def events_spec(path: str, action_map: Mapping[str, str] | None = None, name: str = "events") -> FeatureSpec:
    """The generic `events:PATH` preset: columns user_id, item_id, category_id, action, timestamp.

    `action_map`: file value -> canonical action (click, cart, fav, buy); default: the canonical
    names themselves. A canonical action the map does not name keeps its own name as file value.
    """
    amap = dict(action_map) if action_map is not None else {a: a for a in ACTIONS}
    _check_action_map(amap)
    actions: dict[str, list[str]] = {a: [] for a in ACTIONS}
    for value, canonical in amap.items():
        actions[canonical].append(value)
    for a in ACTIONS:
        if not actions[a]:
            # an action absent from the file: its own name, unless that value means another action
            actions[a] = [a] if a not in amap else [f"({a} not in the file)"]
    events = EventsSource(path=path, format="auto", category="category_id")
    return _preset(name, events, actions)


def _check_action_map(action_map: Mapping[str, str]) -> None:
    bad_targets = sorted({v for v in action_map.values() if v not in ACTION_CODE})
    if bad_targets:
        raise DataError(f"action map targets {bad_targets} are not canonical actions; use {list(ACTIONS)}")


def _resolve_path(text: str, root: Path) -> Path:
    """A path as given (relative to the working directory), else relative to the data root."""
    p = Path(text).expanduser()
    if not p.exists() and not p.is_absolute() and (root / p).exists():
        return root / p
    return p


def preset_spec(
    dataset: str, data_root: str | Path | None = None, action_map: Mapping[str, str] | None = None
) -> tuple[FeatureSpec, Path]:
    """(spec, base) of a named data set: `tmall`, `taobao`, `taobao-slice`, `synthetic:DIR`,
    `synthetic-noside:DIR` or `events:PATH` (`action_map`, file value -> canonical action, applies
    to events:PATH only). Every preset has the default click/cart/fav/buy actions and tasks.

    A synthetic set that ships spec.yaml (written with its side features) is read by it;
    `synthetic-noside:DIR` reads the same events without side features (spec_noside.yaml).
    """
    root = resolve_data_root(data_root)
    kind, _, arg = dataset.partition(":")
    if action_map is not None and kind != "events":
        raise DataError(f"an action map applies only to events:PATH datasets, not {dataset!r}")
    if kind in DATASET_FILES and not arg:
        path = root / DATASET_FILES[kind]
        if not path.exists():
            raise DataError(
                f"dataset {kind!r} not found at {path}; set --data-root or ${DATA_ROOT_ENV} "
                "to the directory holding tmall_2014/ and taobao_userbehavior/"
            )
        spec = tmall_spec() if kind == "tmall" else taobao_spec(DATASET_FILES[kind], kind)
        return spec, root
    if kind in ("synthetic", "synthetic-noside") and arg:
        d = _resolve_path(arg, root).resolve()
        spec_file = d / (SPEC_FILE if kind == "synthetic" else SPEC_NOSIDE_FILE)
        if spec_file.exists():
            return FeatureSpec.load(spec_file), d
        return synthetic_spec(".", kind), d
    if kind == "events" and arg:
        p = _resolve_path(arg, root).resolve()
        return events_spec(str(p), action_map), p.parent
    raise DataError(f"unknown dataset {dataset!r}; use {PRESETS}")


def load_dataset(
    spec: str,
    data_root: Path | None = None,
    action_map: dict[str, str] | None = None,
    max_users: int | None = None,
) -> EventLog:
    """The behaviour events of a named data set (`preset_spec`); see `load_spec_dataset`."""
    return load_spec_dataset(*preset_spec(spec, data_root, action_map), max_users=max_users).events


# ---------------------------------------------------------------------------------------------
# Single-source readers (the presets, read from an explicit path)


def read_tmall(path: str | Path) -> EventLog:
    """Tmall 2014 brand sample: brand -> item, category 0, "M-D" 2014 dates -> day start (UTC).

    Exact duplicates (same user, brand, type, day) are dropped: 182,880 rows -> 85,030 events.
    """
    p = Path(path).resolve()
    return load_spec_dataset(tmall_spec(str(p)), p.parent).events


def read_taobao(path: str | Path) -> EventLog:
    """Taobao UserBehavior (no header): pv -> click; rows outside `TAOBAO_WINDOW` are dropped."""
    p = Path(path).resolve()
    return load_spec_dataset(taobao_spec(str(p)), p.parent).events


def read_events(path: str | Path, action_map: Mapping[str, str] | None = None) -> EventLog:
    """The generic format: CSV or Parquet with user_id, item_id, category_id, action, timestamp.

    `action_map` maps the file's action values (as text) to canonical names; the default accepts
    the canonical names themselves. Timestamps: unix seconds or ISO-8601. Non-integer ids are
    hashed with `stable_id_hash` (a column is hashed as a whole when any value is not an integer).
    """
    p = Path(path).resolve()
    return load_spec_dataset(events_spec(str(p), action_map), p.parent).events


# ---------------------------------------------------------------------------------------------
# CLI arguments and run configs


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
    """`--data` or `--spec`, `--data-root`, `--action-map`: shared by the train, evaluate and ingest commands."""
    group = parser.add_argument_group("dataset")
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        default=default,
        metavar="NAME",
        help=f"a named data set: {PRESETS} (default {default})",
    )
    source.add_argument(
        "--spec",
        type=Path,
        default=None,
        metavar="FILE",
        help="a feature spec (YAML, docs/SCHEMA.md): your events, actions, tasks and side features",
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


def spec_from_args(args: argparse.Namespace) -> tuple[FeatureSpec, Path]:
    """(spec, base) named by the arguments `add_dataset_arguments` added: `--spec FILE` (base: the
    file's directory) or the preset `--data` (with `--data-root` and `--action-map`)."""
    spec_file = getattr(args, "spec", None)
    if spec_file is not None:
        if getattr(args, "action_map", None) is not None:
            raise DataError("--action-map applies to --data events:PATH; a --spec declares its own actions")
        p = Path(spec_file).expanduser().resolve()
        return FeatureSpec.load(p), p.parent
    return preset_spec(args.data, args.data_root, args.action_map)


def load_args_dataset(args: argparse.Namespace, max_users: int | None = None) -> Dataset:
    """The Dataset named by the arguments `add_dataset_arguments` added."""
    spec, base = spec_from_args(args)
    return load_spec_dataset(spec, base, max_users=max_users)


def dataset_from_args(args: argparse.Namespace, max_users: int | None = None) -> EventLog:
    """The behaviour events named by the arguments `add_dataset_arguments` added."""
    return load_args_dataset(args, max_users).events


def dataset_of_run(config: Mapping[str, Any], data_root: Path | None = None) -> Dataset:
    """The Dataset a run was trained on, as its config recorded it.

    A run records `feature_spec` (the spec, as JSON), `spec_base` and `train.max_users`. A given
    `data_root` replaces the recorded base for the named public sets (`data` tmall, taobao,
    taobao-slice) and wherever the recorded base no longer exists. Configs from before feature
    specs (`data`, `action_map`) are read through `preset_spec`.
    """
    max_users = (config.get("train") or {}).get("max_users")
    if "feature_spec" in config:
        spec = FeatureSpec.parse(config["feature_spec"], "run config feature_spec")
        recorded = config.get("spec_base")
        base = Path(str(recorded)) if recorded else resolve_data_root(data_root)
        named = str(config.get("data") or "") in DATASET_FILES
        if data_root is not None and (named or not base.exists()):
            base = Path(data_root)
        return load_spec_dataset(spec, base, max_users=max_users)
    if "data" not in config:
        raise SpecError("run config records neither feature_spec nor data: cannot tell which data it was trained on")
    return load_spec_dataset(*preset_spec(config["data"], data_root, config.get("action_map")), max_users=max_users)
