"""Turn samples into model batches: right-aligned histories, gap buckets, history features.

The features are computed with the same functions the service uses (`feature_store.schema`), on
the same definition of history (the user's events strictly before the sample time, newest
`max_sequence_length` kept), so offline and online inputs agree. Side features (`side_ids`,
`side_values`) are per sample in the `SampleSet`, encoded and offset as the service sends them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import torch

from feature_store.schema import SchemaSpec, cross_features_of_matches, time_gap_bucket, weekday
from models.data.samples import SampleSet
from models.model import Batch


def _prefix_counts(actions: npt.NDArray[np.integer], n_actions: int) -> npt.NDArray[np.int32]:
    """[n + 1, A]: row r holds how often each action occurs in actions[:r]."""
    one_hot = np.zeros((actions.shape[0] + 1, n_actions), dtype=np.int32)
    np.add.at(one_hot, (np.arange(1, one_hot.shape[0]), actions), 1)
    return np.cumsum(one_hot, axis=0, dtype=np.int32)


class Collator:
    """Builds `Batch`es for index sets of one `SampleSet`."""

    def __init__(self, samples: SampleSet, spec: SchemaSpec, max_history: int) -> None:
        self.s = samples
        self.spec = spec
        self.max_history = max_history
        self.n_actions = spec.n_actions
        self.side_ids = self._side_field(samples, "side_ids", spec.side.n_ids)
        self.side_values = self._side_field(samples, "side_values", spec.side.n_values)
        # Prefix counts of each action over the event rows: history counters become two lookups.
        self._action_prefix = _prefix_counts(samples.ev_action, self.n_actions)
        # The user-item cross features read the whole served history, as serving does, not only
        # the window training searches (`max_history`): the event rows ordered by (item, row), so
        # one item's rows in a history window [start, end) are one searchsorted range, with prefix
        # counts of each action along that order and the events' times.
        n_rows = samples.ev_item.shape[0]
        self._row_span = n_rows + 1
        by_item = np.sort(samples.ev_item.astype(np.int64) * self._row_span + np.arange(n_rows, dtype=np.int64))
        rows = by_item % self._row_span
        self._by_item = by_item
        self._by_item_prefix = _prefix_counts(samples.ev_action[rows], self.n_actions)
        # a trailing -1: an empty range reads it (hi - 1 = -1) and means no match
        self._by_item_ts = np.r_[np.asarray(samples.ev_ts, dtype=np.int64)[rows], -1]

    @staticmethod
    def _side_field(samples: SampleSet, name: str, width: int) -> npt.NDArray[np.generic] | None:
        """The samples' `name` rows [N, width], or None when the schema has no such features."""
        if not width:
            return None
        rows = getattr(samples, name, None)
        n = samples.labels.shape[0]
        if rows is None or rows.shape != (n, width):
            found = "none" if rows is None else f"shape {tuple(rows.shape)}"
            raise ValueError(f"the schema needs {name} of shape ({n}, {width}) in the samples, found {found}")
        return np.asarray(rows)

    def history_window(self, idx: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(start, end) rows of each sample's served history: newest `max_sequence_length` before ts."""
        s = self.s
        end = s.hist_end[idx]
        start = np.maximum(s.hist_start[idx], end - self.spec.max_sequence_length)
        return start, end

    def __call__(self, idx: npt.NDArray[np.int64]) -> Batch:
        s = self.s
        ts = s.ts[idx]
        start, end = self.history_window(idx)
        # history counters over the whole served history
        counts = self._action_prefix[end] - self._action_prefix[start]
        n_actions = self.n_actions
        user_dense = np.empty((idx.shape[0], n_actions + 1), dtype=np.float32)
        user_dense[:, :n_actions] = np.log1p(counts)
        user_dense[:, n_actions] = np.log1p(end - start)

        # the searched window (training may search fewer behaviours than serving)
        lengths = np.minimum(end - start, self.max_history)
        width = max(int(lengths.max(initial=0)), 1)
        pos = end[:, None] - width + np.arange(width)[None, :]  # right-aligned: newest in the last column
        valid = pos >= (end - lengths)[:, None]
        rows = np.where(valid, pos, 0)
        gap = time_gap_bucket(ts[:, None] - s.ev_ts[rows], self.spec.time_gap_buckets)
        hist_item = np.where(valid, s.ev_item[rows], 0)
        hist_action = np.where(valid, s.ev_action[rows], 0)
        cross = self.cross_features(idx, start, end)

        def t(a: npt.NDArray[np.generic]) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a))

        return Batch(
            user=t(s.user[idx]),
            item=t(s.item[idx]),
            category=t(s.category[idx]),
            cand_cross=t(cross),
            hist_item=t(hist_item),
            hist_category=t(np.where(valid, s.ev_category[rows], 0)),
            hist_action=t(hist_action),
            hist_gap=t(np.where(valid, gap, 0)),
            hist_mask=t(valid.astype(np.float32)),
            user_dense=t(user_dense),
            weekday=t(weekday(ts)),
            side_ids=t(self.side_ids[idx].astype(np.int64)) if self.side_ids is not None else None,
            side_values=t(self.side_values[idx].astype(np.float32)) if self.side_values is not None else None,
        )

    def cross_features(
        self, idx: npt.NDArray[np.int64], start: npt.NDArray[np.int64], end: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float32]:
        """`cross_features` of samples `idx` over their history rows [start, end)."""
        cand = np.asarray(self.s.item[idx], dtype=np.int64)
        base = cand * self._row_span
        lo = np.searchsorted(self._by_item, base + start)
        hi = np.searchsorted(self._by_item, base + end)
        known = cand != 0  # the OOV item matches nothing
        counts = np.where(known[:, None], self._by_item_prefix[hi] - self._by_item_prefix[lo], 0)
        # the newest matching event is the last of the range: a user's rows are in time order
        latest = np.where(known & (hi > lo), self._by_item_ts[hi - 1], -1)
        return cross_features_of_matches(counts, latest, self.s.ts[idx])

    def batches(
        self, idx: npt.NDArray[np.int64], batch_size: int, shuffle_seed: int | None = None
    ) -> Iterator[tuple[npt.NDArray[np.int64], Batch]]:
        order = idx
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(idx)
        for lo in range(0, order.shape[0], batch_size):
            chunk = order[lo : lo + batch_size]
            yield chunk, self(chunk)
