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
    return build_samples(tmall_log, SPEC, seed=0)


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
    return build_samples(synth_log, SPEC, seed=0)


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
    """No negative's item was touched by its user before the end of the sample's day."""
    first = (
        pd.DataFrame({"u": log.user_id, "i": log.item_id, "t": log.timestamp})
        .groupby(["u", "i"])["t"]
        .min()
        .rename("first")
    )
    neg = samples.labels.max(axis=1) == 0
    df = pd.DataFrame({"u": samples.raw_user[neg], "i": samples.raw_item[neg], "ts": samples.ts[neg]})
    df = df.join(first, on=["u", "i"])
    day_end = (df["ts"] // DAY + 1) * DAY
    assert (df["first"].isna() | (df["first"] >= day_end)).all()


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
    s = build_samples(log, SPEC, split=TimeSplit(DAY, 2 * DAY), negatives_per_positive=0)
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


def test_tiny_log_negatives_exclude_items_seen_that_day() -> None:
    log = tiny_log()
    s = build_samples(log, SPEC, split=TimeSplit(10 * DAY, 20 * DAY), negatives_per_positive=20, seed=3)
    check_negatives(s, log)
    neg = s.labels.max(axis=1) == 0
    # User 1's first sample (day 0): items 10 and 12 were touched that day; only 11, 13, 14 are allowed.
    first = neg & (s.raw_user == 1) & (s.ts == 100)
    assert set(s.raw_item[first].tolist()) <= {11, 13, 14}
    assert first.sum() > 0
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
    again = build_samples(tmall_log, SPEC, seed=0)
    for name in SampleSet.SAMPLE_FIELDS:
        np.testing.assert_array_equal(getattr(again, name), getattr(tmall, name))
    assert again.schema.hash == tmall.schema.hash
    other = build_samples(tmall_log, SPEC, seed=1)
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
    a = build_samples(synth_log, SPEC, max_users=10, seed=4)
    b = build_samples(synth_log, SPEC, max_users=10, seed=4)
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
