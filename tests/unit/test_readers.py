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
    [
        ("7,100,0,2-30", "cannot parse visit_datetime '2-30' in data row 2"),
        ("7,100,9,4-15", r"unknown type value\(s\) \['9'\] \(first in data row 2\)"),
    ],
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


# ---------------------------------------------------------------------------------------------
# Feature specs: generic files with custom actions, impressions, string ids, side tables, context

from feature_store.schema import ACTIONS, DEFAULT_TASKS  # noqa: E402
from feature_store.spec import FeatureSpec, SpecError  # noqa: E402
from feature_store.spec import stable_id_hash as spec_hash  # noqa: E402
from models.data.events import Dataset  # noqa: E402
from models.data.readers import (  # noqa: E402
    dataset_of_run,
    load_spec_dataset,
    preset_spec,
    read_side_table,
    spec_from_args,
)
from tests.shop_data import write_shop  # noqa: E402

CUSTOM = """\
name: custom
events: {path: events.csv, user: uid, item: sku, action: kind, timestamp: when, category: cat}
actions: {impression: [shown], view: [v], buy: [order, purchase]}
tasks:
  - {name: view, positive: [view, buy]}
  - {name: buy, positive: [buy], parent: view, weight: 5}
context_features: {categorical: [device], numeric: [hour]}
"""


def write_custom(d: Path, rows: str, spec: str = CUSTOM) -> FeatureSpec:
    (d / "events.csv").write_text("uid,sku,kind,when,cat,device,hour\n" + rows)
    (d / "spec.yaml").write_text(spec)
    return FeatureSpec.load(d / "spec.yaml")


def h(text: str) -> int:
    return int(spec_hash([text])[0])


def test_spec_custom_actions_impressions_string_ids_and_context(tmp_path: Path) -> None:
    spec = write_custom(
        tmp_path,
        "alice,sku-1,shown,100,shoes,ios,3\n"
        "alice,sku-1,v,110,shoes,ios,3\n"
        "alice,sku-2,purchase,120,bags,,\n"
        "bob,sku-2,order,90,bags,web,1.5\n"
        "bob,sku-3,shown,95,bags,web,1.5\n"
        "bob,sku-3,shown,95,bags,web,1.5\n",  # an exact duplicate
    )
    ds = load_spec_dataset(spec, tmp_path)
    assert isinstance(ds, Dataset) and ds.spec is spec and ds.base == tmp_path
    assert ds.id_types == ("string", "string")
    assert spec.behaviour_actions == ("view", "buy")
    ev, imp = ds.events, ds.impressions
    assert imp is not None and len(ev) == 3 and len(imp) == 2
    assert ev.user_id.tolist() == sorted([h("alice"), h("alice"), h("bob")])
    rows = {(int(u), int(i)): (int(a), int(t)) for u, i, a, t in zip(ev.user_id, ev.item_id, ev.action, ev.timestamp,
                                                                     strict=True)}
    assert rows[(h("alice"), h("sku-1"))] == (0, 110)  # view: code 0 among the behaviour actions
    assert rows[(h("alice"), h("sku-2"))] == (1, 120)  # purchase and order both mean buy (code 1)
    assert rows[(h("bob"), h("sku-2"))] == (1, 90)
    assert set(ev.category_id.tolist()) == {h("shoes"), h("bags")}
    # context columns ride along with their rows: text (None when empty) and float64 (NaN when empty)
    k = int(np.flatnonzero(ev.item_id == h("sku-2"))[ev.user_id[ev.item_id == h("sku-2")] == h("alice")][0])
    assert ev.context["device"].dtype == object and ev.context["device"][k] is None
    assert ev.context["hour"].dtype == np.float64 and np.isnan(ev.context["hour"][k])
    assert imp.context["device"].tolist() == ["ios", "web"] or imp.context["device"].tolist() == ["web", "ios"]
    assert (imp.action == 0).all()
    assert ds.users is None and ds.items is None


def test_spec_id_types(tmp_path: Path) -> None:
    rows = "007,12,v,100,1,ios,1\n8,13,v,101,1,ios,1\n"
    string_ids = CUSTOM + "ids: {user: string, item: auto}\n"
    ds = load_spec_dataset(write_custom(tmp_path, rows, string_ids), tmp_path)
    assert ds.id_types == ("string", "int")  # an explicit string hashes integer-looking ids, as text
    assert sorted(ds.events.user_id.tolist()) == sorted([h("007"), h("8")])
    assert sorted(ds.events.item_id.tolist()) == [12, 13]
    auto = load_spec_dataset(write_custom(tmp_path, rows), tmp_path)
    assert auto.id_types == ("int", "int") and sorted(auto.events.user_id.tolist()) == [7, 8]
    with pytest.raises(DataError, match=r"column 'uid' has non-integer id 'x1' in data row 3"):
        load_spec_dataset(write_custom(tmp_path, rows + "x1,13,v,102,1,ios,1\n", CUSTOM + "ids: {user: int}\n"),
                          tmp_path)


def test_spec_missing_context_column_and_unknown_action(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text("uid,sku,kind,when,cat,device\n1,2,v,10,3,ios\n")
    (tmp_path / "spec.yaml").write_text(CUSTOM)
    with pytest.raises(DataError) as err:
        load_spec_dataset(FeatureSpec.load(tmp_path / "spec.yaml"), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "events.csv is missing column(s) ['hour']" in msg
    spec = write_custom(tmp_path, "1,2,v,10,3,ios,1\n1,2,like,11,3,ios,1\n")
    with pytest.raises(DataError, match=r"unknown kind value\(s\) \['like'\] \(first in data row 2\); "
                       r"allowed: \['order', 'purchase', 'shown', 'v'\]"):
        load_spec_dataset(spec, tmp_path)


def test_spec_event_id_dedup(tmp_path: Path) -> None:
    spec_text = CUSTOM.replace("category: cat}", "category: cat, event_id: eid}")
    (tmp_path / "events.csv").write_text(
        "eid,uid,sku,kind,when,cat,device,hour\n"
        "a,1,2,v,10,3,ios,1\nb,1,2,v,10,3,ios,1\na,1,2,v,99,3,ios,1\n"
    )
    (tmp_path / "spec.yaml").write_text(spec_text)
    ev = load_spec_dataset(FeatureSpec.load(tmp_path / "spec.yaml"), tmp_path).events
    # a repeated event id is dropped (first kept); distinct ids with equal rows are two events
    assert ev.timestamp.tolist() == [10, 10]


def test_spec_parquet_events(tmp_path: Path) -> None:
    df = pd.DataFrame({"uid": ["a", "b"], "sku": [5, 6], "kind": ["v", "shown"], "when": [10, 20],
                       "cat": [1, 1], "device": ["ios", None], "hour": [1.0, np.nan]})
    df.to_parquet(tmp_path / "events.parquet")
    (tmp_path / "spec.yaml").write_text(CUSTOM.replace("events.csv", "events.parquet"))
    ds = load_spec_dataset(FeatureSpec.load(tmp_path / "spec.yaml"), tmp_path)
    assert ds.id_types == ("string", "int") and len(ds.events) == 1
    assert ds.impressions is not None and ds.impressions.context["device"].tolist() == [None]


def test_shop_tables(tmp_path: Path) -> None:
    spec_path = write_shop(tmp_path, users=30, items=50, untouched_items=7)
    spec = FeatureSpec.load(spec_path)
    ds = load_spec_dataset(spec, spec_path.parent)
    assert ds.users is not None and ds.items is not None and ds.impressions is not None
    assert ds.id_types == ("string", "string")
    # tables keyed exactly like the events; the catalogue has items nobody touched, with their category
    assert len(ds.items) == 57 and set(ds.events.item_id.tolist()) <= set(ds.items.ids.tolist())
    untouched = sorted(spec_hash([f"sku-{i:05d}" for i in range(50, 57)]).tolist())
    items, cats = ds.item_catalogue()
    assert set(untouched) <= set(items.tolist())
    raw = pd.read_csv(spec_path.parent / "items.csv")
    table_cat = dict(zip(spec_hash(raw["item_id"].tolist()).tolist(), raw["cat"].tolist(), strict=True))
    for item, cat in zip(items.tolist(), cats.tolist(), strict=True):
        if item in untouched:
            assert cat == table_cat[item]
    assert ds.items.category_id is not None
    assert ds.items.columns["brand"].dtype == object and ds.items.columns["price"].dtype == np.float64
    assert len(ds.users) == 25 and ds.users.columns["city"][0] == "paris"
    assert set(ds.events.context) == {"device", "hour"}


def test_side_table_errors(tmp_path: Path) -> None:
    spec_path = write_shop(tmp_path, users=10, items=20, untouched_items=0)
    spec = FeatureSpec.load(spec_path)
    users = tmp_path / "users.csv"
    users.write_text("user_id,city\nu-0000,paris\n")
    with pytest.raises(DataError) as err:
        load_spec_dataset(spec, tmp_path)
    assert str(err.value) == f"{users} is missing column(s) ['age']; found ['user_id', 'city']"
    users.write_text("user_id,city,age\nu-0000,paris,31\nu-0000,lyon,20\n")
    with pytest.raises(DataError, match=r"column 'user_id' has 1 repeated id\(s\), first 'u-0000' in data row 2"):
        load_spec_dataset(spec, tmp_path)
    users.write_text("user_id,city,age\nu-0000,paris,old\n")
    with pytest.raises(DataError, match=r"column 'age' has non-numeric value 'old' in data row 1"):
        load_spec_dataset(spec, tmp_path)
    users.write_text("user_id,city,age\nu-0000,paris,\n")  # an empty value is missing: the default
    table = load_spec_dataset(spec, tmp_path).users
    assert table is not None and np.isnan(table.columns["age"][0])
    assert table.ids.tolist() == [h("u-0000")]
    # int ids in the events: a text key in the table is refused, naming the column
    assert spec.user_features is not None
    with pytest.raises(DataError, match=r"column 'user_id' has non-integer id 'u-0000' in data row 1"):
        read_side_table(users, spec.user_features, "user_id", "int")
    with pytest.raises(DataError, match="unknown table file type"):
        read_side_table(tmp_path / "users.json", spec.user_features, "user_id", "string")


def test_presets_match_the_defaults(tmp_path: Path) -> None:
    default_tasks = [(t.name, list(t.actions), t.parent, t.weight) for t in DEFAULT_TASKS]
    specs = [preset_spec(f"events:{tmp_path / 'e.csv'}")[0]]
    if TMALL.exists():
        specs.append(preset_spec("tmall")[0])
        assert specs[-1].actions == {"click": ["0"], "cart": ["3"], "fav": ["2"], "buy": ["1"]}
    if TAOBAO.exists():
        specs.append(preset_spec("taobao")[0])
    for spec in specs:
        assert spec.behaviour_actions == ACTIONS and spec.impression_action is None
        assert [(t.name, t.positive, t.parent, t.weight) for t in spec.tasks] == default_tasks
    mapped = preset_spec("events:x.csv", tmp_path, {"view": "click", "basket": "cart", "order": "buy"})[0]
    assert mapped.actions == {"click": ["view"], "cart": ["basket"], "fav": ["fav"], "buy": ["order"]}


@needs_tmall
def test_tmall_preset_equals_the_reader() -> None:
    spec, base = preset_spec("tmall")
    ds = load_spec_dataset(spec, base)
    assert ds.impressions is None and ds.id_types == ("int", "int")
    assert_canonical(ds.events)
    legacy = read_tmall(TMALL)
    for name in ("user_id", "item_id", "category_id", "action", "timestamp"):
        np.testing.assert_array_equal(getattr(ds.events, name), getattr(legacy, name))
    sub = load_spec_dataset(spec, base, max_users=50).events
    assert np.unique(sub.user_id).shape[0] == 50


def test_synthetic_presets_with_and_without_side_features(tmp_path: Path) -> None:
    from models.data.synth import SynthParams, generate

    generate(SynthParams(users=6, items=80, categories=5, events_min=20, events_max=30), tmp_path, progress=False)
    side, base = preset_spec(f"synthetic:{tmp_path}")
    noside, _ = preset_spec(f"synthetic-noside:{tmp_path}")
    assert side.item_features is not None and side.user_features is not None and side.context_features is not None
    assert noside.item_features is None and noside.context_features is None
    a, b = load_spec_dataset(side, base), load_spec_dataset(noside, base)
    np.testing.assert_array_equal(a.events.item_id, b.events.item_id)
    np.testing.assert_array_equal(a.events.action, b.events.action)
    assert set(a.events.context) == {"device", "hour", "price_band"} and b.events.context == {}
    assert a.events.context["device"].dtype == object and a.users is not None and len(a.users) == 6
    assert a.items is not None and len(a.items) > 80  # the catalogue's extra items, without events
    assert b.catalogue is not None and b.catalogue[0].shape[0] == 80
    sub = load_spec_dataset(side, base, max_users=3)
    assert np.unique(sub.events.user_id).shape[0] == 3 and len(sub.events.context["hour"]) == len(sub.events)


def test_spec_arguments_and_run_configs(tmp_path: Path) -> None:
    spec_path = write_shop(tmp_path, users=10, items=20, untouched_items=2)
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--spec", str(spec_path)])
    spec, base = spec_from_args(args)
    assert spec == FeatureSpec.load(spec_path) and base == spec_path.parent.resolve()
    assert len(dataset_from_args(args)) == len(load_spec_dataset(spec, base).events)
    with pytest.raises(SystemExit):
        parser.parse_args(["--spec", str(spec_path), "--data", "taobao"])
    with pytest.raises(DataError, match="--action-map applies to --data events:PATH"):
        spec_from_args(parser.parse_args(["--spec", str(spec_path), "--action-map", "click=x"]))
    with pytest.raises(SpecError, match="feature spec not found"):
        spec_from_args(parser.parse_args(["--spec", str(tmp_path / "nope.yaml")]))
    default = parser.parse_args([])
    assert default.data == "tmall" and default.spec is None

    config = {"feature_spec": spec.model_dump(mode="json"), "spec_base": str(base), "train": {"max_users": 4}}
    ds = dataset_of_run(config)
    assert ds.spec == spec and np.unique(ds.events.user_id).shape[0] == 4
    full = load_spec_dataset(spec, base, max_users=4)
    np.testing.assert_array_equal(ds.events.item_id, full.events.item_id)
    assert ds.impressions is not None and full.impressions is not None
    np.testing.assert_array_equal(ds.impressions.item_id, full.impressions.item_id)
    assert set(ds.impressions.user_id.tolist()) <= set(ds.events.user_id.tolist())
    EVENTS.to_csv(tmp_path / "e.csv", index=False)  # a config from before feature specs: data and action map
    old = dataset_of_run({"data": "events:e.csv", "action_map": AMAP, "train": {"max_users": None}}, tmp_path)
    assert len(old.events) == 4


def test_event_log_context_through_sort_dedup_and_select() -> None:
    ctx = {"device": np.asarray(["ios", "web", "ios", None, None], dtype=object),
           "hour": np.asarray([1.0, 2.0, 1.0, np.nan, np.nan])}
    log = EventLog.from_unsorted([2, 1, 2, 1, 1], [5, 5, 5, 6, 6], [0] * 5, [0] * 5, [9, 8, 9, 7, 7], context=ctx)
    # rows 0 and 2 repeat each other, context included; so do rows 3 and 4 (missing values are equal)
    assert log.user_id.tolist() == [1, 1, 2] and log.timestamp.tolist() == [7, 8, 9]
    assert log.context["device"].tolist() == [None, "web", "ios"]
    # equal rows with another context are two events
    two = EventLog.from_unsorted([1, 1], [5, 5], [0, 0], [0, 0], [9, 9],
                                 context={"device": np.asarray(["ios", "web"], dtype=object)})
    assert len(two) == 2
    sel = log.select(np.asarray([False, True, True]))
    assert sel.context["hour"].tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="context column 'hour' has shape"):
        EventLog(log.user_id, log.item_id, log.category_id, log.action, log.timestamp, {"hour": np.zeros(2)})
    big = EventLog.from_unsorted([1], [1], [0], [200], [1])  # any code below 255: the spec says which are valid
    assert big.action.tolist() == [200]
    with pytest.raises(ValueError, match="action codes must be < 255"):
        EventLog.from_unsorted([1], [1], [0], [255], [1])


def test_stable_id_hash_has_one_home() -> None:
    assert stable_id_hash is spec_hash
