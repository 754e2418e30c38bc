"""Readers: the real Tianchi files, the generic CSV/Parquet format, dataset specs and errors."""

from __future__ import annotations

import argparse
import calendar
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feature_store.schema import ACTION_CODE
from models.data.events import EventLog
from models.data.readers import (
    DATA_ROOT_ENV,
    DATASET_FILES,
    TAOBAO_WINDOW,
    DataError,
    add_dataset_arguments,
    dataset_from_args,
    default_data_root,
    load_dataset,
    parse_action_map,
    read_events,
    read_taobao,
    read_tmall,
    repo_root,
    resolve_data_root,
    stable_id_hash,
)

DATA_ROOT = default_data_root()
TMALL = DATA_ROOT / DATASET_FILES["tmall"]
TAOBAO = DATA_ROOT / DATASET_FILES["taobao"]
needs_tmall = pytest.mark.skipif(not TMALL.exists(), reason=f"Tmall data not found at {TMALL} (set {DATA_ROOT_ENV})")
needs_taobao = pytest.mark.skipif(
    not TAOBAO.exists(), reason=f"Taobao data not found at {TAOBAO} (set {DATA_ROOT_ENV})"
)

CLICK, CART, FAV, BUY = (ACTION_CODE[a] for a in ("click", "cart", "fav", "buy"))
DAY = 86_400


def day_ts(month: int, day: int, year: int = 2014) -> int:
    return calendar.timegm((year, month, day, 0, 0, 0))


def assert_canonical(log: EventLog) -> None:
    """Sorted by (user, ts, action, item, category) with no exact duplicates."""
    again = EventLog.from_unsorted(log.user_id, log.item_id, log.category_id, log.action, log.timestamp)
    for name in ("user_id", "item_id", "category_id", "action", "timestamp"):
        np.testing.assert_array_equal(getattr(again, name), getattr(log, name))


# ---------------------------------------------------------------------------------------------
# Tmall


@needs_tmall
def test_tmall_real_file_dedup_mapping_and_dates() -> None:
    log = read_tmall(TMALL)
    assert len(log) == 85_030
    assert_canonical(log)
    raw = pd.read_csv(TMALL).drop_duplicates()
    by_type = raw["type"].value_counts()
    counts = np.bincount(log.action, minlength=4)
    # type 0 click, 1 buy, 2 fav, 3 cart
    assert counts[CLICK] == by_type[0] and counts[BUY] == by_type[1]
    assert counts[FAV] == by_type[2] and counts[CART] == by_type[3]
    assert (log.category_id == 0).all()
    assert (log.timestamp % DAY == 0).all()
    assert log.timestamp.min() == day_ts(4, 15) and log.timestamp.max() == day_ts(8, 15)
    assert np.unique(log.user_id).shape[0] == 884


def test_tmall_small_file(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(
        "user_id,brand_id,type,visit_datetime\n"
        "7,100,0,4-15\n7,100,0,4-15\n7,100,1,4-15\n7,101,2,8-15\n7,101,3,12-31\n5,100,0,1-1\n"
    )
    log = read_tmall(p)
    assert len(log) == 5  # one exact duplicate dropped
    assert log.user_id.tolist() == [5, 7, 7, 7, 7]
    assert log.timestamp.tolist() == [day_ts(1, 1), day_ts(4, 15), day_ts(4, 15), day_ts(8, 15), day_ts(12, 31)]
    assert log.action.tolist() == [CLICK, CLICK, BUY, FAV, CART]


@pytest.mark.parametrize(
    ("row", "message"),
    [("7,100,0,2-30", "cannot parse visit_datetime '2-30' in data row 2"), ("7,100,9,4-15", "unknown Tmall type")],
)
def test_tmall_bad_values(tmp_path: Path, row: str, message: str) -> None:
    p = tmp_path / "t.csv"
    p.write_text(f"user_id,brand_id,type,visit_datetime\n7,100,0,4-15\n{row}\n")
    with pytest.raises(DataError, match=message):
        read_tmall(p)


def test_tmall_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("user_id,brand,type,visit_datetime\n7,100,0,4-15\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['brand_id'\]; found \['user_id', 'brand'"):
        read_tmall(p)


# ---------------------------------------------------------------------------------------------
# Taobao


@needs_taobao
def test_taobao_real_head_window_and_actions() -> None:
    log = read_taobao(TAOBAO)
    raw = pd.read_csv(TAOBAO, header=None)
    inside = raw[4].between(*TAOBAO_WINDOW)
    assert (~inside).sum() >= 1  # the file has out-of-window rows, and they are gone
    assert len(log) == len(raw[inside].drop_duplicates()) == 4_320
    assert log.timestamp.min() >= TAOBAO_WINDOW[0] and log.timestamp.max() <= TAOBAO_WINDOW[1]
    counts = np.bincount(log.action, minlength=4)
    kept = raw[inside][3].value_counts()
    assert counts[CLICK] == kept["pv"] and counts[CART] == kept["cart"]
    assert counts[FAV] == kept["fav"] and counts[BUY] == kept["buy"]
    assert_canonical(log)


def test_taobao_window_edges(tmp_path: Path) -> None:
    lo, hi = TAOBAO_WINDOW
    assert lo == calendar.timegm((2017, 11, 25, 0, 0, 0)) - 8 * 3600  # 00:00 China time
    assert hi == calendar.timegm((2017, 12, 3, 23, 59, 59)) - 8 * 3600
    p = tmp_path / "ub.csv"
    p.write_text(f"1,10,5,pv,{lo - 1}\n1,11,5,pv,{lo}\n1,12,5,buy,{hi}\n1,13,5,fav,{hi + 1}\n2,10,5,cart,{lo + 60}\n")
    log = read_taobao(p)
    assert log.item_id.tolist() == [11, 12, 10]
    assert log.action.tolist() == [CLICK, BUY, CART]


def test_taobao_unknown_behavior(tmp_path: Path) -> None:
    p = tmp_path / "ub.csv"
    p.write_text(f"1,10,5,pv,{TAOBAO_WINDOW[0]}\n1,11,5,like,{TAOBAO_WINDOW[0]}\n")
    with pytest.raises(DataError, match=r"unknown behavior_type value\(s\) \['like'\] \(first in data row 2\)"):
        read_taobao(p)


# ---------------------------------------------------------------------------------------------
# Generic format

EVENTS = pd.DataFrame(
    {
        "user_id": [2, 1, 1, 1, 2],
        "item_id": [10, 10, 11, 11, 12],
        "category_id": [5, 5, 6, 6, 5],
        "action": ["view", "view", "basket", "basket", "order"],
        "timestamp": [1_700_000_000, 1_700_000_100, 1_700_000_050, 1_700_000_050, 1_700_000_200],
    }
)
AMAP = {"view": "click", "basket": "cart", "order": "buy"}


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".csv.gz"])
def test_read_events_csv_and_parquet(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"events{suffix}"
    if suffix == ".parquet":
        EVENTS.to_parquet(p)
    else:
        EVENTS.to_csv(p, index=False)
    log = read_events(p, AMAP)
    assert len(log) == 4  # one exact duplicate
    assert log.user_id.tolist() == [1, 1, 2, 2]
    assert log.item_id.tolist() == [11, 10, 10, 12]
    assert log.action.tolist() == [CART, CLICK, CLICK, BUY]
    assert log.timestamp.tolist() == [1_700_000_050, 1_700_000_100, 1_700_000_000, 1_700_000_200]


def test_read_events_canonical_names_by_default(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("user_id,item_id,category_id,action,timestamp\n1,2,3,buy,10\n1,2,3,fav,5\n")
    log = read_events(p)
    assert log.action.tolist() == [FAV, BUY]


def test_read_events_iso_timestamps_and_string_ids(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text(
        "user_id,item_id,category_id,action,timestamp\n"
        "alice,sku-1,shoes,click,2017-11-25T00:00:00+08:00\n"
        "alice,sku-2,shoes,click,2017-11-25 01:00:00\n"
        "alice,sku-1,shoes,buy,1511600000\n"
    )
    log = read_events(p)
    expected_user = int.from_bytes(hashlib.blake2b(b"alice", digest_size=8).digest(), "little") & (2**63 - 1)
    assert (log.user_id == expected_user).all()
    assert log.timestamp.tolist() == [TAOBAO_WINDOW[0], 1_511_571_600, 1_511_600_000]  # naive ISO is UTC
    assert set(log.item_id.tolist()) == set(stable_id_hash(["sku-1", "sku-2"]).tolist())
    assert (log.item_id >= 0).all()


def test_stable_id_hash_is_stable() -> None:
    # Pinned values: a change would silently re-key every stored id.
    assert stable_id_hash(["a", "b"]).tolist() == [
        int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little") & (2**63 - 1) for s in (b"a", b"b")
    ]


def test_read_events_missing_columns(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("user,item_id,action,timestamp\n1,2,click,10\n")
    with pytest.raises(DataError) as err:
        read_events(p)
    msg = str(err.value)
    assert "missing column(s) ['user_id', 'category_id']" in msg
    assert "found ['user', 'item_id', 'action', 'timestamp']" in msg


def test_read_events_unknown_actions(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("user_id,item_id,category_id,action,timestamp\n1,2,3,click,10\n1,2,3,pv,11\n1,2,3,like,12\n")
    with pytest.raises(DataError) as err:
        read_events(p)
    msg = str(err.value)
    assert "unknown action value(s) ['like', 'pv']" in msg and "first in data row 2" in msg
    assert "allowed: ['buy', 'cart', 'click', 'fav']" in msg and "--action-map" in msg


def test_read_events_bad_timestamp(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("user_id,item_id,category_id,action,timestamp\n1,2,3,click,10\n1,2,3,click,yesterday\n")
    with pytest.raises(DataError, match=r"cannot parse timestamp 'yesterday' in data row 2"):
        read_events(p)


def test_read_events_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_events(empty)
    header = tmp_path / "header.csv"
    header.write_text("user_id,item_id,category_id,action,timestamp\n")
    with pytest.raises(DataError, match="has no events"):
        read_events(header)
    pq = tmp_path / "empty.parquet"
    EVENTS.iloc[:0].to_parquet(pq)
    with pytest.raises(DataError, match="has no events"):
        read_events(pq)


def test_read_events_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown events file type"):
        read_events(tmp_path / "e.json")
    with pytest.raises(DataError, match="data file not found"):
        read_events(tmp_path / "missing.csv")
    p = tmp_path / "e.csv"
    p.write_text("user_id,item_id,category_id,action,timestamp\n1,,3,click,10\n")
    with pytest.raises(DataError, match="column 'item_id' has 1 empty value"):
        read_events(p)
    with pytest.raises(DataError, match="not canonical actions"):
        read_events(p, {"click": "view"})


# ---------------------------------------------------------------------------------------------
# Dataset specs and CLI arguments


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert default_data_root() == (repo_root() / ".." / "shared" / "data").resolve()
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert default_data_root() == tmp_path
    assert resolve_data_root(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(DataError, match=f"dataset 'tmall' not found at {tmp_path}"):
        load_dataset("tmall")


@needs_taobao
def test_load_named_datasets() -> None:
    assert len(load_dataset("taobao", DATA_ROOT)) == 4_320
    assert len(load_dataset("taobao-slice", DATA_ROOT)) == 110_300


def test_load_events_and_synthetic_specs(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    EVENTS.to_csv(p, index=False)
    assert len(load_dataset(f"events:{p}", action_map=AMAP)) == 4
    assert len(load_dataset("events:e.csv", data_root=tmp_path, action_map=AMAP)) == 4  # relative to the root

    from models.data.synth import SynthParams, generate

    generate(
        SynthParams(users=4, items=50, categories=5, events_min=20, events_max=20), tmp_path / "syn", progress=False
    )
    assert len(load_dataset(f"synthetic:{tmp_path / 'syn'}")) == 80
    assert len(load_dataset(f"synthetic:{tmp_path / 'syn'}", max_users=2)) == 40


def test_load_dataset_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'movielens'"):
        load_dataset("movielens", tmp_path)
    with pytest.raises(DataError, match="applies only to events:PATH"):
        load_dataset("tmall", tmp_path, action_map={"pv": "click"})


def test_action_map_parsing() -> None:
    assert parse_action_map("click=pv, cart=cart,fav=fav,buy=buy") == {
        "pv": "click",
        "cart": "cart",
        "fav": "fav",
        "buy": "buy",
    }
    with pytest.raises(DataError, match="bad action map entry 'view=click'"):
        parse_action_map("view=click")
    with pytest.raises(DataError, match="to both"):
        parse_action_map("click=x,buy=x")


def test_dataset_arguments(tmp_path: Path) -> None:
    p = tmp_path / "e.csv"
    EVENTS.to_csv(p, index=False)
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(
        ["--data", f"events:{p}", "--data-root", str(tmp_path), "--action-map", "click=view,cart=basket,buy=order"]
    )
    assert args.action_map == AMAP and args.data_root == tmp_path
    assert len(dataset_from_args(args)) == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--action-map", "nope"])


def test_readers_do_not_import_torch() -> None:
    code = "import sys, models.data.readers, models.data.samples, models.data.synth; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root(), check=False).returncode == 0
