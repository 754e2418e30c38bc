"""The event log and the data set: the in-memory forms every reader produces and every consumer reads.

`EventLog`: columnar numpy arrays of raw ids, sorted by (user_id, timestamp, action, item_id) so
that a user's events are one contiguous, chronological slice, plus the raw request-context
columns of each row (`context`). `Dataset`: what a feature spec names, read: the behaviour events,
the impressions (shown, not engaged) when the spec has an impression action, the user table and
the item catalogue (`SideTable`), and the id types found. Torch-free: ingestion uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.spec import MAX_ACTIONS, FeatureSpec, IdType

IntArray = npt.NDArray[np.int64]


def _adjacent_differs(col: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """[n - 1] bool: row k + 1 differs from row k; two missing values (None, NaN) are equal."""
    if col.dtype.kind == "f":
        nan = np.isnan(col)
        return np.asarray((col[1:] != col[:-1]) & ~(nan[1:] & nan[:-1]), dtype=np.bool_)
    if col.dtype.kind == "O":
        import pandas as pd  # only for object columns; the event log itself stays pandas-free

        codes = pd.factorize(col, use_na_sentinel=True)[0]  # None and NaN share the sentinel -1
        return np.asarray(codes[1:] != codes[:-1], dtype=np.bool_)
    return np.asarray(col[1:] != col[:-1], dtype=np.bool_)


@dataclass(frozen=True, eq=False)
class EventLog:
    """Events, one row each, sorted by user then time.

    user_id, item_id, category_id: raw int64 ids (string ids already hashed). action: uint8 code,
    the action's position in the schema's actions (`FeatureSpec.behaviour_actions`); impression
    logs carry 0 there. timestamp: int64 unix seconds (day-resolution sources use the day's start,
    UTC). context: raw request-context columns aligned with the rows, by feature name: object
    arrays of text (None = missing) for categorical features, float64 (NaN = missing) for numeric.
    """

    user_id: npt.NDArray[np.int64]
    item_id: npt.NDArray[np.int64]
    category_id: npt.NDArray[np.int64]
    action: npt.NDArray[np.uint8]
    timestamp: npt.NDArray[np.int64]
    context: dict[str, npt.NDArray[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.user_id.shape[0]
        for name in ("item_id", "category_id", "action", "timestamp"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"EventLog column {name} has shape {getattr(self, name).shape}, expected ({n},)")
        for name, col in self.context.items():
            if col.shape != (n,):
                raise ValueError(f"EventLog context column {name!r} has shape {col.shape}, expected ({n},)")
        if n and int(self.action.max()) >= MAX_ACTIONS:
            raise ValueError(f"EventLog action codes must be < {MAX_ACTIONS}")

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
        context: dict[str, npt.NDArray[Any]] | None = None,
    ) -> EventLog:
        """Sort into canonical order and, by default, drop exact duplicate rows.

        A duplicate repeats every column of an earlier row, its context columns included: two
        events that differ only in context (say the device) are two events. Rows equal in the
        sort key keep their input order (the sort is stable), so the result is deterministic.
        """
        cols: list[npt.NDArray[Any]] = [
            np.asarray(user_id, dtype=np.int64),
            np.asarray(item_id, dtype=np.int64),
            np.asarray(category_id, dtype=np.int64),
            np.asarray(action, dtype=np.uint8),
            np.asarray(timestamp, dtype=np.int64),
        ]
        ctx = {name: np.asarray(col) for name, col in (context or {}).items()}
        u, i, c, a, t = cols
        order = np.lexsort((c, i, a, t, u))
        u, i, c, a, t = (col[order] for col in cols)
        ctx = {name: col[order] for name, col in ctx.items()}
        if dedup and len(u) > 1:
            keep = np.ones(len(u), dtype=bool)
            keep[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1]) | (c[1:] != c[:-1]) | (a[1:] != a[:-1]) | (t[1:] != t[:-1])
            for col in ctx.values():
                keep[1:] |= _adjacent_differs(col)
            u, i, c, a, t = u[keep], i[keep], c[keep], a[keep], t[keep]
            ctx = {name: col[keep] for name, col in ctx.items()}
        return cls(u, i, c, a, t, ctx)

    def user_offsets(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(unique user ids, CSR offsets): user k's events are rows offsets[k]:offsets[k+1]."""
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, self.user_id[1:] != self.user_id[:-1]])
        users = self.user_id[starts]
        offsets = np.r_[starts, len(self)].astype(np.int64)
        return users, offsets

    def select(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.integer]) -> EventLog:
        """Rows where a boolean mask is true, or the rows of an index array (order kept)."""
        return EventLog(
            self.user_id[mask],
            self.item_id[mask],
            self.category_id[mask],
            self.action[mask],
            self.timestamp[mask],
            {name: col[mask] for name, col in self.context.items()},
        )

    def item_catalogue(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(item ids, category ids): each item's category, taken from its latest event."""
        order = np.lexsort((self.timestamp, self.item_id))
        items = self.item_id[order]
        last = np.r_[items[1:] != items[:-1], True] if len(items) else np.zeros(0, dtype=bool)
        return items[last], self.category_id[order][last]


@dataclass(frozen=True, eq=False)
class SideTable:
    """A user table or an item catalogue: one row per id.

    ids: raw int64 ids, unique (string ids hashed exactly like the events'). columns: the
    declared features' raw values aligned with `ids` (object arrays of text, None = missing, for
    categorical features; float64, NaN = missing, for numeric ones). category_id: for an item
    catalogue that carries the events' category column, each item's raw category id (hashed like
    the events' when the column is text), which gives items without events a category.
    """

    ids: IntArray
    columns: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    category_id: IntArray | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        for name, col in self.columns.items():
            if col.shape != (n,):
                raise ValueError(f"SideTable column {name!r} has shape {col.shape}, expected ({n},)")
        if self.category_id is not None and self.category_id.shape != (n,):
            raise ValueError(f"SideTable category_id has shape {self.category_id.shape}, expected ({n},)")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows_of(self, raw_ids: npt.ArrayLike) -> IntArray:
        """Table row of each raw id; `len(self)` for ids the table does not have (the default row)."""
        raw = np.asarray(raw_ids, dtype=np.int64)
        n = len(self)
        if n == 0:
            return np.zeros(raw.shape, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        pos = np.minimum(np.searchsorted(sorted_ids, raw), n - 1)
        return np.where(sorted_ids[pos] == raw, order[pos], n).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A feature spec's data, read (`models.data.readers.load_spec_dataset`).

    spec: the feature spec; base: where its relative paths resolve. events: the behaviours, with
    action codes = positions in `spec.behaviour_actions`. impressions: the rows of the spec's
    impression action (action column 0), None when the spec has none. users, items: the side
    tables, None when the spec declares none. id_types: (user, item) id types, "auto" resolved
    ("string" when the ids were hashed). catalogue: a source's own (item ids, category ids)
    beyond the events, such as a synthetic set's whole catalogue; None when it has none.
    """

    spec: FeatureSpec
    base: Path
    events: EventLog
    impressions: EventLog | None = None
    users: SideTable | None = None
    items: SideTable | None = None
    id_types: tuple[IdType, IdType] = ("int", "int")
    catalogue: tuple[IntArray, IntArray] | None = None

    def item_catalogue(self) -> tuple[IntArray, IntArray]:
        """(item ids, category ids), sorted by id: every item of the events, the impressions, the
        item table and the source's catalogue. An item's category is its latest behaviour event's,
        else its latest impression's, else the item table's, else the source catalogue's, else 0."""
        parts: list[tuple[IntArray, IntArray]] = [self.events.item_catalogue()]
        if self.impressions is not None and len(self.impressions):
            parts.append(self.impressions.item_catalogue())
        if self.items is not None:
            cats = self.items.category_id if self.items.category_id is not None else np.zeros(len(self.items), np.int64)
            parts.append((self.items.ids, cats))
        if self.catalogue is not None:
            parts.append((np.asarray(self.catalogue[0], np.int64), np.asarray(self.catalogue[1], np.int64)))
        return merge_catalogues(parts)


def merge_catalogues(parts: list[tuple[IntArray, IntArray]]) -> tuple[IntArray, IntArray]:
    """Union of (item ids, category ids) tables, sorted by id; the first table naming an item wins."""
    if not parts:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    items = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts])
    cats = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])
    rank = np.concatenate([np.full(len(p[0]), k, dtype=np.int64) for k, p in enumerate(parts)])
    order = np.lexsort((rank, items))
    items, cats = items[order], cats[order]
    first = np.r_[True, items[1:] != items[:-1]] if len(items) else np.zeros(0, dtype=bool)
    return items[first], cats[first]


def select_users(log_: EventLog, max_users: int, seed: int = 0) -> EventLog:
    """A deterministic random subset of `max_users` users (all their events, order kept).

    The same users as `models.data.synth.load_synthetic(max_users=..., seed=...)` picks from a set
    whose every user has events: both choose among the sorted users with one seeded draw.
    """
    users, offsets = log_.user_offsets()
    if max_users >= users.shape[0]:
        return log_
    if max_users < 1:
        raise ValueError(f"max_users must be positive, got {max_users}")
    chosen = np.sort(np.random.default_rng(seed).choice(users.shape[0], size=max_users, replace=False))
    lengths = offsets[chosen + 1] - offsets[chosen]
    # Row indices of the chosen users' slices, without a per-user loop.
    rows = np.repeat(offsets[chosen] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
    return log_.select(rows)
