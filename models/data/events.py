"""The event log: the one in-memory form every reader produces and every consumer reads.

Columnar numpy arrays of raw ids, sorted by (user_id, timestamp, action, item_id) so that a
user's events are one contiguous, chronological slice. Torch-free: ingestion uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.schema import ACTIONS


@dataclass(frozen=True, eq=False)
class EventLog:
    """Behaviour events, one row each, sorted by user then time.

    user_id, item_id, category_id: raw int64 ids. action: uint8 code into `schema.ACTIONS`.
    timestamp: int64 unix seconds (day-resolution sources use the day's start, UTC).
    """

    user_id: npt.NDArray[np.int64]
    item_id: npt.NDArray[np.int64]
    category_id: npt.NDArray[np.int64]
    action: npt.NDArray[np.uint8]
    timestamp: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        n = self.user_id.shape[0]
        for name in ("item_id", "category_id", "action", "timestamp"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"EventLog column {name} has shape {getattr(self, name).shape}, expected ({n},)")
        if n and int(self.action.max()) >= len(ACTIONS):
            raise ValueError(f"EventLog action codes must be < {len(ACTIONS)}")

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    @classmethod
    def from_unsorted(
        cls,
        user_id: npt.ArrayLike,
        item_id: npt.ArrayLike,
        category_id: npt.ArrayLike,
        action: npt.ArrayLike,
        timestamp: npt.ArrayLike,
        dedup: bool = True,
    ) -> EventLog:
        """Sort into canonical order and, by default, drop exact duplicate rows."""
        cols: list[npt.NDArray[Any]] = [
            np.asarray(user_id, dtype=np.int64),
            np.asarray(item_id, dtype=np.int64),
            np.asarray(category_id, dtype=np.int64),
            np.asarray(action, dtype=np.uint8),
            np.asarray(timestamp, dtype=np.int64),
        ]
        u, i, c, a, t = cols
        order = np.lexsort((c, i, a, t, u))
        u, i, c, a, t = (col[order] for col in cols)
        if dedup and len(u) > 1:
            keep = np.ones(len(u), dtype=bool)
            keep[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1]) | (c[1:] != c[:-1]) | (a[1:] != a[:-1]) | (t[1:] != t[:-1])
            u, i, c, a, t = u[keep], i[keep], c[keep], a[keep], t[keep]
        return cls(u, i, c, a, t)

    def user_offsets(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(unique user ids, CSR offsets): user k's events are rows offsets[k]:offsets[k+1]."""
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, self.user_id[1:] != self.user_id[:-1]])
        users = self.user_id[starts]
        offsets = np.r_[starts, len(self)].astype(np.int64)
        return users, offsets

    def select(self, mask: npt.NDArray[np.bool_]) -> EventLog:
        """Rows where mask is true (order kept)."""
        return EventLog(
            self.user_id[mask], self.item_id[mask], self.category_id[mask], self.action[mask], self.timestamp[mask]
        )

    def item_catalogue(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(item ids, category ids): each item's category, taken from its latest event."""
        order = np.lexsort((self.timestamp, self.item_id))
        items = self.item_id[order]
        last = np.r_[items[1:] != items[:-1], True] if len(items) else np.zeros(0, dtype=bool)
        return items[last], self.category_id[order][last]
