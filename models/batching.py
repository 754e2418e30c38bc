"""Turn samples into model batches: right-aligned histories, gap buckets, history features.

The features are computed with the same functions the service uses (`feature_store.schema`), on
the same definition of history (the user's events strictly before the sample time, newest
`max_sequence_length` kept), so offline and online inputs agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import torch

from feature_store.schema import ACTIONS, SchemaSpec, cross_features_batch, time_gap_bucket, weekday
from models.data.samples import SampleSet
from models.model import Batch


class Collator:
    """Builds `Batch`es for index sets of one `SampleSet`."""

    def __init__(self, samples: SampleSet, spec: SchemaSpec, max_history: int) -> None:
        self.s = samples
        self.spec = spec
        self.max_history = max_history
        # Prefix counts of each action over the event rows: history counters become two lookups.
        one_hot = np.zeros((samples.ev_action.shape[0] + 1, len(ACTIONS)), dtype=np.int32)
        np.add.at(one_hot, (np.arange(1, one_hot.shape[0]), samples.ev_action), 1)
        self._action_prefix = np.cumsum(one_hot, axis=0, dtype=np.int32)

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
        user_dense = np.empty((idx.shape[0], len(ACTIONS) + 1), dtype=np.float32)
        user_dense[:, : len(ACTIONS)] = np.log1p(counts)
        user_dense[:, len(ACTIONS)] = np.log1p(end - start)

        # the searched window (training may search fewer behaviours than serving)
        lengths = np.minimum(end - start, self.max_history)
        width = max(int(lengths.max(initial=0)), 1)
        pos = end[:, None] - width + np.arange(width)[None, :]  # right-aligned: newest in the last column
        valid = pos >= (end - lengths)[:, None]
        rows = np.where(valid, pos, 0)
        gap = time_gap_bucket(ts[:, None] - s.ev_ts[rows], self.spec.time_gap_buckets)
        hist_item = np.where(valid, s.ev_item[rows], 0)
        hist_action = np.where(valid, s.ev_action[rows], 0)
        cross = cross_features_batch(hist_item, hist_action, s.ev_ts[rows], valid, s.item[idx], ts)

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
        )

    def batches(
        self, idx: npt.NDArray[np.int64], batch_size: int, shuffle_seed: int | None = None
    ) -> Iterator[tuple[npt.NDArray[np.int64], Batch]]:
        order = idx
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(idx)
        for lo in range(0, order.shape[0], batch_size):
            chunk = order[lo : lo + batch_size]
            yield chunk, self(chunk)
