"""A deterministic synthetic event set at production scale (`rankserve synth`).

The generative model (docs/DATA.md has the full story):

- Catalogue: categories of power-law sizes; items inside a category have Zipf popularity.
- Users: each has a few interest categories (chosen by category size^0.5, so niche interests
  are common) with weights that drift linearly from a start mixture to an end mixture over
  the user's timeline; lifelong histories of `--events-per-user` events over 4-12 months.
- Sessions (~20 events): a session follows one interest, drawn from the weights at its start;
  inside it most events come from that interest, some from another of the user's interests,
  a few explore a category drawn by global popularity.
- Re-visits: 20% of events return to an item from the user's own past, at a log-uniform
  distance (often recent, sometimes months back).
- Actions: mostly clicks; cart, fav and buy are more likely on re-visits and in the user's
  strongest interest.

The planted signal: a user's next events concentrate on the categories and items of that
user's long-term history, which a sequence model can find and item popularity cannot.

Output: one `.npy` per EventLog column (narrow dtypes), `user_offsets.npy`, the catalogue
(`catalogue_item.npy`, `catalogue_category.npy`) and `meta.json`, written chunk by chunk into
preallocated memory-mapped files. Events are sorted by user, then strictly increasing time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from feature_store.schema import ACTION_CODE, ACTIONS
from models.data.events import EventLog

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
COLUMNS = ("user_id", "item_id", "category_id", "action", "timestamp")
CHUNK_EVENTS = 1 << 22  # events generated per vectorized step (~0.5 GB of temporaries)

# The generative model's constants (documented in docs/DATA.md).
END_TS = 1_735_689_600  # 2025-01-01 00:00:00 UTC: every user's timeline ends shortly before
SPAN_DAYS = (120.0, 365.0)  # length of a user's timeline
CATEGORY_SIZE_EXPONENT = 1.0  # category k (by size rank) holds ∝ (k+1)^-1 items
ITEM_ZIPF_EXPONENT = 1.05  # item j (by rank in its category) is drawn ∝ (j+1)^-1.05
INTEREST_CHOICE_POWER = 0.5  # interests are drawn ∝ category size^0.5
MIN_INTERESTS, MAX_INTERESTS = 2, 6
MEAN_SESSION_EVENTS = 20.0
MEAN_IN_SESSION_GAP_S = 45.0
P_SESSION_INTEREST = 0.75  # else another of the user's interests (uniformly)
P_EXPLORE = 0.10  # a category drawn by global popularity
P_REVISIT = 0.20  # an item from the user's own past
# Probabilities of cart / fav / buy: base, + in the strongest interest, + on a re-visit.
ACTION_RATES = {"cart": (0.004, 0.010, 0.020), "fav": (0.004, 0.006, 0.010), "buy": (0.006, 0.012, 0.030)}


@dataclass(frozen=True)
class SynthParams:
    """What a synthetic set is a deterministic function of."""

    users: int = 10_000
    items: int = 1_000_000
    categories: int = 5_000
    events_min: int = 10_000
    events_max: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.categories < 1 or self.events_min < 1:
            raise ValueError("users, categories and events per user must be positive")
        if self.items < self.categories:
            raise ValueError(f"need at least one item per category: {self.items} items < {self.categories} categories")
        if self.events_max < self.events_min:
            raise ValueError(f"bad events-per-user range {self.events_min}:{self.events_max}")


@dataclass(frozen=True, eq=False)
class _Catalogue:
    """Item index k: category `cat[k]`; items of a category are contiguous and by popularity rank."""

    cat: npt.NDArray[np.int64]  # category index of item index k
    cat_start: npt.NDArray[np.int64]  # first item index of each category (+ total at the end)
    item_cdf: npt.NDArray[np.float64]  # cat[k] + within-category cumulative share of item k
    cat_pop_cdf: npt.NDArray[np.float64]  # global category popularity, cumulative
    raw_item: npt.NDArray[np.int64]  # raw item id of item index k (a shuffle: ids do not reveal category)


@dataclass(frozen=True, eq=False)
class _Users:
    n_events: npt.NDArray[np.int64]
    interests: npt.NDArray[np.int64]  # [U, MAX_INTERESTS] category indices
    n_interests: npt.NDArray[np.int64]
    w_start: npt.NDArray[np.float64]  # [U, MAX_INTERESTS], zero beyond n_interests
    w_end: npt.NDArray[np.float64]
    top: npt.NDArray[np.int64]  # strongest interest's category
    end_ts: npt.NDArray[np.float64]
    span_s: npt.NDArray[np.float64]


def _catalogue(p: SynthParams) -> _Catalogue:
    rng = np.random.default_rng([p.seed, 0])
    share = (np.arange(p.categories) + 1.0) ** -CATEGORY_SIZE_EXPONENT
    share /= share.sum()
    # Every category gets one item, the rest go by share (largest remainders, deterministic).
    extra = share * (p.items - p.categories)
    sizes = np.floor(extra).astype(np.int64)
    short = (p.items - p.categories) - int(sizes.sum())
    sizes[np.argsort(-(extra - sizes), kind="stable")[:short]] += 1
    sizes += 1
    cat_start = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    cat = np.repeat(np.arange(p.categories, dtype=np.int64), sizes)
    rank = np.arange(p.items, dtype=np.int64) - cat_start[cat]
    w = (rank + 1.0) ** -ITEM_ZIPF_EXPONENT
    csum = np.cumsum(w)
    before = np.r_[0.0, csum][cat_start[:-1]]  # cumulative weight before each category
    total = csum[cat_start[1:] - 1] - before
    item_cdf = cat + (csum - before[cat]) / total[cat]  # category c's items lie in (c, c + 1]
    cat_pop_cdf = np.cumsum(sizes / sizes.sum())
    raw_item = rng.permutation(p.items).astype(np.int64) + 1
    return _Catalogue(cat, cat_start, item_cdf, cat_pop_cdf, raw_item)


def _users(p: SynthParams, cat: _Catalogue) -> _Users:
    rng = np.random.default_rng([p.seed, 1])
    u = p.users
    if p.events_max == p.events_min:
        n_events = np.full(u, p.events_min, dtype=np.int64)
    else:  # log-uniform per user
        lo, hi = math.log(p.events_min), math.log(p.events_max + 1)
        n_events = np.minimum(np.exp(rng.uniform(lo, hi, u)).astype(np.int64), p.events_max)
    sizes = np.diff(cat.cat_start).astype(np.float64)
    choice_cdf = np.cumsum(sizes**INTEREST_CHOICE_POWER)
    interests = np.searchsorted(choice_cdf, rng.random((u, MAX_INTERESTS)) * choice_cdf[-1], side="right")
    interests = np.minimum(interests, p.categories - 1).astype(np.int64)
    n_interests = rng.integers(MIN_INTERESTS, MAX_INTERESTS + 1, u).astype(np.int64)
    active = np.arange(MAX_INTERESTS)[None, :] < n_interests[:, None]
    w_start = rng.standard_exponential((u, MAX_INTERESTS)) * active  # Dirichlet(1) after normalizing
    w_end = rng.standard_exponential((u, MAX_INTERESTS)) * active
    w_start /= w_start.sum(axis=1, keepdims=True)
    w_end /= w_end.sum(axis=1, keepdims=True)
    top = interests[np.arange(u), np.argmax(w_start + w_end, axis=1)]
    span_s = rng.uniform(*SPAN_DAYS, u) * 86_400.0
    end_ts = END_TS - 3_600.0 - rng.exponential(6 * 3_600.0, u)  # all users are active near the end
    return _Users(n_events, interests, n_interests, w_start, w_end, top, end_ts, span_s)


def _sample_in_category(
    cat: _Catalogue, category: npt.NDArray[np.int64], u: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """Item index drawn by Zipf popularity inside each given category (inverse CDF, one searchsorted)."""
    k = np.searchsorted(cat.item_cdf, category + u, side="right")
    return np.clip(k, cat.cat_start[category], cat.cat_start[category + 1] - 1).astype(np.int64)


def _generate_chunk(
    p: SynthParams, cat: _Catalogue, users: _Users, u0: int, u1: int, chunk: int
) -> dict[str, npt.NDArray[Any]]:
    """Events of users [u0, u1): sorted by user, strictly increasing time per user."""
    rng = np.random.default_rng([p.seed, 2, chunk])
    counts = users.n_events[u0:u1]
    n = int(counts.sum())
    lu = np.repeat(np.arange(u1 - u0, dtype=np.int64), counts)  # local user of each event
    gu = lu + u0
    start = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    pos = np.arange(n, dtype=np.int64) - start[lu]  # position in the user's timeline
    tau = pos / np.maximum(counts - 1, 1)[lu]

    # Sessions, each following one interest drawn from the drifted weights at its start.
    new_sess = rng.random(n) < 1.0 / MEAN_SESSION_EVENTS
    new_sess[start] = True
    sess_first = np.flatnonzero(new_sess)
    sess_id = np.cumsum(new_sess) - 1
    s_user, s_tau = gu[sess_first], tau[sess_first][:, None]
    w = (1.0 - s_tau) * users.w_start[s_user] + s_tau * users.w_end[s_user]
    cw = np.cumsum(w, axis=1)
    sess_k = np.minimum(
        (cw < rng.random(len(sess_first))[:, None] * cw[:, -1:]).sum(axis=1), users.n_interests[s_user] - 1
    )
    other_k = (rng.random(n) * users.n_interests[gu]).astype(np.int64)
    k = np.where(rng.random(n) < P_SESSION_INTEREST, sess_k[sess_id], other_k)
    category = users.interests[gu, k]
    explore = rng.random(n) < P_EXPLORE
    category[explore] = np.minimum(
        np.searchsorted(cat.cat_pop_cdf, rng.random(int(explore.sum())), side="right"), p.categories - 1
    )
    item = _sample_in_category(cat, category, rng.random(n))

    # Re-visits: copy the item of an earlier event of the same user, log-uniform distance back.
    revisit = (rng.random(n) < P_REVISIT) & (pos > 0)
    back = np.floor(np.exp(rng.random(n) * np.log(pos + 1.0))).astype(np.int64)
    src = np.arange(n, dtype=np.int64)
    src[revisit] -= np.clip(back[revisit], 1, pos[revisit])
    while True:  # pointer jumping: a re-visit of a re-visit resolves to the original event
        nxt = src[src]
        if np.array_equal(nxt, src):
            break
        src = nxt
    item = item[src]
    category = cat.cat[item]

    # Actions: mostly clicks; rarer ones more likely on re-visits and in the strongest interest.
    is_top = (category == users.top[gu]).astype(np.float64)
    rev = revisit.astype(np.float64)
    r = rng.random(n)
    action = np.full(n, ACTION_CODE["click"], dtype=np.uint8)
    upper = np.zeros(n)
    for name in ("buy", "cart", "fav"):
        base, top_bonus, revisit_bonus = ACTION_RATES[name]
        lower, upper = upper, upper + base + top_bonus * is_top + revisit_bonus * rev
        action[(r >= lower) & (r < upper)] = ACTION_CODE[name]

    # Time: in-session gaps of ~45 s; session gaps scaled so each timeline spans the user's span.
    gap = np.where(new_sess, rng.standard_exponential(n), 1.0 + rng.standard_exponential(n) * MEAN_IN_SESSION_GAP_S)
    in_sum = np.bincount(lu, weights=np.where(new_sess, 0.0, gap), minlength=u1 - u0)
    sess_sum = np.bincount(lu, weights=np.where(new_sess, gap, 0.0), minlength=u1 - u0)
    scale = np.maximum(users.span_s[u0:u1] - in_sum, 0.0) / sess_sum
    gap = np.where(new_sess, gap * scale[lu], gap)
    csum = np.cumsum(gap)
    rel = csum - (csum[start] - gap[start])[lu]  # time since the user's timeline start
    ts = np.floor(users.end_ts[u0:u1] - users.span_s[u0:u1])[lu].astype(np.int64) + np.floor(rel).astype(np.int64)
    # Strictly increasing per user (unique, canonical order): running max of ts - pos, per user.
    x = ts - pos
    x0 = int(x.min())
    packed = np.maximum.accumulate((lu << 40) | (x - x0))
    ts = (packed & ((1 << 40) - 1)) + x0 + pos
    return {
        "user_id": gu + 1,
        "item_id": cat.raw_item[item],
        "category_id": category + 1,
        "action": action,
        "timestamp": ts,
    }


def _narrow(max_value: int) -> np.dtype[Any]:
    """The narrowest signed integer dtype holding 0..max_value."""
    for dt in (np.int16, np.int32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def generate(params: SynthParams, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Write the synthetic set to `out`; returns the metadata also written to meta.json."""
    started = time.perf_counter()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / META_FILE).unlink(missing_ok=True)  # meta.json is written last: it marks a complete set
    cat = _catalogue(params)
    users = _users(params, cat)
    total = int(users.n_events.sum())
    offsets = np.r_[0, np.cumsum(users.n_events)].astype(np.int64)
    dtypes = {
        "user_id": _narrow(params.users),
        "item_id": _narrow(params.items),
        "category_id": _narrow(params.categories),
        "action": np.dtype(np.uint8),
        "timestamp": _narrow(END_TS),
    }
    files = {c: np.lib.format.open_memmap(d / f"{c}.npy", mode="w+", dtype=dtypes[c], shape=(total,)) for c in COLUMNS}
    action_counts = np.zeros(len(ACTIONS), dtype=np.int64)
    item_counts = np.zeros(params.items + 1, dtype=np.int64)

    u0, chunk = 0, 0
    with tqdm(total=total, unit="ev", unit_scale=True, file=sys.stderr, disable=not progress, desc="synth") as bar:
        while u0 < params.users:
            # Whole users per chunk, as many as fit in CHUNK_EVENTS (at least one).
            u1 = max(int(np.searchsorted(offsets, offsets[u0] + CHUNK_EVENTS, side="right")) - 1, u0 + 1)
            cols = _generate_chunk(params, cat, users, u0, u1, chunk)
            lo, hi = int(offsets[u0]), int(offsets[u1])
            for c in COLUMNS:
                files[c][lo:hi] = cols[c]
            action_counts += np.bincount(cols["action"], minlength=len(ACTIONS))
            item_counts += np.bincount(cols["item_id"], minlength=params.items + 1)
            bar.update(hi - lo)
            u0, chunk = u1, chunk + 1
    for f in files.values():
        f.flush()
    del files

    order = np.argsort(cat.raw_item)
    np.save(d / "catalogue_item.npy", cat.raw_item[order].astype(dtypes["item_id"]))
    np.save(d / "catalogue_category.npy", (cat.cat[order] + 1).astype(dtypes["category_id"]))
    np.save(d / "user_offsets.npy", offsets)
    top1 = np.sort(item_counts)[::-1][: max(params.items // 100, 1)].sum() / max(total, 1)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "generator": "rankserve synth",
        "params": asdict(params),
        "seed": params.seed,
        "counts": {
            "events": total,
            "users": params.users,
            "items": params.items,
            "categories": params.categories,
            "items_with_events": int((item_counts > 0).sum()),
            "actions": {a: int(c) for a, c in zip(ACTIONS, action_counts, strict=True)},
            "top1pct_item_share": round(float(top1), 4),
        },
        "dtypes": {c: dt.str for c, dt in dtypes.items()},
        "chunks": chunk,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    (d / META_FILE).write_text(json.dumps(meta, indent=2))
    log.info(
        "wrote %d synthetic events (%d users, %d items, %d categories) to %s in %.1f s",
        total,
        params.users,
        params.items,
        params.categories,
        d,
        meta["elapsed_s"],
        extra={"counts": meta["counts"]},
    )
    return meta


def load_synthetic(directory: str | Path, max_users: int | None = None, seed: int = 0) -> EventLog:
    """The set as an EventLog (already sorted and unique). With `max_users`, a deterministic
    random subset of users whose rows alone are read from the memory-mapped columns."""
    d = Path(directory)
    try:
        meta = json.loads((d / META_FILE).read_text())
        cols = {c: np.load(d / f"{c}.npy", mmap_mode="r") for c in COLUMNS}
        offsets = np.load(d / "user_offsets.npy")
    except FileNotFoundError as exc:
        raise ValueError(
            f"{d} is not a complete synthetic set (missing {exc.filename}); run `rankserve synth`"
        ) from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d}: synthetic format version {meta.get('format_version')} != {FORMAT_VERSION}")
    n_users = offsets.shape[0] - 1
    if max_users is None or max_users >= n_users:
        rows: slice | npt.NDArray[np.int64] = slice(None)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(n_users, size=max_users, replace=False))
        lengths = offsets[chosen + 1] - offsets[chosen]
        rows = np.repeat(offsets[chosen] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
    return EventLog(
        np.asarray(cols["user_id"][rows], dtype=np.int64),
        np.asarray(cols["item_id"][rows], dtype=np.int64),
        np.asarray(cols["category_id"][rows], dtype=np.int64),
        np.asarray(cols["action"][rows], dtype=np.uint8),
        np.asarray(cols["timestamp"][rows], dtype=np.int64),
    )


# ---------------------------------------------------------------------------------------------
# CLI


def _events_per_user(text: str) -> tuple[int, int]:
    try:
        lo, sep, hi = text.partition(":")
        low = int(lo.replace("_", ""))
        high = int(hi.replace("_", "")) if sep else low
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX, got {text!r}") from exc
    if low < 1 or high < low:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return low, high


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--users", type=int, default=10_000, help="number of users (default 10,000)")
    parser.add_argument("--items", type=int, default=1_000_000, help="catalogue size (default 1,000,000)")
    parser.add_argument("--categories", type=int, default=5_000, help="number of categories (default 5,000)")
    parser.add_argument(
        "--events-per-user",
        type=_events_per_user,
        default=(10_000, 10_000),
        metavar="N|MIN:MAX",
        help="events per user: a number (default 10000) or a range MIN:MAX drawn log-uniformly per user",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same data")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    lo, hi = args.events_per_user
    try:
        params = SynthParams(args.users, args.items, args.categories, lo, hi, args.seed)
    except ValueError as exc:
        log.error("bad synth parameters: %s", exc)
        return 2
    generate(params, args.out, progress=not args.no_progress)
    return 0
