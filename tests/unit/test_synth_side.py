"""The synthetic set's side features: item and user tables, per-event context, the planted signal, the specs."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from feature_store.spec import FeatureSpec
from models.data import synth
from models.data.synth import (
    COLUMNS,
    CONTEXT_COLUMNS,
    DEVICES,
    ITEMS_FILE,
    META_FILE,
    PRICE_BANDS,
    SPEC_FILE,
    SPEC_NOSIDE_FILE,
    USERS_FILE,
    SynthParams,
    generate,
    load_synthetic,
)

PARAMS = SynthParams(users=200, items=5_000, categories=60, events_min=100, events_max=3_000, seed=7)
BUY = 3


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth_side")
    generate(PARAMS, d, progress=False)
    return d


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open() as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def digest(directory: Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        a = np.load(directory / f"{name}.npy")
        h.update(name.encode())
        h.update(a.dtype.str.encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_behaviour_columns_unchanged_by_side_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The behaviour columns are bit-identical to what the generator wrote before it had side features.

    The digest was taken with that generator (same parameters, 20,000 events per chunk: 3 chunks).
    """
    monkeypatch.setattr(synth, "CHUNK_EVENTS", 20_000)
    params = SynthParams(users=40, items=3_000, categories=30, events_min=100, events_max=3_000, seed=11)
    meta = generate(params, tmp_path, progress=False)
    assert meta["chunks"] == 3
    names = (*COLUMNS, "catalogue_item", "catalogue_category", "user_offsets")
    assert digest(tmp_path, names) == "979eef9e2e335b3d5290f3ffdb6d23e1fe9b698944af9663876b6f59c7d65291"
    assert meta["counts"]["actions"] == {"click": 43872, "cart": 518, "fav": 373, "buy": 701}


def test_same_seed_same_side_files(synth_dir: Path, tmp_path: Path) -> None:
    generate(PARAMS, tmp_path / "again", progress=False)
    for name in (ITEMS_FILE, USERS_FILE, SPEC_FILE, SPEC_NOSIDE_FILE):
        assert (synth_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert digest(synth_dir, CONTEXT_COLUMNS) == digest(tmp_path / "again", CONTEXT_COLUMNS)
    generate(SynthParams(**{**PARAMS.__dict__, "seed": 8}), tmp_path / "other", progress=False)
    assert (synth_dir / ITEMS_FILE).read_bytes() != (tmp_path / "other" / ITEMS_FILE).read_bytes()


def test_item_table_covers_the_catalogue_and_more(synth_dir: Path) -> None:
    header, rows = read_csv(synth_dir / ITEMS_FILE)
    assert header == ["item_id", "brand", "price", "category_id"]
    meta = json.loads((synth_dir / META_FILE).read_text())
    extra = meta["counts"]["extra_items"]
    assert extra == PARAMS.items // 100 and meta["counts"]["catalogue_items"] == PARAMS.items + extra
    ids = np.asarray([int(r[0]) for r in rows])
    np.testing.assert_array_equal(ids, np.arange(1, PARAMS.items + extra + 1))
    events_items = np.load(synth_dir / "item_id.npy")
    assert not np.isin(ids[PARAMS.items :], events_items).any()  # the extra items never occur in an event
    brands = {r[1] for r in rows}
    assert 30 <= len(brands) <= synth.N_BRANDS and all(b.startswith("brand") for b in brands)
    prices = np.asarray([float(r[2]) for r in rows])
    assert (prices > 0).all() and prices.max() / np.median(prices) > 5  # log-normal: a long right tail
    # the catalogue's categories agree with the event catalogue; brands follow categories
    cats = np.asarray([int(r[3]) for r in rows])
    np.testing.assert_array_equal(cats[: PARAMS.items], np.load(synth_dir / "catalogue_category.npy"))
    assert set(cats[PARAMS.items :].tolist()) <= set(range(1, PARAMS.categories + 1))
    by_cat: dict[int, list[str]] = {}
    for c, r in zip(cats.tolist(), rows, strict=True):
        by_cat.setdefault(c, []).append(r[1])
    big = [v for v in by_cat.values() if len(v) >= 50]
    top_share = np.mean([max(v.count(b) for b in set(v)) / len(v) for v in big])
    assert top_share > 0.45  # most of a category's items carry its house brand


def test_user_table(synth_dir: Path) -> None:
    header, rows = read_csv(synth_dir / USERS_FILE)
    assert header == ["user_id", "segment", "age"]
    assert [int(r[0]) for r in rows] == list(range(1, PARAMS.users + 1))
    segments = {r[1] for r in rows}
    assert len(segments) >= 4 and segments <= {f"seg{s}" for s in range(synth.N_SEGMENTS)}
    ages = np.asarray([int(r[2]) for r in rows])
    assert ages.min() >= 16 and ages.max() <= 80


def test_context_columns(synth_dir: Path) -> None:
    meta = json.loads((synth_dir / META_FILE).read_text())
    n = meta["counts"]["events"]
    ts = np.load(synth_dir / "timestamp.npy")
    hour = np.load(synth_dir / "hour.npy")
    device = np.load(synth_dir / "device.npy")
    assert hour.shape == device.shape == (n,) and hour.dtype == device.dtype == np.uint8
    np.testing.assert_array_equal(hour, (ts % 86_400) // 3_600)
    share = np.bincount(device, minlength=len(DEVICES)) / n
    assert (share > 0.1).all()  # every device is common
    # one device per user and calendar day (UTC): it never changes inside a day, often between days
    users = np.load(synth_dir / "user_id.npy")
    same_user = users[1:] == users[:-1]
    same_day = same_user & (ts[1:] // 86_400 == ts[:-1] // 86_400)
    changed = device[1:] != device[:-1]
    assert not changed[same_day].any()
    assert changed[same_user & ~same_day].mean() > 0.3


def test_planted_device_price_effect(synth_dir: Path) -> None:
    """Buy rates by device x price tercile differ strongly; the price alone says little."""
    action = np.load(synth_dir / "action.npy")
    device = np.load(synth_dir / "device.npy")
    _, rows = read_csv(synth_dir / ITEMS_FILE)
    log_price = np.log(np.r_[np.nan, [float(r[2]) for r in rows]])
    z = (log_price - np.nanmean(log_price)) / np.nanstd(log_price)
    bucket = np.searchsorted(np.asarray(synth.PRICE_TERCILES), z[np.load(synth_dir / "item_id.npy")])
    buy = action == BUY
    rate = np.asarray([[buy[(device == d) & (bucket == b)].mean() for b in range(3)] for d in range(3)])
    ios, android, web = rate
    assert ios[2] > 8 * ios[0]  # ios buys expensive items
    assert web[0] > 8 * web[2]  # web buys cheap ones
    assert web[0] > 8 * ios[0] and ios[2] > 8 * web[2]
    assert android.max() < min(ios[2], web[0]) / 50  # android almost never buys
    by_price = np.asarray([buy[bucket == b].mean() for b in range(3)])
    assert by_price.max() < 2.0 * by_price.min()  # price alone: weak
    meta = json.loads((synth_dir / META_FILE).read_text())
    recorded = meta["side"]["buy_rate_by_device_price"]
    np.testing.assert_allclose(recorded["web"]["cheap"], web[0], atol=1e-4)
    np.testing.assert_allclose(recorded["ios"]["expensive"], ios[2], atol=1e-4)


def test_buys_are_on_the_device_that_owns_the_price(synth_dir: Path) -> None:
    """The planted conversion effect per event: most buys happen on the device whose multiplier is
    the largest at the item's price (ios above the median log price, web below), while clicks land
    there about as often as the device shares say; the multipliers average 1 over the prior."""
    _, rows = read_csv(synth_dir / ITEMS_FILE)
    log_price = np.log(np.r_[np.nan, [float(r[2]) for r in rows]])
    z = (log_price - np.nanmean(log_price)) / np.nanstd(log_price)
    item, action, device = (np.load(synth_dir / f"{c}.npy") for c in ("item_id", "action", "device"))
    factor = synth.device_multiplier(z[item])
    np.testing.assert_allclose(factor @ np.asarray(synth.DEVICE_PRIOR), 1.0)
    assert factor.max() <= 1.0 / min(synth.DEVICE_PRIOR) + 1e-9
    owner = np.argmax(factor, axis=1)
    assert set(np.unique(owner).tolist()) == {0, 2}  # ios or web: android owns no price
    on_owner = device == owner
    buy = action == BUY
    assert on_owner[buy].mean() > 0.8
    assert on_owner[~buy].mean() < 0.45


def test_planted_price_band(synth_dir: Path) -> None:
    """A filtered event's band is its item's price quintile; a P_UNFILTERED share is unfiltered ("any")."""
    items = synth._items(PARAMS, synth._catalogue(PARAMS))
    item, band = np.load(synth_dir / "item_id.npy"), np.load(synth_dir / "price_band.npy")
    assert band.dtype == np.uint8 and band.max() < len(PRICE_BANDS)
    filtered = band > 0
    assert abs(1.0 - filtered.mean() - synth.P_UNFILTERED) < 0.01
    np.testing.assert_array_equal(band[filtered], items.price_band[item[filtered]])
    # the bands are quintiles of the catalogue: every band holds a fair share of the events
    share = np.bincount(band[filtered], minlength=len(PRICE_BANDS))[1:] / filtered.sum()
    assert (share > 0.08).all()
    recorded = json.loads((synth_dir / META_FILE).read_text())["side"]["price_band_share"]
    counted = np.bincount(band, minlength=len(PRICE_BANDS)) / band.shape[0]
    assert list(recorded) == list(PRICE_BANDS)
    np.testing.assert_allclose(list(recorded.values()), counted, atol=1e-5)


def test_segment_brand_affinity_shows_in_buy_rates(synth_dir: Path) -> None:
    meta = json.loads((synth_dir / META_FILE).read_text())["side"]
    assert meta["buy_rate_loved_brand"] > 1.2 * meta["buy_rate_other_brand"]


def test_load_synthetic_context(synth_dir: Path) -> None:
    log = load_synthetic(synth_dir)
    assert set(log.context) == {"device", "hour", "price_band"}
    for name, values in (("device", DEVICES), ("price_band", PRICE_BANDS)):
        assert log.context[name].dtype == object and set(log.context[name][:1000]) <= set(values)
        codes = np.load(synth_dir / f"{name}.npy")
        np.testing.assert_array_equal(log.context[name], np.asarray(values, dtype=object)[codes])
    assert log.context["hour"].dtype == np.float64
    np.testing.assert_array_equal(log.context["hour"], (log.timestamp % 86_400) // 3_600)
    assert load_synthetic(synth_dir, context=()).context == {}
    assert set(load_synthetic(synth_dir, context=["hour"]).context) == {"hour"}
    sub = load_synthetic(synth_dir, max_users=7, seed=2)
    mask = np.isin(log.user_id, np.unique(sub.user_id))
    for name in ("device", "hour", "price_band"):
        np.testing.assert_array_equal(sub.context[name], log.context[name][mask])
    with pytest.raises(ValueError, match="no context column"):
        load_synthetic(synth_dir, context=["weather"])


def test_a_set_without_side_features_still_loads(synth_dir: Path, tmp_path: Path) -> None:
    """Sets written before side features (format 1: no context) and before price bands (format 2: device, hour)."""
    for name in (*COLUMNS, "user_offsets", "catalogue_item", "catalogue_category"):
        (tmp_path / f"{name}.npy").write_bytes((synth_dir / f"{name}.npy").read_bytes())
    meta = json.loads((synth_dir / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    log = load_synthetic(tmp_path)
    assert log.context == {} and len(log) == meta["counts"]["events"]
    with pytest.raises(ValueError, match="regenerate"):
        load_synthetic(tmp_path, context=["device"])
    # format 2: device and hour, no price band
    for name in ("device", "hour"):
        (tmp_path / f"{name}.npy").write_bytes((synth_dir / f"{name}.npy").read_bytes())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "format_version": 2}))
    assert set(load_synthetic(tmp_path).context) == {"device", "hour"}
    with pytest.raises(ValueError, match="regenerate"):
        load_synthetic(tmp_path, context=["price_band"])
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_synthetic(tmp_path)


def test_specs_validate(synth_dir: Path) -> None:
    spec = FeatureSpec.load(synth_dir / SPEC_FILE)
    assert spec.events.format == "synthetic" and spec.behaviour_actions == ("click", "cart", "fav", "buy")
    assert spec.actions == {"click": ["0"], "cart": ["1"], "fav": ["2"], "buy": ["3"]}
    tasks = {t.name: (t.positive, t.parent, t.weight) for t in spec.tasks}
    assert tasks == {
        "click": (["click", "cart", "fav", "buy"], None, 1.0),
        "cart": (["cart", "fav"], "click", 3.0),
        "buy": (["buy"], "click", 10.0),
    }
    assert spec.item_features is not None and spec.item_features.path == ITEMS_FILE
    assert [d.name for d in spec.item_features.categorical] == ["brand"]
    assert [(d.name, d.log1p) for d in spec.item_features.numeric] == [("price", True)]
    assert spec.user_features is not None and spec.user_features.path == USERS_FILE
    assert [d.name for d in spec.user_features.categorical] == ["segment"]
    assert [d.name for d in spec.user_features.numeric] == ["age"]
    assert spec.context_features is not None
    assert [d.name for d in spec.context_features.categorical] == ["device", "price_band"]
    assert [d.name for d in spec.context_features.numeric] == ["hour"]
    plain = FeatureSpec.load(synth_dir / SPEC_NOSIDE_FILE)
    assert plain.item_features is None and plain.user_features is None and plain.context_features is None
    assert plain.actions == spec.actions and plain.tasks == spec.tasks and plain.events == spec.events


def test_spec_reads_the_side_tables(synth_dir: Path) -> None:
    """spec.yaml is what `synthetic:DIR` and `--spec DIR/spec.yaml` read: events, context, both tables."""
    from models.data.readers import load_spec_dataset, preset_spec

    spec, base = preset_spec(f"synthetic:{synth_dir}")
    assert spec == FeatureSpec.load(synth_dir / SPEC_FILE)
    data = load_spec_dataset(spec, base)
    assert data.items is not None and data.users is not None
    meta = json.loads((synth_dir / META_FILE).read_text())
    assert len(data.items) == meta["counts"]["catalogue_items"] and len(data.users) == PARAMS.users
    assert set(data.events.context) == {"device", "hour", "price_band"} and len(data.events) == meta["counts"]["events"]
    plain, _ = preset_spec(f"synthetic-noside:{synth_dir}")
    assert plain.context_features is None and plain.item_features is None
