"""Side features in the store, against every backend: a spec-driven ingest writes each item's and
each user's side tail beside what a fetch already reads (still one round trip), items without
events and users without events are found, upserts rewrite tails in place, and a schema mismatch
names the differing field."""

from __future__ import annotations

import argparse
import asyncio
import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_store import keys, redis_store
from feature_store.codecs import decode_side, encode_items
from feature_store.errors import FeatureStoreDataError, VersionConflict
from feature_store.redis_store import create_store
from feature_store.schema import FeatureSchema, SchemaSpec
from feature_store.spec import FeatureGroup, FeatureSpec, stable_id_hash
from feature_store.store import OnlineStore
from ingest import bulk
from ingest.bulk import ingest_dataset, read_upsert_table, schema_from_dataset, upsert_items, upsert_users
from models.data.events import Dataset, SideTable
from models.data.readers import load_spec_dataset
from tests.integration.conftest import Backend

SPEC_YAML = """\
name: side-test
events: {path: events.csv, category: category_id}
actions: {click: [click], buy: [buy], impression: [imp]}
tasks:
  - {name: click, positive: [click, buy]}
  - {name: buy, positive: [buy], parent: click, weight: 10}
item_features:
  path: items.csv
  categorical: [brand]
  numeric: [{name: price, log1p: true}]
user_features: {path: users.csv, categorical: [segment], numeric: [age]}
context_features: {categorical: [device]}
ids: {item: string}
sequence: {max_length: 50, short_length: 5}
"""
EVENT_USERS = (1, 2, 3, 4)  # user 4 has no row in users.csv: the defaults
TABLE_ONLY_USER = 500  # in users.csv, no events
EVENT_ITEMS = [f"sku-{k}" for k in range(1, 7)]  # sku-6 has no row in items.csv: the defaults
UNTOUCHED_ITEM = "sku-99"  # in items.csv, no events: still written, with the table's category
BRANDS = ("acme", "globex", "initech")


def write_set(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with (d / "events.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "category_id", "action", "timestamp", "device"])
        for u in EVENT_USERS:
            for k in range(12):
                item = int(rng.integers(1, 7))
                action = ("click", "buy", "imp")[int(rng.integers(0, 3))]
                w.writerow([u, f"sku-{item}", 10 + item % 3, action, 1_700_000_000 + 60 * k, ("ios", "web")[k % 2]])
    with (d / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "brand", "price", "category_id"])
        for k in range(1, 6):
            w.writerow([f"sku-{k}", BRANDS[k % 3], 10.0 * k, 10 + k % 3])
        w.writerow([UNTOUCHED_ITEM, "hooli", 99.5, 77])  # a brand outside the others, a category of its own
    with (d / "users.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "segment", "age"])
        for u, seg, age in ((1, "gold", 30), (2, "silver", 41), (3, "gold", ""), (TABLE_ONLY_USER, "bronze", 25)):
            w.writerow([u, seg, age])
    (d / "spec.yaml").write_text(SPEC_YAML)
    return d / "spec.yaml"


def item_raw(name: str) -> int:
    return int(stable_id_hash([name])[0])


def table_encoding(group: FeatureGroup, table: SideTable, raw_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """What the tails must decode to: `encode_rows` of each id's table row, the defaults without one."""
    rows = table.rows_of(raw_ids)
    have = rows < len(table)
    cols = {name: np.asarray([col[r] if h else None for r, h in zip(rows, have, strict=True)], dtype=object)
            for name, col in table.columns.items()}
    return group.encode_rows(cols, len(raw_ids))


@pytest.fixture(scope="module")
def side_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset, FeatureSchema]:
    d = tmp_path_factory.mktemp("side")
    spec_path = write_set(d)
    dataset = load_spec_dataset(FeatureSpec.load(spec_path), d)
    return d, dataset, schema_from_dataset(dataset)


def widths(group: FeatureGroup) -> tuple[int, int]:
    return len(group.categorical), len(group.numeric)


async def test_ingest_writes_side_tails_and_catalogue_rows(
    store: OnlineStore, side_set: tuple[Path, Dataset, FeatureSchema]
) -> None:
    _, dataset, schema = side_set
    side = schema.spec.side
    assert widths(side.item) == (1, 1) and widths(side.user) == (1, 1)
    stats = await ingest_dataset(store, dataset, schema, "s1", activate=True, batch_users=2)
    assert stats.table_users == 1 and stats.users == len(EVENT_USERS) + 1
    assert dataset.items is not None and dataset.users is not None

    names = [*EVENT_ITEMS, UNTOUCHED_ITEM, "sku-unknown"]
    raw = [item_raw(n) for n in names]
    got = await store.fetch(1, raw)
    np.testing.assert_array_equal(got.found, [True] * 7 + [False])
    untouched = names.index(UNTOUCHED_ITEM)
    assert got.category_index[untouched] == int(schema.categories.lookup([77])[0]) != 0  # the table's category
    assert got.item_index[untouched] == int(schema.items.lookup([raw[untouched]])[0])
    assert got.item_side.shape == (8, 8) and got.item_side.dtype == np.uint8
    assert not got.item_side[~got.found].any()  # a miss: an all-zero row
    ids, values = decode_side(got.item_side[got.found], *widths(side.item))
    want_ids, want_values = table_encoding(side.item, dataset.items, raw[:7])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)
    defaults = side.item.encode_rows({}, 1)
    np.testing.assert_array_equal(ids[names.index("sku-6")], defaults[0][0])  # no table row: the defaults
    assert ids[untouched, 0] == side.item.categorical[0].encode_one("hooli")

    for user in (*EVENT_USERS, TABLE_ONLY_USER):
        r = await store.fetch(user, raw[:2])
        assert r.user_found
        want_ids, want_values = table_encoding(side.user, dataset.users, [user])
        u_ids, u_values = decode_side(r.user_side, *widths(side.user))
        np.testing.assert_array_equal(u_ids, want_ids)
        np.testing.assert_array_equal(u_values, want_values)
        assert (len(r.sequence) == 0) == (user == TABLE_ONLY_USER)
    assert (await store.fetch(TABLE_ONLY_USER, [])).user_index == 0  # outside the vocabulary, still a profile
    missing = await store.fetch(123_456, [])
    assert missing.user_index is None and missing.user_side == b""

    recorded = await store.get_schema("s1")
    assert recorded is not None and recorded.schema_hash == schema.hash
    assert recorded.spec == schema.spec.to_dict()
    assert (await store.active_schema()) == recorded


async def test_upserts_rewrite_tails_in_place(
    backend: Backend, store: OnlineStore, side_set: tuple[Path, Dataset, FeatureSchema], tmp_path: Path
) -> None:
    _, dataset, schema = side_set
    side = schema.spec.side
    await ingest_dataset(store, dataset, schema, "s1", activate=True)
    target = item_raw("sku-2")
    before = await store.fetch(1, [target])  # the cached store now holds sku-2's value

    items_csv = tmp_path / "items.csv"
    items_csv.write_text(
        "item_id,brand,price,category_id\n"
        "sku-2,initech,12.5,11\n"  # changed brand and price; a category column that is not applied
        "sku-3,acme,30.0,10\n"  # the same as stored: unchanged
        "sku-new,globex,1.0,11\n"  # not stored yet: a new value
    )
    spec = dataset.spec
    stats = await upsert_items(store, schema, read_upsert_table(items_csv, spec, schema, "items"))
    assert (stats.version, stats.rows, stats.written, stats.new, stats.unchanged) == ("s1", 3, 2, 1, 1)

    fresh = create_store(backend.store_config(item_cache_size=0))
    try:
        after = await fresh.fetch(1, [target, item_raw("sku-new")])
    finally:
        await fresh.aclose()
    assert after.found.all()
    np.testing.assert_array_equal(after.item_index[:1], before.item_index)  # kept as stored
    np.testing.assert_array_equal(after.category_index[:1], before.category_index)
    ids, values = decode_side(after.item_side, *widths(side.item))
    want_ids, want_values = side.item.encode_rows({"brand": ["initech", "globex"], "price": [12.5, 1.0]}, 2)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)
    assert after.item_index[1] == 0 and after.category_index[1] == int(schema.categories.lookup([11])[0])
    # The cached store serves the old value until its item cache TTL (60 s) runs out: the documented bound.
    cached = await store.fetch(1, [target])
    np.testing.assert_array_equal(cached.item_side, before.item_side)

    users_csv = tmp_path / "users.csv"
    users_csv.write_text("user_id,segment,age\n2,bronze,50\n777,gold,33\n")
    user_before = await store.fetch(2, [])
    stats = await upsert_users(store, schema, read_upsert_table(users_csv, spec, schema, "users"))
    assert (stats.written, stats.new, stats.unchanged) == (2, 1, 0)
    user_after = await store.fetch(2, [])
    assert user_after.user_index == user_before.user_index and len(user_after.sequence) == len(user_before.sequence)
    u_ids, u_values = decode_side(user_after.user_side, *widths(side.user))
    want_ids, want_values = side.user.encode_rows({"segment": ["bronze"], "age": [50]}, 1)
    np.testing.assert_array_equal(u_ids, want_ids)
    np.testing.assert_array_equal(u_values, want_values)
    new_user = await store.fetch(777, [])
    assert new_user.user_index == 0 and len(new_user.sequence) == 0 and len(new_user.user_side) == 8


async def test_a_tail_of_another_length_is_a_data_error_naming_the_item(
    store: OnlineStore, side_set: tuple[Path, Dataset, FeatureSchema]
) -> None:
    _, dataset, schema = side_set
    await ingest_dataset(store, dataset, schema, "t1", activate=True)
    torn = item_raw("sku-1")
    await store.write_items("t1", [torn], [encode_items([1], [1])[0]])  # no tail, unlike the other items
    with pytest.raises(FeatureStoreDataError, match=f"item {torn}"):
        await store.fetch(1, [item_raw("sku-2"), torn])


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bulk.add_arguments(parser)
    return bulk.run(parser.parse_args(list(argv)))


def _target_args(backend: Backend) -> list[str]:
    if backend.name == "cluster":
        return ["--cluster-nodes", ",".join(backend.config.cluster_nodes)]
    return ["--redis-url", str(backend.config.url)]


def test_cli_ingest_from_a_bundle_and_upsert(
    backend: Backend, side_set: tuple[Path, Dataset, FeatureSchema], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_CLUSTER_NODES", raising=False)
    d, _, schema = side_set
    bundle = tmp_path / "bundle"  # what the command reads of a bundle: schema/ and spec.yaml
    schema.save(bundle / "schema")
    shutil.copyfile(d / "spec.yaml", bundle / "spec.yaml")
    target = _target_args(backend)
    # No --data/--spec: the bundle's spec, its relative paths under --data-root.
    assert _cli("--bundle", str(bundle), "--data-root", str(d), *target, "--version", "c1", "--activate",
                "--no-progress") == 0

    async def check(item: str) -> Any:
        async with create_store(backend.store_config(item_cache_size=0)) as s:
            return await s.fetch(TABLE_ONLY_USER, [item_raw(item)])

    first = asyncio.run(check(UNTOUCHED_ITEM))
    assert first.version == "c1" and first.user_found and first.found.all()

    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,brnad,price\nsku-1,acme,3\n")
    assert _cli("--bundle", str(bundle), *target, "--upsert-items", str(bad)) == 2
    # one line (other tests' logging handlers may write to stderr too: look at the command's own lines)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("rankserve ingest: error:")]
    assert len(lines) == 1 and "'brand'" in lines[0], lines

    assert _cli(*target, "--upsert-items", str(bad)) == 2  # no schema: which version's values would it be?
    assert "needs the schema" in capsys.readouterr().err
    (tmp_path / "schema-only").mkdir()
    schema.save(tmp_path / "schema-only" / "schema")
    assert _cli("--schema", str(tmp_path / "schema-only"), *target, "--upsert-items", str(bad)) == 2
    assert "carries no feature spec" in capsys.readouterr().err

    good = tmp_path / "good.csv"
    good.write_text(f"item_id,brand,price\n{UNTOUCHED_ITEM},acme,1.5\n")
    assert _cli("--bundle", str(bundle), *target, "--upsert-items", str(good)) == 0
    assert "1 written" in capsys.readouterr().out
    after = asyncio.run(check(UNTOUCHED_ITEM))
    ids, _ = decode_side(after.item_side, *widths(schema.spec.side.item))
    assert ids[0, 0] == schema.spec.side.item.categorical[0].encode_one("acme")
    np.testing.assert_array_equal(after.category_index, first.category_index)


async def test_schema_mismatch_names_the_field(
    store: OnlineStore, side_set: tuple[Path, Dataset, FeatureSchema]
) -> None:
    _, dataset, schema = side_set
    await ingest_dataset(store, dataset, schema, "m1", activate=True)
    other_side = type(schema.spec.side)(schema.spec.side.user, FeatureGroup(), schema.spec.side.context)
    other = FeatureSchema(
        SchemaSpec(**{**schema.spec.__dict__, "side": other_side}), schema.users, schema.items, schema.categories
    )
    with pytest.raises(VersionConflict, match=r"differ in: side\.item"):
        await ingest_dataset(store, dataset, other, "m1")
    with pytest.raises(VersionConflict, match=r"differ in: side\.item"):
        await upsert_items(store, other, SideTable(np.zeros(0, dtype=np.int64)))
    recorded = await store.active_schema()
    assert recorded is not None and "side.item" in recorded.difference(other.spec)
    assert keys.schema_key("m1") == b"rs:meta:m1:schema"


def test_spec_of_a_run_or_bundle_directory(side_set: tuple[Path, Dataset, FeatureSchema], tmp_path: Path) -> None:
    import json

    d, dataset, _ = side_set
    run = tmp_path / "run"
    run.mkdir()
    doc = dataset.spec.model_dump(mode="json")
    (run / "config.json").write_text(json.dumps({"feature_spec": doc, "spec_base": str(d)}))
    recorded = bulk.spec_of_directory(run)
    assert recorded is not None and recorded[0].name == "side-test" and recorded[1] == d  # the run's recorded base
    overridden = bulk.spec_of_directory(run, tmp_path)  # --data-root replaces it
    assert overridden is not None and overridden[1] == tmp_path
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert bulk.spec_of_directory(bundle) is None  # a schema alone: the spec comes from --spec/--data
    shutil.copyfile(d / "spec.yaml", bundle / "spec.yaml")
    carried = bulk.spec_of_directory(bundle, d)
    assert carried is not None and carried[0].name == "side-test" and carried[1] == d


async def test_an_upsert_drops_the_rewritten_items_from_running_servers_caches(
    backend: Backend, store: OnlineStore, side_set: tuple[Path, Dataset, FeatureSchema], tmp_path: Path
) -> None:
    """`store` plays a running server (its item cache warm), a second store the upsert command."""
    _, dataset, schema = side_set
    await ingest_dataset(store, dataset, schema, "k1", activate=True)
    changed, untouched = item_raw("sku-2"), item_raw("sku-3")
    assert await store.follow_item_changes() == 0  # no item cache yet: nothing to follow
    await store.fetch(1, [changed, untouched])
    # the first read finds where the log stands and empties what the cache took before it
    assert await store.follow_item_changes() == 0
    before = await store.fetch(1, [changed, untouched])

    items_csv = tmp_path / "items.csv"
    items_csv.write_text("item_id,brand,price\nsku-2,initech,12.5\n")
    async with create_store(backend.store_config()) as writer:
        stats = await upsert_items(writer, schema, read_upsert_table(items_csv, dataset.spec, schema, "items"))
    assert stats.written == 1
    stale = await store.fetch(1, [changed, untouched])  # not yet read: the cached value
    np.testing.assert_array_equal(stale.item_side, before.item_side)

    assert await store.follow_item_changes() == 1  # sku-2 only: an unchanged row is not written or announced
    counts = store.fetch_counts()
    after = await store.fetch(1, [changed, untouched])
    assert store.fetch_counts().item_cache_misses - counts.item_cache_misses == 1
    ids, values = decode_side(after.item_side[:1], *widths(schema.spec.side.item))
    want_ids, want_values = schema.spec.side.item.encode_rows({"brand": ["initech"], "price": [12.5]}, 1)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(after.item_side[1], before.item_side[1])
    assert await store.follow_item_changes() == 0  # each entry is read once
    assert (store.fetch_counts().item_cache_invalidations, store.fetch_counts().item_cache_resets) == (1, 0)


async def test_a_change_log_left_unread_for_half_its_retention_empties_the_cache(
    store: OnlineStore, side_set: tuple[Path, Dataset, FeatureSchema], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries older than the retention are trimmed: a store that has not read the log for half of
    it cannot know what it missed, so it serves nothing it cached before."""
    monkeypatch.setattr(redis_store, "ITEM_CHANGES_RETENTION_S", 0.4)
    _, dataset, schema = side_set
    await ingest_dataset(store, dataset, schema, "k2", activate=True)
    wanted = [item_raw("sku-2"), item_raw("sku-3")]
    await store.fetch(1, wanted)
    await store.follow_item_changes()
    await store.fetch(1, wanted)
    await asyncio.sleep(0.3)
    assert await store.follow_item_changes() == 0
    assert store.fetch_counts().item_cache_resets == 1
    counts = store.fetch_counts()
    await store.fetch(1, wanted)
    assert store.fetch_counts().item_cache_misses - counts.item_cache_misses == 2
