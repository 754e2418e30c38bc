"""Recsys-shaped request traffic for load tests: hot users, variable candidate counts, mixed arms.

Pure numpy, no Locust and no transport: the Locust users (`loadtest/locustfile.py`) and the
benchmark (`loadtest/bench.py`) draw requests from a `TrafficModel` and encode them themselves.

* users: Zipf-skewed over a known population (rank r is drawn with probability ∝ 1/(r+1)^s), so a
  few hot users take a large share of the requests, as in production, where a user scrolling a
  feed sends many requests in a row;
* candidates: the count is uniform in [min_candidates, max_candidates]; the items are a mix of
  Zipf-popular catalogue items (what a retrieval stage tends to return) and uniform ones
  (the long tail), without duplicates inside one request;
* arms: an optional weighted list of experiment arms; the arm goes into a request header or
  gRPC metadata key (`arm_header`) only when one is configured, since forcing an arm is an
  experiments feature of the service (leave it unset where the service has none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RankCall:
    """One request to send: the same fields over REST and gRPC."""

    user_id: int
    candidates: list[int]
    top_n: int
    arm: str | None
    request_time: int | None

    def json_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"user_id": self.user_id, "candidates": self.candidates, "top_n": self.top_n}
        if self.request_time is not None:
            body["request_time"] = self.request_time
        return body


def parse_arms(text: str | None) -> list[tuple[str, float]]:
    """"control:0.5,treatment:0.5" (weights optional, default 1) -> [(name, weight), ...]."""
    arms: list[tuple[str, float]] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        w = float(weight) if weight else 1.0
        if not name or w <= 0:
            raise ValueError(f"bad arm {part!r}: use name or name:weight with a positive weight")
        arms.append((name, w))
    return arms


@dataclass
class TrafficConfig:
    """What the traffic looks like; every field has a command-line twin in the locustfile."""

    users: Sequence[int]  # raw user ids, hottest first (rank order of the Zipf draw)
    items: Sequence[int]  # raw item ids, most popular first (a `range` for a contiguous catalogue)
    user_zipf: float = 1.1
    item_zipf: float = 1.05
    popular_share: float = 0.6  # share of candidates drawn by item popularity (the rest uniform)
    min_candidates: int = 100
    max_candidates: int = 1000
    top_n: int = 100
    arms: list[tuple[str, float]] = field(default_factory=list)
    request_time: int | None = None  # fixed request time (replayable histories); None: the server's now
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.users:
            raise ValueError("traffic needs at least one user id")
        n_items = len(self.items)
        if not 1 <= self.min_candidates <= self.max_candidates:
            raise ValueError(f"need 1 <= min_candidates <= max_candidates, got {self.min_candidates}, "
                             f"{self.max_candidates}")
        if self.max_candidates > n_items:
            raise ValueError(f"max_candidates {self.max_candidates} exceeds the {n_items} items of the catalogue")
        if not 0.0 <= self.popular_share <= 1.0:
            raise ValueError(f"popular_share must be in [0, 1], got {self.popular_share}")


def zipf_weights(n: int, s: float) -> npt.NDArray[np.float64]:
    """P(rank r) ∝ 1/(r+1)^s for r in 0..n-1, normalized."""
    w = 1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), s)
    out: npt.NDArray[np.float64] = w / w.sum()
    return out


class TrafficModel:
    """Draws `RankCall`s; one instance per load-generating user (each with its own RNG)."""

    def __init__(self, cfg: TrafficConfig) -> None:
        self.cfg = cfg
        self._rng = np.random.default_rng(cfg.seed)
        self._users = np.asarray(cfg.users, dtype=np.int64)
        self._user_cdf = np.cumsum(zipf_weights(self._users.shape[0], cfg.user_zipf))
        # a range stays a range (a million ids need no array); anything else becomes one
        self._items: range | I64 = cfg.items if isinstance(cfg.items, range) else np.asarray(cfg.items, np.int64)
        self._n_items = len(cfg.items)
        # popularity draws: inverse-CDF over at most 100k head items (the tail is covered by the
        # uniform share), so a million-item catalogue costs 800 KB and a searchsorted per draw
        self._item_cdf = np.cumsum(zipf_weights(min(self._n_items, 100_000), cfg.item_zipf))
        self._arm_names = [a for a, _ in cfg.arms]
        weights = np.asarray([w for _, w in cfg.arms], dtype=np.float64)
        self._arm_p = weights / weights.sum() if cfg.arms else None

    def user(self) -> int:
        rank = int(np.searchsorted(self._user_cdf, self._rng.random() * self._user_cdf[-1]))
        return int(self._users[min(rank, self._users.shape[0] - 1)])

    def candidates(self, n: int | None = None) -> list[int]:
        cfg = self.cfg
        if n is None:
            n = int(self._rng.integers(cfg.min_candidates, cfg.max_candidates + 1))
        n_pop = round(n * cfg.popular_share)
        ranks = np.searchsorted(self._item_cdf, self._rng.random(n_pop) * self._item_cdf[-1])
        picked = np.unique(np.r_[np.minimum(ranks, self._n_items - 1), self._rng.integers(0, self._n_items, n - n_pop)])
        while picked.shape[0] < n:  # duplicates collapsed: top up with uniform draws
            more = self._rng.integers(0, self._n_items, 2 * (n - picked.shape[0]))
            picked = np.unique(np.r_[picked, more])
        picked = self._rng.permutation(picked)[:n]
        if isinstance(self._items, range):
            return [self._items.start + self._items.step * int(x) for x in picked]
        return [int(x) for x in self._items[picked]]

    def arm(self) -> str | None:
        if self._arm_p is None:
            return None
        return self._arm_names[int(self._rng.choice(len(self._arm_names), p=self._arm_p))]

    def next_call(self) -> RankCall:
        return RankCall(self.user(), self.candidates(), self.cfg.top_n, self.arm(), self.cfg.request_time)


def write_population(path: Path, users: Sequence[int], items: Sequence[int]) -> None:
    """Save the user ids (hottest first) and item ids (most popular first) a load test draws from."""
    doc: dict[str, Any] = {"users": [int(u) for u in users]}
    if isinstance(items, range):
        doc["item_range"] = [items.start, items.stop, items.step]
    else:
        doc["items"] = [int(i) for i in items]
    path.write_text(json.dumps(doc))


def read_population(path: Path) -> tuple[list[int], Sequence[int]]:
    """(users, items) as written by `write_population`."""
    doc = json.loads(Path(path).read_text())
    users = [int(u) for u in doc["users"]]
    if "item_range" in doc:
        return users, range(*(int(x) for x in doc["item_range"]))
    return users, [int(i) for i in doc["items"]]
