"""Training samples from a data set: positives, negatives, labels, side features, a time split, no leakage.

- Positive: one per (user, item, calendar day UTC) group of behaviour events, at the group's
  first timestamp; task t's label is 1 if any event of the group has an action in t's positive
  actions (`SchemaSpec.task_action_matrix`; actions and tasks are the feature spec's).
- History of a sample: the user's behaviour events with timestamp strictly before the sample's,
  as the row range [hist_start, hist_end) of the (sorted) event log. Day-resolution sources
  (Tmall) thus never see the sample's own day.
- Negatives come from one of two sources:
  * Impressions, when the data set has them (the spec's impression action): one negative per
    (user, item, day) impression group, at its first timestamp, with the user's behaviours
    strictly before it as history and all labels 0; an impression whose (user, item, day) also
    has a behaviour event is dropped (that group is a positive). No popularity negatives are
    drawn then. The negatives are what was really shown, so the model's probabilities are
    calibrated to the shown traffic: p(click) estimates the click rate of an impression.
  * Popularity negatives, without impressions: `negatives_per_positive` per positive, drawn from
    item popularity^0.75 (counted before the validation start), never an item the user engaged
    with on the sample's day (an item of an earlier day is a valid negative: otherwise every
    negative's user-item cross features would be empty, a label shortcut); they share the
    positive's timestamp, history and context. Their labels are 0 by construction, not by
    observation, so the absolute level of a score depends on the sampling rate (more negatives
    per positive, lower scores); the order of the scores is what they are for: fine for ranking,
    not calibrated click rates.
- Labels over all samples: with ESMM parents a child task's label is over all samples (buy is
  CTCVR); its conditional rate is defined on the samples whose parent is positive (`cvr_mask`).
- Side features (`side_ids`, `side_values`, the scorer inputs of the same names): user and item
  features from the data set's tables (a user or item the table lacks gets the features'
  defaults), context features from the sample's event row: a positive's first event, a
  popularity negative's positive's, an impression negative's own impression row. Encoders are
  fitted on the whole user and item tables and on the training period's event rows (context).
- Vocabularies come from the training period's event rows only (behaviours, and impressions
  when present), so later unseen ids are OOV 0.

Everything is vectorized numpy (sorts, searchsorted, reduceat): tens of millions of events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pandas as pd

from feature_store.schema import FeatureSchema, SchemaSpec, Vocabulary
from feature_store.spec import (
    CategoricalEncoder,
    ContextFeatures,
    FeatureGroup,
    NumericEncoder,
    SideFeatures,
)
from models.data.events import Dataset, EventLog, SideTable, merge_catalogues, select_users
from models.data.readers import DataError, default_spec

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
    schema's vocabularies (0 = OOV); `catalogue` is (raw item ids, raw category ids) of every item
    of the events, the impressions and the item table. `side_ids` [N, n_ids] are the side
    features' codes with `schema.spec.side.id_offsets` applied, `side_values` [N, n_values] their
    normalized numeric values (order: user, item, context; zero columns without side features).
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
    side_ids: IntArray  # [N, n_ids]
    side_values: FloatArray  # [N, n_values]
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
        "side_ids",
        "side_values",
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




__all__ = [
    "SAMPLE_FIELDS",
    "SECONDS_PER_DAY",
    "SPLIT_NAMES",
    "SampleSet",
    "TimeSplit",
    "build_samples",
    "cvr_mask",
    "default_split",
    "encode_group",
    "fit_side_features",
    "parent_mask",
    "select_users",
]

SAMPLE_FIELDS = SampleSet.SAMPLE_FIELDS


def parent_mask(samples: SampleSet, task: str) -> npt.NDArray[np.bool_]:
    """Samples on which `task`'s conditional rate is defined: its ESMM parent's label is 1."""
    tasks = samples.schema.spec.tasks
    names = [t.name for t in tasks]
    if task not in names:
        raise ValueError(f"unknown task {task!r}; this schema has {names}")
    parent = tasks[names.index(task)].parent
    if parent is None:
        raise ValueError(f"task {task!r} has no parent: its rate is over all samples")
    return np.asarray(samples.labels[:, names.index(parent)] == 1, dtype=np.bool_)


def cvr_mask(samples: SampleSet, task: str | None = None) -> npt.NDArray[np.bool_]:
    """Samples on which a conditional rate (CVR) is defined: the parent of `task` is positive.

    Default task: the first task with a parent (the default tasks' cart and buy: click == 1;
    buy over all samples is CTCVR). A schema without parents falls back to a `click` task.
    """
    if task is None:
        task = next((t.name for t in samples.schema.spec.tasks if t.parent is not None), None)
        if task is None:
            if "click" not in samples.task_names:
                raise ValueError(f"CVR needs a task with a parent or a 'click' task; this schema has "
                                 f"{samples.task_names}")
            return np.asarray(samples.labels[:, samples.task_names.index("click")] == 1, dtype=np.bool_)
    return parent_mask(samples, task)


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


def _triple_key(
    user: IntArray, day: IntArray, item: IntArray, n_users: int, d0: int, n_days: int, n_items: int
) -> IntArray | None:
    """(user, day, item) packed into one int64 (day relative to d0), or None if it would overflow."""
    if n_users * n_days * n_items >= 2**62:
        return None
    return (user * n_days + (day - d0)) * n_items + item


def _in_groups(
    q: tuple[IntArray, IntArray, IntArray], ref: tuple[IntArray, IntArray, IntArray], n_users: int, n_items: int
) -> npt.NDArray[np.bool_]:
    """Which (user, day, item) triples of `q` occur in `ref`."""
    days = np.concatenate([q[1], ref[1]])
    d0 = int(days.min()) if days.shape[0] else 0
    n_days = int(days.max()) - d0 + 1 if days.shape[0] else 1
    kq = _triple_key(*q[:1], q[1], q[2], n_users, d0, n_days, n_items)
    kr = _triple_key(ref[0], ref[1], ref[2], n_users, d0, n_days, n_items)
    if kq is not None and kr is not None:
        return np.asarray(np.isin(kq, kr), dtype=np.bool_)
    idx = pd.MultiIndex.from_arrays(list(q))
    return np.asarray(idx.isin(pd.MultiIndex.from_arrays(list(ref))), dtype=np.bool_)


def _history_end(
    ev_user: IntArray, ev_ts: IntArray, q_user: IntArray, q_ts: IntArray, n_users: int
) -> IntArray:
    """Per query: the first event row of its user at or after its timestamp (events sorted by user, ts)."""
    if q_user.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    t0 = min(int(ev_ts.min()) if ev_ts.shape[0] else 0, int(q_ts.min()))
    span = max(int(ev_ts.max()) if ev_ts.shape[0] else 0, int(q_ts.max())) - t0 + 1
    if n_users * span < 2**62:
        return np.searchsorted(ev_user * span + (ev_ts - t0), q_user * span + (q_ts - t0), side="left").astype(np.int64)
    start = np.searchsorted(ev_user, q_user, side="left")  # rare: a very long time span
    end = np.searchsorted(ev_user, q_user, side="right")
    out = [s + np.searchsorted(ev_ts[s:e], t, side="left") for s, e, t in zip(start, end, q_ts, strict=True)]
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Side features


def _distinct(col: npt.ArrayLike) -> tuple[IntArray, npt.NDArray[Any]]:
    """(codes, distinct values): code -1 is a missing value (None or NaN)."""
    codes, uniques = pd.factorize(np.asarray(col), use_na_sentinel=True)
    return np.asarray(codes, dtype=np.int64), np.asarray(uniques, dtype=object)


def _fit_group(decl: ContextFeatures | None, columns: Mapping[str, npt.NDArray[Any]]) -> FeatureGroup:
    """`SideFeatures.fit` for one group, the same encoders, fitted per distinct value (large columns)."""
    if decl is None:
        return FeatureGroup()
    cats = []
    for d in decl.categorical:
        col = columns.get(d.name)
        if col is None or col.shape[0] == 0:
            cats.append(CategoricalEncoder.fit(d, ()))
            continue
        codes, uniques = _distinct(col)
        counts = np.bincount(codes[codes >= 0], minlength=uniques.shape[0])
        cats.append(CategoricalEncoder.fit_counts(d, uniques.tolist(), counts.tolist()))
    nums = [
        NumericEncoder.fit(d, np.asarray(columns[d.name], dtype=np.float64) if d.name in columns else ())
        for d in decl.numeric
    ]
    return FeatureGroup(tuple(cats), tuple(nums))


def encode_group(group: FeatureGroup, columns: Mapping[str, npt.ArrayLike], n: int) -> tuple[IntArray, FloatArray]:
    """`group.encode_rows(columns, n)`, with each categorical value encoded once (`pd.factorize`)."""
    ids = np.zeros((n, len(group.categorical)), dtype=np.int64)
    values = np.zeros((n, len(group.numeric)), dtype=np.float32)
    for j, cat in enumerate(group.categorical):
        col = columns.get(cat.name)
        if col is None:
            ids[:, j] = cat.encode_one(None)
            continue
        codes, uniques = _distinct(col)
        table = np.r_[cat.encode(uniques.tolist()), cat.encode_one(None)].astype(np.int64)
        ids[:, j] = table[codes]  # code -1 reads the trailing missing-value code
    for j, num in enumerate(group.numeric):
        col = columns.get(num.name)
        values[:, j] = num.encode(np.asarray(col, dtype=np.float64) if col is not None else [None] * n)
    return ids, values


def fit_side_features(
    dataset: Dataset, context_columns: Mapping[str, npt.NDArray[Any]] | None = None
) -> SideFeatures:
    """Side-feature encoders of a data set: user and item features on their whole tables, context
    features on `context_columns` (`build_samples` passes the training period's event rows;
    default: every behaviour and impression row)."""
    spec = dataset.spec
    if context_columns is None:
        imps = dataset.impressions
        context_columns = {
            name: np.concatenate([col, imps.context[name]]) if imps is not None and name in imps.context else col
            for name, col in dataset.events.context.items()
        }
    return SideFeatures(
        user=_fit_group(spec.user_features, dataset.users.columns if dataset.users is not None else {}),
        item=_fit_group(spec.item_features, dataset.items.columns if dataset.items is not None else {}),
        context=_fit_group(spec.context_features, context_columns),
    )


def _table_codes(
    group: FeatureGroup, table: SideTable | None, raw_ids: IntArray
) -> tuple[IntArray, FloatArray]:
    """Codes and values of each raw id's table row (its group's defaults when the table lacks it),
    indexed like `raw_ids`; the table is encoded once."""
    n_ids = raw_ids.shape[0]
    if not group.names:
        return np.zeros((n_ids, 0), dtype=np.int64), np.zeros((n_ids, 0), dtype=np.float32)
    n = len(table) if table is not None else 0
    codes, values = encode_group(group, table.columns if table is not None else {}, n)
    d_codes, d_values = group.encode_rows({}, 1)
    codes, values = np.vstack([codes, d_codes]), np.vstack([values, d_values])
    rows = table.rows_of(raw_ids) if table is not None else np.zeros(n_ids, dtype=np.int64)
    return codes[rows], values[rows]


def _gather_context(
    names: tuple[str, ...], events: EventLog, impressions: EventLog | None, ev_rows: IntArray, imp_rows: IntArray
) -> dict[str, npt.NDArray[Any]]:
    """Context values of event rows `ev_rows`, then of impression rows `imp_rows`, by feature name."""
    out: dict[str, npt.NDArray[Any]] = {}
    for name in names:
        if name not in events.context:
            raise DataError(f"context feature {name!r}: the events have no column {name!r}")
        parts = [events.context[name][ev_rows]]
        if imp_rows.shape[0]:
            assert impressions is not None
            if name not in impressions.context:
                raise DataError(f"context feature {name!r}: the impressions have no column {name!r}")
            parts.append(impressions.context[name][imp_rows])
        out[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return out


def _side_rows(
    side: SideFeatures,
    tables: tuple[tuple[IntArray, FloatArray], tuple[IntArray, FloatArray], tuple[IntArray, FloatArray]],
    index: tuple[IntArray, IntArray, IntArray],
) -> tuple[IntArray, FloatArray]:
    """`side_ids` (offsets applied) and `side_values` of the samples: row index[g][k] of group g's
    encoded table (users, items, context sources) for sample k, written into one array each."""
    n = index[0].shape[0]
    side_ids = np.empty((n, side.n_ids), dtype=np.int64)
    side_values = np.empty((n, side.n_values), dtype=np.float32)
    offsets = side.id_offsets
    at_id = at_value = 0
    for (ids, values), rows in zip(tables, index, strict=True):
        c, v = ids.shape[1], values.shape[1]
        if c:
            side_ids[:, at_id : at_id + c] = (ids + offsets[at_id : at_id + c])[rows]
        if v:
            side_values[:, at_value : at_value + v] = values[rows]
        at_id, at_value = at_id + c, at_value + v
    return side_ids, side_values


# ---------------------------------------------------------------------------------------------
# Samples


def build_samples(
    dataset: Dataset | EventLog,
    split: TimeSplit | None = None,
    negatives_per_positive: int = 4,
    seed: int = 0,
    max_users: int | None = None,
) -> SampleSet:
    """Positives, negatives (impressions, else popularity), labels, side features, split and
    vocabularies (see the module doc). An `EventLog` is read as a data set of the built-in
    click/cart/fav/buy spec (`readers.default_spec`). `negatives_per_positive` applies to
    popularity negatives only. `max_users` keeps a seeded subset of users (`select_users`)."""
    started = time.perf_counter()
    if isinstance(split, SchemaSpec):
        raise TypeError("build_samples(dataset, split=...): the schema comes from the data set's feature spec now")
    if isinstance(dataset, EventLog):
        dataset = Dataset(default_spec(), Path("."), dataset)
    if negatives_per_positive < 0:
        raise ValueError("negatives_per_positive must be >= 0")
    log_, imps = dataset.events, dataset.impressions
    if max_users is not None:
        log_ = select_users(log_, max_users, seed)
        if imps is not None and len(log_) != len(dataset.events):
            imps = imps.select(np.isin(imps.user_id, log_.user_offsets()[0]))
    if len(log_) == 0:
        raise ValueError("cannot build samples from an empty event log")
    if imps is not None and len(imps) == 0:
        log.warning("the spec has an impression action but the data has no impressions: popularity negatives")
        imps = None
    split = split if split is not None else default_split(log_)
    spec = dataset.spec
    base_schema = SchemaSpec.from_feature_spec(spec, None, dataset.id_types)
    ts = np.asarray(log_.timestamp, dtype=np.int64)
    action = np.asarray(log_.action, dtype=np.int64)
    if action.shape[0] and int(action.max()) >= base_schema.n_actions:
        raise ValueError(f"action code {int(action.max())} is not one of the spec's {base_schema.n_actions} actions")

    # Users: those with behaviours, plus those with impressions only (empty histories).
    ev_users, offsets = log_.user_offsets()
    if imps is None:
        users = ev_users
        ev_user = np.repeat(np.arange(users.shape[0], dtype=np.int64), np.diff(offsets))
        user_start = offsets[:-1]
    else:
        users = np.union1d(ev_users, imps.user_id)
        ev_user = np.searchsorted(users, log_.user_id).astype(np.int64)
        user_start = np.searchsorted(log_.user_id, users, side="left").astype(np.int64)
    n_users = int(users.shape[0])

    # Items: the events' catalogue, then the impressions' and the item table's other items.
    cat_items, cat_cats, ev_item_code = _catalogue_codes(log_)
    extra: list[tuple[IntArray, IntArray]] = []
    if imps is not None:
        extra.append(imps.item_catalogue())
    if dataset.items is not None:
        table = dataset.items
        table_cats = table.category_id if table.category_id is not None else np.zeros(len(table), dtype=np.int64)
        extra.append((table.ids, table_cats))
    if extra:
        ev_items = cat_items
        cat_items, cat_cats = merge_catalogues([(cat_items, cat_cats), *extra])
        ev_item_code = np.searchsorted(cat_items, ev_items)[ev_item_code]
    n_items = int(cat_items.shape[0])

    # Vocabularies from the training period only: later, unseen ids map to OOV 0.
    train_rows = ts < split.valid_start
    user_seen = np.bincount(ev_user[train_rows], minlength=n_users) > 0
    item_count = np.bincount(ev_item_code[train_rows], minlength=n_items)
    item_seen = item_count > 0
    train_cats = log_.category_id[train_rows]
    if imps is not None:
        imp_user = np.searchsorted(users, imps.user_id).astype(np.int64)
        imp_item = np.searchsorted(cat_items, imps.item_id).astype(np.int64)
        imp_train = imps.timestamp < split.valid_start
        user_seen |= np.bincount(imp_user[imp_train], minlength=n_users) > 0
        item_seen |= np.bincount(imp_item[imp_train], minlength=n_items) > 0
        train_cats = np.concatenate([train_cats, imps.category_id[imp_train]])

    # Positives: one per (user, item, day), at the group's first event.
    day = ts // SECONDS_PER_DAY
    order, starts = _group_first_rows(ev_user, day, ev_item_code, n_users, n_items)
    first_row = np.minimum.reduceat(order, starts) if starts.shape[0] else np.zeros(0, dtype=np.int64)
    pos_labels = _group_labels(base_schema.task_action_matrix(), action[order], starts)
    chrono = np.argsort(first_row)  # rows are (user, time) sorted, so this orders positives the same way
    first_row, pos_labels = first_row[chrono], pos_labels[chrono]
    n_pos = int(first_row.shape[0])
    pos_user, pos_item, pos_ts = ev_user[first_row], ev_item_code[first_row], ts[first_row]

    # History end: the first row of the user's run of events sharing the sample's timestamp.
    new_run = np.r_[True, (ev_user[1:] != ev_user[:-1]) | (ts[1:] != ts[:-1])]
    run_first = np.maximum.accumulate(np.where(new_run, np.arange(len(log_), dtype=np.int64), 0))
    pos_hist_end = run_first[first_row]
    n_tasks = len(base_schema.tasks)

    if imps is None:
        neg_owner, neg_item = _sample_negatives(
            pos_user, pos_ts, pos_item, item_count, n_users, negatives_per_positive, seed
        )
        n_neg = int(neg_owner.shape[0])
        # Samples: each positive followed by its kept negatives (neg_owner is sorted).
        kept = np.bincount(neg_owner, minlength=n_pos)
        per = 1 + kept  # samples per positive; per-positive values are np.repeat-ed by it
        pos_at = np.cumsum(per) - per  # where each positive lands
        neg_at = pos_at[neg_owner] + 1 + np.arange(n_neg, dtype=np.int64) - (np.cumsum(kept) - kept)[neg_owner]
        n_samples = n_pos + n_neg
        item_code = np.empty(n_samples, dtype=np.int64)
        item_code[pos_at], item_code[neg_at] = pos_item, neg_item
        labels = np.zeros((n_samples, n_tasks), dtype=np.float32)
        labels[pos_at] = pos_labels
        s_user = np.repeat(pos_user, per)
        s_ts = np.repeat(pos_ts, per)
        s_hist_end = np.repeat(pos_hist_end, per)
        # context sources: the positives' first rows; every sample reads its positive's
        src_ev, src_imp = first_row, np.zeros(0, dtype=np.int64)
        sample_src = np.repeat(np.arange(n_pos, dtype=np.int64), per)
    else:
        # Impression negatives: one per (user, item, day) impression group, at its first row,
        # unless that (user, item, day) is a positive.
        imp_ts = np.asarray(imps.timestamp, dtype=np.int64)
        imp_day = imp_ts // SECONDS_PER_DAY
        i_order, i_starts = _group_first_rows(imp_user, imp_day, imp_item, n_users, n_items)
        imp_first = np.sort(np.minimum.reduceat(i_order, i_starts)) if i_starts.shape[0] else i_starts
        engaged = _in_groups(
            (imp_user[imp_first], imp_day[imp_first], imp_item[imp_first]),
            (pos_user, pos_ts // SECONDS_PER_DAY, pos_item),
            n_users,
            n_items,
        )
        dropped = int(engaged.sum())
        imp_first = imp_first[~engaged]
        n_neg = int(imp_first.shape[0])
        log.info("impression negatives: %d, %d dropped (their user, item and day have a behaviour)", n_neg, dropped)
        neg_user, neg_ts = imp_user[imp_first], imp_ts[imp_first]
        neg_hist_end = _history_end(ev_user, ts, neg_user, neg_ts, n_users)
        # Positives and impression negatives in (user, time) order; a positive first at a tie.
        all_user = np.r_[pos_user, neg_user]
        all_ts = np.r_[pos_ts, neg_ts]
        is_neg = np.r_[np.zeros(n_pos, dtype=np.int8), np.ones(n_neg, dtype=np.int8)]
        merged = np.lexsort((np.arange(n_pos + n_neg), is_neg, all_ts, all_user))
        n_samples = n_pos + n_neg
        item_code = np.r_[pos_item, imp_item[imp_first]][merged]
        labels = np.zeros((n_samples, n_tasks), dtype=np.float32)
        labels[:n_pos] = pos_labels
        labels = labels[merged]
        s_user, s_ts = all_user[merged], all_ts[merged]
        s_hist_end = np.r_[pos_hist_end, neg_hist_end][merged]
        # context sources: the positives' first rows, then the negatives' own impression rows
        src_ev, src_imp = first_row, imp_first
        sample_src = merged.astype(np.int64)

    # Side features: fitted on the tables and on the training period's context, then encoded.
    ctx_decl = spec.context_features or ContextFeatures()
    ctx_names = tuple([d.name for d in ctx_decl.categorical] + [d.name for d in ctx_decl.numeric])
    train_ctx: dict[str, npt.NDArray[Any]] = {}
    for name in ctx_names:
        if name not in log_.context:
            raise DataError(f"context feature {name!r}: the events have no column {name!r}")
        parts = [log_.context[name][train_rows]]
        if imps is not None and name in imps.context:
            parts.append(imps.context[name][imp_train])
        train_ctx[name] = np.concatenate(parts)
    side = fit_side_features(dataset, train_ctx)
    # Each table is encoded once (users, catalogue items, context sources), then indexed per sample.
    n_src = src_ev.shape[0] + src_imp.shape[0]
    src_ctx = _gather_context(ctx_names, log_, imps, src_ev, src_imp) if ctx_names else {}
    side_ids, side_values = _side_rows(
        side,
        (
            _table_codes(side.user, dataset.users, users),
            _table_codes(side.item, dataset.items, cat_items),
            encode_group(side.context, src_ctx, n_src),
        ),
        (s_user, item_code, sample_src),
    )

    schema = FeatureSchema(
        SchemaSpec.from_feature_spec(spec, side, dataset.id_types),
        Vocabulary(users[user_seen]),
        Vocabulary(cat_items[item_seen]),
        Vocabulary(np.unique(train_cats)),
    )
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
        hist_start=user_start[s_user].astype(np.int64),
        hist_end=s_hist_end.astype(np.int64),
        user=user_dense[s_user],
        item=item_dense[item_code],
        category=item_cat_dense[item_code],
        ts=s_ts,
        labels=labels,
        split=split.assign(s_ts),
        raw_user=users[s_user],
        raw_item=cat_items[item_code],
        catalogue=(cat_items, cat_cats),
        side_ids=side_ids,
        side_values=side_values,
        time_split=split,
    )
    log.info(
        "built %d samples (%d positives, %d %s negatives) from %d events of %d users in %.1f s",
        len(samples),
        n_pos,
        n_neg,
        "impression" if imps is not None else "popularity",
        len(log_),
        n_users,
        time.perf_counter() - started,
        extra={"split": samples.summary()} if log.isEnabledFor(logging.INFO) else {},
    )
    return samples


def _group_labels(matrix: npt.NDArray[np.bool_], action: IntArray, starts: IntArray) -> npt.NDArray[np.bool_]:
    """[groups, tasks]: a group is positive for a task if any of its rows' actions is (rows in group order)."""
    n_tasks = matrix.shape[1]
    if starts.shape[0] == 0:
        return np.zeros((0, n_tasks), dtype=bool)
    if n_tasks <= 62:  # one int64 of task bits per row, OR-ed per group
        task_bits = (matrix.astype(np.int64) << np.arange(n_tasks, dtype=np.int64)).sum(axis=1)
        bits = np.bitwise_or.reduceat(task_bits[action], starts)
        return np.asarray((bits[:, None] >> np.arange(n_tasks)) & 1, dtype=bool)
    return np.asarray(np.maximum.reduceat(matrix[action].astype(np.uint8), starts, axis=0) > 0, dtype=bool)


def _sample_negatives(
    pos_user: IntArray,
    pos_ts: IntArray,
    pos_item: IntArray,
    item_count: IntArray,
    n_users: int,
    k: int,
    seed: int,
) -> tuple[IntArray, IntArray]:
    """(owner positive, item code) of each kept negative, drawn from popularity^0.75.

    A draw is rejected when the user engaged with the item on the positive's day (that (user,
    item, day) is a positive); rejected draws are redrawn a few rounds, then dropped. An item the
    user interacted with on an earlier day stays a valid negative: excluding those too would
    give every negative empty user-item cross features, which would then tell a returning
    positive from every negative by construction (a label shortcut, not behaviour).
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
    pos_day = pos_ts // SECONDS_PER_DAY
    positives = (pos_user, pos_day, pos_item)

    def valid(rows: IntArray, items: IntArray) -> npt.NDArray[np.bool_]:
        draws = (pos_user[owner[rows]], pos_day[owner[rows]], items)
        return np.asarray(~_in_groups(draws, positives, n_users, n_items), dtype=np.bool_)

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
