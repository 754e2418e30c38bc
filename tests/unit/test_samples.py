"""Sample construction: no leakage, valid negatives, labels from events, determinism, split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from feature_store.schema import ACTION_CODE, ACTIONS, SchemaSpec
from models.data.events import EventLog
from models.data.readers import DATA_ROOT_ENV, DATASET_FILES, default_data_root, read_taobao, read_tmall
from models.data.samples import (
    SECONDS_PER_DAY,
    SampleSet,
    TimeSplit,
    build_samples,
    cvr_mask,
    default_split,
    select_users,
)
from models.data.synth import SynthParams, generate, load_synthetic

TMALL = default_data_root() / DATASET_FILES["tmall"]
SLICE = default_data_root() / DATASET_FILES["taobao-slice"]
needs_tmall = pytest.mark.skipif(not TMALL.exists(), reason=f"Tmall data not found at {TMALL} (set {DATA_ROOT_ENV})")
SPEC = SchemaSpec()
DAY = SECONDS_PER_DAY


@pytest.fixture(scope="module")
def tmall_log() -> EventLog:
    return read_tmall(TMALL)


@pytest.fixture(scope="module")
def tmall(tmall_log: EventLog) -> SampleSet:
    return build_samples(tmall_log, seed=0)


@pytest.fixture(scope="module")
def synth_log(tmp_path_factory: pytest.TempPathFactory) -> EventLog:
    """Second-resolution timestamps, many events per user."""
    d = tmp_path_factory.mktemp("synth")
    generate(
        SynthParams(users=40, items=2_000, categories=30, events_min=50, events_max=600, seed=1), d, progress=False
    )
    return load_synthetic(d)


@pytest.fixture(scope="module")
def synth(synth_log: EventLog) -> SampleSet:
    return build_samples(synth_log, seed=0)


def tiny_log() -> EventLog:
    """Two users; user 1 clicks then buys item 10 on day 0, carts item 11 on day 1, clicks 10 on day 2."""
    rows = [
        # user, item, category, action, ts
        (1, 10, 100, "click", 100),
        (1, 10, 100, "buy", 200),
        (1, 12, 101, "click", 150),
        (1, 11, 101, "cart", DAY + 50),
        (1, 10, 100, "click", 2 * DAY + 10),
        (2, 12, 101, "click", 60),
        (2, 13, 102, "fav", DAY + 70),
        (2, 14, 102, "click", 2 * DAY + 5),
        (2, 10, 100, "click", 3 * DAY),
    ]
    u, i, c, a, t = zip(*rows, strict=True)
    return EventLog.from_unsorted(u, i, c, [ACTION_CODE[x] for x in a], t)


def check_histories(samples: SampleSet, log: EventLog) -> None:
    """Every history row is the sample's user's, earlier than the sample, and all earlier rows are in."""
    users, offsets = log.user_offsets()
    u_idx = np.searchsorted(users, samples.raw_user)
    assert (users[u_idx] == samples.raw_user).all()
    np.testing.assert_array_equal(samples.hist_start, offsets[u_idx])  # the user's first row
    assert (samples.hist_start <= samples.hist_end).all()
    assert (samples.hist_end <= offsets[u_idx + 1]).all()
    nonempty = samples.hist_end > samples.hist_start
    last = samples.hist_end[nonempty] - 1
    # Rows are sorted by (user, ts): the last row decides both "same user" and "earlier" for all.
    assert (log.user_id[last] == samples.raw_user[nonempty]).all()
    assert (samples.ev_ts[last] < samples.ts[nonempty]).all()
    # Complete: the next row is another user's or not earlier than the sample.
    nxt = samples.hist_end
    inside = nxt < offsets[u_idx + 1]
    assert (samples.ev_ts[nxt[inside]] >= samples.ts[inside]).all()
    # Brute force on a few samples.
    rng = np.random.default_rng(0)
    for s in rng.choice(len(samples), size=min(200, len(samples)), replace=False):
        rows = np.flatnonzero((log.user_id == samples.raw_user[s]) & (log.timestamp < samples.ts[s]))
        np.testing.assert_array_equal(rows, np.arange(samples.hist_start[s], samples.hist_end[s]))


def check_negatives(samples: SampleSet, log: EventLog) -> None:
    """No negative's item was engaged with by its user on the sample's day; and some negatives are
    items the user had interacted with before (else the cross features would be a label shortcut)."""
    engaged = pd.DataFrame({"u": log.user_id, "i": log.item_id, "d": log.timestamp // DAY}).drop_duplicates()
    engaged["same_day"] = True
    neg = samples.labels.max(axis=1) == 0
    df = pd.DataFrame({"u": samples.raw_user[neg], "i": samples.raw_item[neg], "d": samples.ts[neg] // DAY})
    df = df.merge(engaged, on=["u", "i", "d"], how="left")
    assert df["same_day"].isna().all()


def check_positives(samples: SampleSet, log: EventLog) -> None:
    """Positives are exactly the (user, item, day) groups, at their first ts, with OR-ed labels."""
    ev = pd.DataFrame(
        {"u": log.user_id, "i": log.item_id, "d": log.timestamp // DAY, "t": log.timestamp, "a": log.action.astype(int)}
    )
    for a, name in enumerate(ACTIONS):
        ev[name] = ev["a"] == a
    groups = ev.groupby(["u", "i", "d"]).agg(t=("t", "min"), **{n: (n, "max") for n in ACTIONS}).reset_index()
    expected = pd.DataFrame({"u": groups["u"], "i": groups["i"], "t": groups["t"]})
    for task in SPEC.tasks:
        expected[task.name] = groups[list(task.actions)].any(axis=1).astype(np.float32)
    pos = samples.labels.max(axis=1) > 0
    got = pd.DataFrame({"u": samples.raw_user[pos], "i": samples.raw_item[pos], "t": samples.ts[pos]})
    for k, task in enumerate(SPEC.tasks):
        got[task.name] = samples.labels[pos, k]
    key = ["u", "i", "t"]
    pd.testing.assert_frame_equal(
        got.sort_values(key).reset_index(drop=True), expected.sort_values(key).reset_index(drop=True)
    )


# ---------------------------------------------------------------------------------------------


def test_tiny_log_exact() -> None:
    log = tiny_log()
    s = build_samples(log, split=TimeSplit(DAY, 2 * DAY), negatives_per_positive=0)
    pos = [(int(u), int(i), int(t)) for u, i, t in zip(s.raw_user, s.raw_item, s.ts, strict=True)]
    user1 = [(1, 10, 100), (1, 12, 150), (1, 11, DAY + 50), (1, 10, 2 * DAY + 10)]
    user2 = [(2, 12, 60), (2, 13, DAY + 70), (2, 14, 2 * DAY + 5), (2, 10, 3 * DAY)]
    assert pos == [*user1, *user2]
    # click, cart, buy
    assert s.labels.tolist() == [[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]]
    assert (s.hist_end - s.hist_start).tolist() == [0, 1, 3, 4, 0, 1, 2, 3]
    assert s.split.tolist() == [0, 0, 1, 2, 0, 1, 2, 2]
    # Vocabularies from events before valid_start only: item 13 (day 1) and 14 (day 2) are OOV.
    assert s.schema.items.ids.tolist() == [10, 12]
    assert s.item.tolist() == [1, 2, 0, 1, 2, 0, 0, 1]
    assert s.category.tolist() == [1, 2, 2, 1, 2, 0, 0, 1]  # categories 100, 101 known; 102 not
    assert s.ev_item.tolist() == [1, 2, 1, 0, 1, 2, 0, 0, 1]
    check_histories(s, log)
    check_positives(s, log)


def test_tiny_log_negatives_exclude_only_items_engaged_with_that_day() -> None:
    log = tiny_log()
    s = build_samples(log, split=TimeSplit(10 * DAY, 20 * DAY), negatives_per_positive=20, seed=3)
    check_negatives(s, log)
    neg = s.labels.max(axis=1) == 0
    # User 1's first sample (day 0): items 10 and 12 were touched that day; only 11, 13, 14 are allowed.
    first = neg & (s.raw_user == 1) & (s.ts == 100)
    assert set(s.raw_item[first].tolist()) <= {11, 13, 14}
    assert first.sum() > 0
    # Its day-1 sample: only 11 was touched that day. 10 and 12 (day 0) are valid negatives, whose
    # cross features are not empty: a returning item is not a positive by construction.
    second = neg & (s.raw_user == 1) & (s.ts == DAY + 50)
    drawn = set(s.raw_item[second].tolist())
    assert 11 not in drawn and drawn & {10, 12}
    check_histories(s, log)


@needs_tmall
def test_tmall_no_leakage(tmall: SampleSet, tmall_log: EventLog) -> None:
    check_histories(tmall, tmall_log)
    # Day resolution: the sample's own day is never in its history.
    nonempty = tmall.hist_end > tmall.hist_start
    assert (tmall.ev_ts[tmall.hist_end[nonempty] - 1] < tmall.ts[nonempty] // DAY * DAY).all()


@needs_tmall
def test_tmall_positives_and_labels(tmall: SampleSet, tmall_log: EventLog) -> None:
    check_positives(tmall, tmall_log)
    pos = tmall.labels.max(axis=1) > 0
    assert (tmall.labels[pos, 0] == 1).all()  # click covers every action
    np.testing.assert_array_equal(cvr_mask(tmall), tmall.labels[:, 0] == 1)
    buy = tmall.labels[:, tmall.task_names.index("buy")] == 1
    assert (buy <= cvr_mask(tmall)).all()  # CTCVR positives are clicks


@needs_tmall
def test_tmall_negatives(tmall: SampleSet, tmall_log: EventLog) -> None:
    check_negatives(tmall, tmall_log)
    pos = tmall.labels.max(axis=1) > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    assert n_neg > 3.9 * n_pos  # almost none dropped
    # Negatives share their positive's ts and history (each follows its positive).
    owner = np.maximum.accumulate(np.where(pos, np.arange(len(tmall)), 0))
    for name in ("ts", "hist_start", "hist_end", "user", "split"):
        np.testing.assert_array_equal(getattr(tmall, name), getattr(tmall, name)[owner])


@needs_tmall
def test_tmall_split_and_vocab(tmall: SampleSet, tmall_log: EventLog) -> None:
    split = tmall.time_split
    assert split is not None and split == default_split(tmall_log)
    assert split.valid_start % DAY == 0 and split.test_start % DAY == 0
    share_valid = np.mean((tmall_log.timestamp >= split.valid_start) & (tmall_log.timestamp < split.test_start))
    share_test = np.mean(tmall_log.timestamp >= split.test_start)
    assert 0.07 < share_valid < 0.13 and 0.07 < share_test < 0.13
    np.testing.assert_array_equal(tmall.split, split.assign(tmall.ts))
    assert tmall.split[tmall.ts < split.valid_start].max() == 0
    assert (tmall.split[tmall.ts >= split.test_start] == 2).all()
    train_events = tmall_log.timestamp < split.valid_start
    np.testing.assert_array_equal(tmall.schema.items.ids, np.unique(tmall_log.item_id[train_events]))
    np.testing.assert_array_equal(tmall.schema.users.ids, np.unique(tmall_log.user_id[train_events]))
    assert tmall.schema.categories.ids.tolist() == [0]  # Tmall's category 0 is a real id
    assert (tmall.category == 1).all()
    # Items first seen after valid_start are OOV.
    assert (tmall.item[~np.isin(tmall.raw_item, tmall.schema.items.ids)] == 0).all()
    assert (tmall.item[np.isin(tmall.raw_item, tmall.schema.items.ids)] > 0).all()
    summary = tmall.summary()
    assert sum(row["samples"] for row in summary.values()) == len(tmall)


@needs_tmall
def test_determinism_by_seed(tmall_log: EventLog, tmall: SampleSet) -> None:
    again = build_samples(tmall_log, seed=0)
    for name in SampleSet.SAMPLE_FIELDS:
        np.testing.assert_array_equal(getattr(again, name), getattr(tmall, name))
    assert again.schema.hash == tmall.schema.hash
    other = build_samples(tmall_log, seed=1)
    pos_a, pos_b = tmall.labels.max(axis=1) > 0, other.labels.max(axis=1) > 0
    np.testing.assert_array_equal(tmall.raw_item[pos_a], other.raw_item[pos_b])  # same positives
    assert not np.array_equal(tmall.raw_item[~pos_a][:1000], other.raw_item[~pos_b][:1000])


def test_synthetic_samples(synth: SampleSet, synth_log: EventLog) -> None:
    check_histories(synth, synth_log)
    check_negatives(synth, synth_log)
    check_positives(synth, synth_log)
    # Catalogue categories for positives and negatives alike.
    items, cats = synth.catalogue
    raw_cat = cats[np.searchsorted(items, synth.raw_item)]
    np.testing.assert_array_equal(synth.category, synth.schema.categories.lookup(raw_cat))
    exp_items, exp_cats = synth_log.item_catalogue()
    np.testing.assert_array_equal(items, exp_items)
    np.testing.assert_array_equal(cats, exp_cats)
    np.testing.assert_array_equal(synth.ev_item, synth.schema.items.lookup(synth_log.item_id))
    np.testing.assert_array_equal(synth.ev_category, synth.schema.categories.lookup(synth_log.category_id))
    assert synth.labels.dtype == np.float32 and synth.split.dtype == np.int8


def test_subset_and_part(synth: SampleSet) -> None:
    train = synth.part("train")
    assert len(train) == int((synth.split == 0).sum()) and (train.split == 0).all()
    assert train.ev_item is synth.ev_item and train.schema is synth.schema
    idx = np.arange(0, len(synth), 7)
    sub = synth.subset(idx)
    np.testing.assert_array_equal(sub.labels, synth.labels[idx])
    np.testing.assert_array_equal(sub.hist_end, synth.hist_end[idx])
    with pytest.raises(ValueError, match="unknown split"):
        synth.part("holdout")


def test_max_users(synth_log: EventLog) -> None:
    a = build_samples(synth_log, max_users=10, seed=4)
    b = build_samples(synth_log, max_users=10, seed=4)
    assert np.unique(a.raw_user).shape[0] == 10
    np.testing.assert_array_equal(a.raw_item, b.raw_item)
    sub = select_users(synth_log, 10, seed=4)
    assert set(np.unique(sub.user_id).tolist()) == set(np.unique(a.raw_user).tolist())
    for uid in np.unique(sub.user_id)[:3]:
        np.testing.assert_array_equal(sub.timestamp[sub.user_id == uid], synth_log.timestamp[synth_log.user_id == uid])


def test_default_split_fallbacks() -> None:
    def log_at(ts: list[int]) -> EventLog:
        n = len(ts)
        return EventLog.from_unsorted(np.arange(n) % 7, np.arange(n), np.zeros(n), np.zeros(n), ts)

    # Within one day: hour boundaries when they hit ~10% / ~10%.
    hours = log_at([100 + k for k in range(80)] + [3_700 + k for k in range(10)] + [7_300 + k for k in range(10)])
    assert default_split(hours) == TimeSplit(3_600, 7_200)
    # Two hours with no good hour boundary (the Taobao slice's case): minutes.
    minutes = log_at([60 * (k // 10) + k % 10 for k in range(1_000)])  # 10 events a minute for 100 minutes
    split = default_split(minutes)
    assert split == TimeSplit(80 * 60, 90 * 60)
    # Day-resolution data keeps day boundaries (Tmall).
    days = log_at([DAY * (k // 10) for k in range(300)])
    assert default_split(days) == TimeSplit(24 * DAY, 27 * DAY)
    with pytest.raises(ValueError, match="fewer than 3 distinct timestamps"):
        default_split(log_at([5, 6]))
    with pytest.raises(ValueError, match="after test_start"):
        TimeSplit(10, 5)


@pytest.mark.skipif(not SLICE.exists(), reason=f"Taobao slice not found at {SLICE} (set {DATA_ROOT_ENV})")
def test_taobao_slice_split_is_balanced() -> None:
    log = read_taobao(SLICE)
    split = default_split(log)  # 2 hours of data: minute boundaries
    share_test = np.mean(log.timestamp >= split.test_start)
    share_valid = np.mean(log.timestamp >= split.valid_start) - share_test
    assert split.valid_start % 60 == 0 and split.test_start % 60 == 0
    assert abs(share_valid - 0.1) < 0.05 and abs(share_test - 0.1) < 0.05


# ---------------------------------------------------------------------------------------------
# Feature specs: impressions as negatives, side features, custom tasks

from pathlib import Path  # noqa: E402

from feature_store.spec import FeatureSpec, SideFeatures  # noqa: E402
from feature_store.spec import stable_id_hash as id_hash  # noqa: E402
from models.data.events import Dataset  # noqa: E402
from models.data.readers import DataError, load_spec_dataset, preset_spec  # noqa: E402
from models.data.samples import SAMPLE_FIELDS, fit_side_features, parent_mask  # noqa: E402
from tests.shop_data import context_of, user_name, write_shop  # noqa: E402


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    spec_path = write_shop(tmp_path_factory.mktemp("shop"))
    return load_spec_dataset(FeatureSpec.load(spec_path), spec_path.parent)


@pytest.fixture(scope="module")
def shop_samples(shop: Dataset) -> SampleSet:
    return build_samples(shop, seed=0)


def test_shop_schema_and_labels(shop: Dataset, shop_samples: SampleSet) -> None:
    s = shop_samples
    spec = s.schema.spec
    assert spec.name == "shop" and spec.actions == ("view", "like", "buy") and spec.n_actions == 3
    assert spec.task_names == ("engage", "buy") and spec.task_parents() == (-1, 0)
    assert spec.id_types == ("string", "string")
    assert spec.scorer_inputs[-2:] == ("side_ids", "side_values")
    assert s.side_ids.shape == (len(s), spec.side.n_ids) == (len(s), 4)
    assert s.side_values.shape == (len(s), spec.side.n_values) == (len(s), 3)
    assert s.side_ids.dtype == np.int64 and s.side_values.dtype == np.float32
    assert {"side_ids", "side_values"} <= set(SAMPLE_FIELDS)
    check_histories_of(s, shop.events)
    # positives: (user, item, day) groups of the behaviours, labels from the spec's tasks
    ev = shop.events
    names = spec.actions
    frame = pd.DataFrame({"u": ev.user_id, "i": ev.item_id, "d": ev.timestamp // DAY, "t": ev.timestamp,
                          "a": [names[a] for a in ev.action]})
    groups = frame.groupby(["u", "i", "d"]).agg(t=("t", "min"), acts=("a", set)).reset_index()
    pos = s.labels.max(axis=1) > 0
    assert pos.sum() == len(groups)
    got = {(int(u), int(i), int(t)): tuple(lab) for u, i, t, lab in
           zip(s.raw_user[pos], s.raw_item[pos], s.ts[pos], s.labels[pos].tolist(), strict=True)}
    for row in groups.itertuples():
        assert got[(row.u, row.i, row.t)] == (1.0, float("buy" in row.acts))
    np.testing.assert_array_equal(parent_mask(s, "buy"), s.labels[:, 0] == 1)
    np.testing.assert_array_equal(cvr_mask(s), s.labels[:, 0] == 1)
    with pytest.raises(ValueError, match="has no parent"):
        parent_mask(s, "engage")


def check_histories_of(samples: SampleSet, log: EventLog) -> None:
    """Each sample's history is exactly its user's behaviours strictly before it (empty for none)."""
    for k in range(0, len(samples), 5):
        rows = np.flatnonzero((log.user_id == samples.raw_user[k]) & (log.timestamp < samples.ts[k]))
        assert samples.hist_end[k] - samples.hist_start[k] == rows.shape[0]
        if rows.shape[0]:
            np.testing.assert_array_equal(rows, np.arange(samples.hist_start[k], samples.hist_end[k]))


def test_impressions_are_the_negatives(shop: Dataset, shop_samples: SampleSet) -> None:
    s = shop_samples
    imp = shop.impressions
    assert imp is not None and len(imp) > 0
    groups = (
        pd.DataFrame({"u": imp.user_id, "i": imp.item_id, "d": imp.timestamp // DAY, "t": imp.timestamp})
        .groupby(["u", "i", "d"])["t"].min().reset_index()
    )
    engaged = set(zip(shop.events.user_id.tolist(), shop.events.item_id.tolist(),
                      (shop.events.timestamp // DAY).tolist(), strict=True))
    expected = {(r.u, r.i, r.t) for r in groups.itertuples() if (r.u, r.i, r.d) not in engaged}
    assert len(expected) < len(groups)  # some impressions were engaged that day: dropped
    neg = s.labels.max(axis=1) == 0
    got = set(zip(s.raw_user[neg].tolist(), s.raw_item[neg].tolist(), s.ts[neg].tolist(), strict=True))
    assert got == expected and int(neg.sum()) == len(expected)  # no popularity negatives at all
    # (user, time) order, as the event log
    key = np.lexsort((s.ts, s.raw_user))
    np.testing.assert_array_equal(key, np.arange(len(s)))
    assert s.time_split is not None
    np.testing.assert_array_equal(s.split, s.time_split.assign(s.ts))
    # the catalogue holds the items nobody touched; items only shown in training are in the vocabulary
    assert shop.items is not None
    items, _ = s.catalogue
    assert set(shop.items.ids.tolist()) <= set(items.tolist())
    shown = set(imp.item_id[imp.timestamp < s.time_split.valid_start].tolist())
    behaved = set(shop.events.item_id.tolist())
    assert shown - behaved and (shown - behaved) <= set(s.schema.items.ids.tolist())


def test_side_features_equal_encode_rows(shop: Dataset, shop_samples: SampleSet) -> None:
    s = shop_samples
    side = s.schema.spec.side
    assert shop.users is not None and shop.items is not None
    n = len(s)
    urow = {int(u): k for k, u in enumerate(shop.users.ids)}
    irow = {int(i): k for k, i in enumerate(shop.items.ids)}

    def gather(table_cols: dict[str, np.ndarray], rows: list[int | None]) -> dict[str, list[object]]:
        return {name: [col[r] if r is not None else None for r in rows] for name, col in table_cols.items()}

    u_ids, u_vals = side.user.encode_rows(gather(shop.users.columns, [urow.get(int(u)) for u in s.raw_user]), n)
    i_ids, i_vals = side.item.encode_rows(gather(shop.items.columns, [irow.get(int(i)) for i in s.raw_item]), n)
    names = {int(id_hash([user_name(u)])[0]): user_name(u) for u in range(200)}
    ctx = [context_of(names[int(u)], int(t)) for u, t in zip(s.raw_user, s.ts, strict=True)]
    c_ids, c_vals = side.context.encode_rows({k: [c[k] for c in ctx] for k in ("device", "hour")}, n)
    np.testing.assert_array_equal(s.side_ids, np.hstack([u_ids, i_ids, c_ids]) + side.id_offsets)
    np.testing.assert_array_equal(s.side_values, np.hstack([u_vals, i_vals, c_vals]))
    # users without a row (5 of them) carry the defaults, not zeros
    missing = np.asarray([urow.get(int(u)) is None for u in s.raw_user])
    assert missing.any()
    d_ids, d_vals = side.user.encode_rows({}, 1)
    assert (s.side_ids[missing, :1] == d_ids + side.id_offsets[:1]).all()
    assert (s.side_values[missing, :1] == d_vals).all() and (d_vals != 0).all()


def test_side_fit_equals_side_features_fit(shop: Dataset, shop_samples: SampleSet) -> None:
    split = shop_samples.time_split
    assert split is not None and shop.users is not None and shop.items is not None and shop.impressions is not None
    ev, imp = shop.events, shop.impressions
    train_ev, train_imp = ev.timestamp < split.valid_start, imp.timestamp < split.valid_start
    ctx = {k: np.concatenate([ev.context[k][train_ev], imp.context[k][train_imp]]) for k in ("device", "hour")}
    expected = SideFeatures.fit(shop.spec, {"user": shop.users.columns, "item": shop.items.columns, "context": ctx})
    assert shop_samples.schema.spec.side.to_dict() == expected.to_dict()
    assert fit_side_features(shop, ctx).to_dict() == expected.to_dict()


def test_popularity_negatives_share_their_positive_context(tmp_path: Path) -> None:
    spec_path = write_shop(tmp_path, users=20, items=60)
    text = spec_path.read_text().replace(", impression: [impression]", ", shown: [impression]")
    text = text.replace("positive: [view, like, buy]", "positive: [view, like, buy, shown]")
    spec_path.write_text(text)  # "shown" is a behaviour now: no impression action, popularity negatives
    ds = load_spec_dataset(FeatureSpec.load(spec_path), tmp_path)
    assert ds.impressions is None
    s = build_samples(ds, negatives_per_positive=3, seed=1)
    pos = s.labels.max(axis=1) > 0
    assert (~pos).sum() > 2.5 * pos.sum()
    owner = np.maximum.accumulate(np.where(pos, np.arange(len(s)), 0))
    ctx_cols = slice(s.side_ids.shape[1] - 1, None)  # device, the last categorical
    np.testing.assert_array_equal(s.side_ids[:, ctx_cols], s.side_ids[owner, ctx_cols])
    np.testing.assert_array_equal(s.side_values[:, -1], s.side_values[owner, -1])  # hour
    check_negatives(s, ds.events)


def test_max_users_keeps_their_impressions(shop: Dataset) -> None:
    s = build_samples(shop, max_users=10, seed=2)
    users = np.unique(s.raw_user)
    assert users.shape[0] == 10
    assert shop.impressions is not None
    assert ((s.labels.max(axis=1) == 0) <= np.isin(s.raw_user, users)).all()


@needs_tmall
def test_tmall_preset_equals_the_event_log_path(tmall: SampleSet) -> None:
    ds = load_spec_dataset(*preset_spec("tmall"))
    s = build_samples(ds, seed=0)
    for name in SAMPLE_FIELDS:
        np.testing.assert_array_equal(getattr(s, name), getattr(tmall, name))
    assert s.side_ids.shape == (len(s), 0) and s.schema.spec.scorer_inputs[-1] == "weekday"
    assert s.schema.spec.name == "tmall" and tmall.schema.spec.name == "default"
    assert s.schema.spec.to_dict() | {"name": "x"} == SchemaSpec().to_dict() | {"name": "x"}


def test_bad_inputs(shop: Dataset) -> None:
    with pytest.raises(TypeError, match="comes from the data set's feature spec"):
        build_samples(shop.events, SchemaSpec())  # type: ignore[arg-type]
    no_ctx = Dataset(shop.spec, shop.base, EventLog(shop.events.user_id, shop.events.item_id, shop.events.category_id,
                                                    shop.events.action, shop.events.timestamp))
    with pytest.raises(DataError, match="context feature 'device': the events have no column 'device'"):
        build_samples(no_ctx)
