"""Training samples from an event log: positives, sampled negatives, a time split, no leakage.

- Positive: one per (user, item, calendar day UTC) group of events, at the group's first
  timestamp; task t's label is 1 if any event of the group has an action in t's action set.
- History of a sample: the user's events with timestamp strictly before the sample's, as the
  row range [hist_start, hist_end) of the (sorted) event log. Day-resolution sources (Tmall) thus
  never see the sample's own day.
- Negatives: `negatives_per_positive` per positive, drawn from item popularity^0.75 (counted
  before the validation start), never an item the user interacted with at or before the
  sample's day; they share the positive's timestamp and history.
- Labels over all samples: `buy` is CTCVR (ESMM's pCTCVR target); CVR is `buy` restricted to
  samples with click = 1 (`cvr_mask`).
- Vocabularies come from events before the validation start only, so later unseen ids are OOV 0.

Everything is vectorized numpy (sorts, searchsorted, reduceat): tens of millions of events.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from feature_store.schema import ACTIONS, FeatureSchema, SchemaSpec, Vocabulary
from models.data.events import EventLog

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")
POPULARITY_POWER = 0.75  # word2vec-style smoothing: popular items dominate less
NEGATIVE_RESAMPLE_ROUNDS = 8
SPLIT_UNITS = (SECONDS_PER_DAY, 3_600, 60, 1)  # boundary resolutions default_split tries, coarsest first
SPLIT_TOLERANCE = 0.05  # accept a resolution when both shares are within this of their targets

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TimeSplit:
    """Samples with ts < valid_start train, ts < test_start validate, the rest test (unix seconds)."""

    valid_start: int
    test_start: int

    def __post_init__(self) -> None:
        if self.valid_start > self.test_start:
            raise ValueError(f"valid_start {self.valid_start} is after test_start {self.test_start}")

    def assign(self, ts: npt.ArrayLike) -> npt.NDArray[np.int8]:
        """0 train, 1 valid, 2 test for each timestamp."""
        t = np.asarray(ts, dtype=np.int64)
        return ((t >= self.valid_start).astype(np.int8) + (t >= self.test_start).astype(np.int8)).astype(np.int8)


def _pick_boundaries(counts: IntArray, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Unit indices (v, t), 0 < v < t < len(counts): the last units hold ~test, the ones before ~valid."""
    n_units = counts.shape[0]
    tail = np.cumsum(counts[::-1])[::-1] / counts.sum()  # tail[k]: share of events in units >= k
    t = 1 + int(np.argmin(np.abs(tail[1:] - test_fraction)))
    t = min(max(t, 2), n_units - 1)
    v = 1 + int(np.argmin(np.abs(tail[1:t] - (test_fraction + valid_fraction))))
    return v, t


def default_split(log_: EventLog, valid_fraction: float = 0.1, test_fraction: float = 0.1) -> TimeSplit:
    """Day boundaries (UTC) leaving ~10% of events for validation and the last ~10% for test.

    When whole days cannot get within `SPLIT_TOLERANCE` of both shares (a log spanning a few
    hours, like the Taobao slice), hour, then minute, then second boundaries are tried.
    """
    if len(log_) == 0:
        raise ValueError("cannot split an empty event log")
    ts = np.asarray(log_.timestamp, dtype=np.int64)
    best: TimeSplit | None = None
    for unit in SPLIT_UNITS:
        bucket = ts // unit
        lo = int(bucket.min())
        if int(bucket.max()) - lo > 50_000_000:  # too fine for a bincount; coarser units were tried
            break
        counts = np.bincount(bucket - lo)
        present = np.flatnonzero(counts)
        if present.shape[0] < 3:
            continue
        v, t = _pick_boundaries(counts[present].astype(np.int64), valid_fraction, test_fraction)
        best = TimeSplit(int(lo + present[v]) * unit, int(lo + present[t]) * unit)
        share_test = float(np.mean(ts >= best.test_start))
        share_valid = float(np.mean(ts >= best.valid_start)) - share_test
        if abs(share_test - test_fraction) <= SPLIT_TOLERANCE and abs(share_valid - valid_fraction) <= SPLIT_TOLERANCE:
            break
        log.info("split on %d s boundaries is off (valid %.3f, test %.3f): trying finer", unit, share_valid, share_test)
    if best is None:
        raise ValueError("cannot split: the events have fewer than 3 distinct timestamps")
    return best


@dataclass(frozen=True, eq=False)
class SampleSet:
    """Encoded events plus samples that point into them.

    Events are the log's rows in its order (sorted by user, time). Sample i's history is event
    rows [hist_start[i], hist_end[i]): the user's events with ts < ts[i]. Dense ids use the
    schema's vocabularies (0 = OOV); `catalogue` is (raw item ids, raw category ids).
    """

    schema: FeatureSchema
    ev_item: IntArray
    ev_category: IntArray
    ev_action: IntArray
    ev_ts: IntArray
    hist_start: IntArray
    hist_end: IntArray
    user: IntArray
    item: IntArray
    category: IntArray
    ts: IntArray
    labels: FloatArray  # [N, n_tasks]
    split: npt.NDArray[np.int8]  # 0 train, 1 valid, 2 test
    raw_user: IntArray
    raw_item: IntArray
    catalogue: tuple[IntArray, IntArray]
    time_split: TimeSplit | None = None

    # Per-sample fields: subset() slices these and shares everything else.
    SAMPLE_FIELDS: ClassVar[tuple[str, ...]] = (
        "hist_start",
        "hist_end",
        "user",
        "item",
        "category",
        "ts",
        "labels",
        "split",
        "raw_user",
        "raw_item",
    )

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.schema.spec.task_names

    def subset(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.integer]) -> SampleSet:
        """The samples selected by a boolean mask or an index array; events are shared."""
        sel = np.asarray(mask)
        return replace(self, **{name: getattr(self, name)[sel] for name in self.SAMPLE_FIELDS})

    def part(self, name: str) -> SampleSet:
        """The `train`, `valid` or `test` samples."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; use one of {SPLIT_NAMES}")
        return self.subset(self.split == SPLIT_NAMES.index(name))

    def summary(self) -> dict[str, dict[str, int]]:
        """Per split: samples, positives (any label 1), negatives, and positives per task."""
        k = len(SPLIT_NAMES)
        split = self.split.astype(np.int64)
        samples = np.bincount(split, minlength=k)
        positives = np.bincount(split, weights=self.labels.any(axis=1), minlength=k)
        per_task = [np.bincount(split, weights=self.labels[:, t], minlength=k) for t in range(self.labels.shape[1])]
        out: dict[str, dict[str, int]] = {}
        for s, name in enumerate(SPLIT_NAMES):
            row = {
                "samples": int(samples[s]),
                "positives": int(positives[s]),
                "negatives": int(samples[s] - positives[s]),
            }
            row.update({f"{task}_positives": int(per_task[t][s]) for t, task in enumerate(self.task_names)})
            out[name] = row
        return out


def cvr_mask(samples: SampleSet) -> npt.NDArray[np.bool_]:
    """Samples on which CVR is defined: click == 1 (buy over all samples is CTCVR)."""
    if "click" not in samples.task_names:
        raise ValueError(f"CVR needs a 'click' task; this schema has {samples.task_names}")
    return np.asarray(samples.labels[:, samples.task_names.index("click")] == 1, dtype=np.bool_)


def select_users(log_: EventLog, max_users: int, seed: int = 0) -> EventLog:
    """A deterministic random subset of `max_users` users (all their events, order kept)."""
    users, offsets = log_.user_offsets()
    if max_users >= users.shape[0]:
        return log_
    if max_users < 1:
        raise ValueError(f"max_users must be positive, got {max_users}")
    chosen = np.sort(np.random.default_rng(seed).choice(users.shape[0], size=max_users, replace=False))
    lengths = offsets[chosen + 1] - offsets[chosen]
    # Row indices of the chosen users' slices, without a per-user loop.
    rows = np.repeat(offsets[chosen] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
    return EventLog(
        log_.user_id[rows], log_.item_id[rows], log_.category_id[rows], log_.action[rows], log_.timestamp[rows]
    )


def _catalogue_codes(log_: EventLog) -> tuple[IntArray, IntArray, IntArray]:
    """`log_.item_catalogue()` (each item's category at its latest event) plus each event's index
    into it. One argsort instead of item_catalogue's two-key lexsort plus a searchsorted per event:
    the latest event of an item is its row with the largest (timestamp, row) pair, which is the
    row item_catalogue's stable lexsort puts last."""
    n = len(log_)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z
    order = np.argsort(log_.item_id)
    items = log_.item_id[order]
    new = np.r_[True, items[1:] != items[:-1]]
    starts = np.flatnonzero(new)
    codes = np.empty(n, dtype=np.int64)
    codes[order] = np.cumsum(new) - 1
    t0 = int(log_.timestamp.min())
    if (int(log_.timestamp.max()) - t0 + 1) * n < 2**63:
        packed = (log_.timestamp - t0) * n + np.arange(n, dtype=np.int64)
        latest = np.maximum.reduceat(packed[order], starts) % n
    else:  # packed key would overflow: the original two-key sort
        cat_items, cat_cats = log_.item_catalogue()
        return cat_items, cat_cats, codes
    return items[starts], np.asarray(log_.category_id[latest], dtype=np.int64), codes


def _group_first_rows(
    ev_user: IntArray, day: IntArray, ev_item: IntArray, n_users: int, n_items: int
) -> tuple[IntArray, IntArray]:
    """Rows grouped by (user, day, item): (rows in group order, where each group starts in it)."""
    d0 = int(day.min()) if day.shape[0] else 0
    n_days = int(day.max()) - d0 + 1 if day.shape[0] else 1
    if n_users * n_days * n_items < 2**62:
        key = (ev_user * n_days + (day - d0)) * n_items + ev_item
        order = np.argsort(key)
        sk = key[order]
        new = np.r_[True, sk[1:] != sk[:-1]]
    else:  # key would overflow: fall back to a multi-key sort
        order = np.lexsort((ev_item, day, ev_user))
        u, d, i = ev_user[order], day[order], ev_item[order]
        new = np.r_[True, (u[1:] != u[:-1]) | (d[1:] != d[:-1]) | (i[1:] != i[:-1])]
    return order.astype(np.int64), np.flatnonzero(new)


def build_samples(
    log_: EventLog,
    spec: SchemaSpec,
    split: TimeSplit | None = None,
    negatives_per_positive: int = 4,
    seed: int = 0,
    max_users: int | None = None,
) -> SampleSet:
    """Positives, popularity negatives, labels, split and vocabularies (see the module doc)."""
    started = time.perf_counter()
    if negatives_per_positive < 0:
        raise ValueError("negatives_per_positive must be >= 0")
    if max_users is not None:
        log_ = select_users(log_, max_users, seed)
    if len(log_) == 0:
        raise ValueError("cannot build samples from an empty event log")
    split = split if split is not None else default_split(log_)
    ts = np.asarray(log_.timestamp, dtype=np.int64)
    action = np.asarray(log_.action, dtype=np.int64)

    users, offsets = log_.user_offsets()
    n_users = int(users.shape[0])
    ev_user = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(offsets))
    cat_items, cat_cats, ev_item_code = _catalogue_codes(log_)
    n_items = int(cat_items.shape[0])

    # Vocabularies from the training period only: later, unseen ids map to OOV 0.
    train_rows = ts < split.valid_start
    user_seen = np.bincount(ev_user[train_rows], minlength=n_users) > 0
    item_count = np.bincount(ev_item_code[train_rows], minlength=n_items)
    schema = FeatureSchema(
        spec,
        Vocabulary(users[user_seen]),
        Vocabulary(cat_items[item_count > 0]),
        Vocabulary(np.unique(log_.category_id[train_rows])),
    )

    # Positives: one per (user, item, day), at the group's first event.
    day = ts // SECONDS_PER_DAY
    order, starts = _group_first_rows(ev_user, day, ev_item_code, n_users, n_items)
    first_row = np.minimum.reduceat(order, starts) if starts.shape[0] else np.zeros(0, dtype=np.int64)
    bits = np.bitwise_or.reduceat(np.left_shift(1, action)[order], starts) if starts.shape[0] else first_row
    chrono = np.argsort(first_row)  # rows are (user, time) sorted, so this orders positives the same way
    first_row, bits = first_row[chrono], bits[chrono]
    n_pos = int(first_row.shape[0])
    pos_user, pos_item, pos_ts = ev_user[first_row], ev_item_code[first_row], ts[first_row]

    # History end: the first row of the user's run of events sharing the sample's timestamp.
    new_run = np.r_[True, (ev_user[1:] != ev_user[:-1]) | (ts[1:] != ts[:-1])]
    run_first = np.maximum.accumulate(np.where(new_run, np.arange(len(log_), dtype=np.int64), 0))
    pos_hist_end = run_first[first_row]

    has_action = (bits[:, None] >> np.arange(len(ACTIONS))) & 1
    pos_labels = (has_action @ spec.task_action_matrix().astype(np.int64)) > 0

    # First interaction time of every (user, item) pair, from the positives (they cover every event).
    if n_users * n_items >= 2**63:
        raise ValueError(f"{n_users} users x {n_items} items overflow the int64 pair key")
    pair_key = pos_user * n_items + pos_item
    pair_order = np.argsort(pair_key, kind="stable")  # stable: the first of a pair is its earliest
    pk = pair_key[pair_order]
    pair_new = np.r_[True, pk[1:] != pk[:-1]] if n_pos else np.zeros(0, dtype=bool)
    pair_keys, pair_first_ts = pk[pair_new], pos_ts[pair_order][pair_new]

    neg_owner, neg_item = _sample_negatives(
        pos_user, pos_ts, item_count, pair_keys, pair_first_ts, negatives_per_positive, seed
    )

    # Samples: each positive followed by its kept negatives (neg_owner is sorted).
    kept = np.bincount(neg_owner, minlength=n_pos)
    per = 1 + kept  # samples per positive; per-positive values are np.repeat-ed by it
    pos_at = np.cumsum(per) - per  # where each positive lands
    neg_at = pos_at[neg_owner] + 1 + np.arange(neg_owner.shape[0], dtype=np.int64) - (np.cumsum(kept) - kept)[neg_owner]
    n_samples = n_pos + int(neg_owner.shape[0])
    item_code = np.empty(n_samples, dtype=np.int64)
    item_code[pos_at], item_code[neg_at] = pos_item, neg_item
    labels = np.zeros((n_samples, len(spec.tasks)), dtype=np.float32)
    labels[pos_at] = pos_labels

    # Dense ids through small per-user / per-catalogue-item tables: one lookup per distinct id.
    user_dense = schema.users.lookup(users)
    item_dense = schema.items.lookup(cat_items)
    item_cat_dense = schema.categories.lookup(cat_cats)
    samples = SampleSet(
        schema=schema,
        ev_item=item_dense[ev_item_code],
        ev_category=schema.categories.lookup(log_.category_id),
        ev_action=action,
        ev_ts=ts,
        hist_start=np.repeat(offsets[pos_user], per).astype(np.int64),
        hist_end=np.repeat(pos_hist_end, per),
        user=np.repeat(user_dense[pos_user], per),
        item=item_dense[item_code],
        category=item_cat_dense[item_code],
        ts=np.repeat(pos_ts, per),
        labels=labels,
        split=np.repeat(split.assign(pos_ts), per),
        raw_user=np.repeat(users[pos_user], per),
        raw_item=cat_items[item_code],
        catalogue=(cat_items, cat_cats),
        time_split=split,
    )
    log.info(
        "built %d samples (%d positives, %d negatives) from %d events of %d users in %.1f s",
        len(samples),
        n_pos,
        neg_owner.shape[0],
        len(log_),
        n_users,
        time.perf_counter() - started,
        extra={"split": samples.summary()} if log.isEnabledFor(logging.INFO) else {},
    )
    return samples


def _sample_negatives(
    pos_user: IntArray,
    pos_ts: IntArray,
    item_count: IntArray,
    pair_keys: IntArray,
    pair_first_ts: IntArray,
    k: int,
    seed: int,
) -> tuple[IntArray, IntArray]:
    """(owner positive, item code) of each kept negative, drawn from popularity^0.75.

    A draw is rejected when the user's first interaction with the item is before the end of the
    positive's day; rejected draws are redrawn a few rounds, then dropped.
    """
    n_items = int(item_count.shape[0])
    n = pos_user.shape[0] * k
    if n == 0 or n_items == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    weight = item_count.astype(np.float64) ** POPULARITY_POWER
    if weight.sum() == 0:  # no training events: fall back to uniform
        weight = np.ones(n_items)
    cdf = np.cumsum(weight)
    rng = np.random.default_rng(seed)

    def draw(size: int) -> IntArray:
        if size < n_items:  # few draws: inverse CDF
            at = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
            return np.asarray(np.minimum(at, n_items - 1), dtype=np.int64)
        # Many draws: per-item counts from one multinomial, then shuffled. O(size + n_items) and
        # cache-friendly, where a searchsorted per draw misses the cache on large catalogues.
        out = np.repeat(np.arange(n_items, dtype=np.int64), rng.multinomial(size, weight / weight.sum()))
        rng.shuffle(out)
        return out

    owner = np.repeat(np.arange(pos_user.shape[0], dtype=np.int64), k)
    day_end = (pos_ts // SECONDS_PER_DAY + 1) * SECONDS_PER_DAY

    def valid(rows: IntArray, items: IntArray) -> npt.NDArray[np.bool_]:
        key = pos_user[owner[rows]] * n_items + items
        at = np.minimum(np.searchsorted(pair_keys, key), max(pair_keys.shape[0] - 1, 0))
        seen = (pair_keys[at] == key) & (pair_first_ts[at] < day_end[owner[rows]])
        return np.asarray(~seen, dtype=np.bool_)

    item = draw(n)
    ok = valid(np.arange(n, dtype=np.int64), item)
    for _ in range(NEGATIVE_RESAMPLE_ROUNDS):
        bad = np.flatnonzero(~ok)
        if bad.shape[0] == 0:
            break
        item[bad] = draw(bad.shape[0])
        ok[bad] = valid(bad, item[bad])
    dropped = int((~ok).sum())
    if dropped:
        log.info("dropped %d negatives still invalid after %d redraws", dropped, NEGATIVE_RESAMPLE_ROUNDS)
    return owner[ok], item[ok]
