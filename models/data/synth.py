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

Side features (drawn from their own random streams after the behaviour, which they leave
unchanged):

- Items: a brand (50; an item carries its category's house brand 60% of the time) and a
  log-normal price (category mean plus item noise), for every catalogue item plus 1% more items
  that never occur in an event.
- Users: a segment (8) and an age (correlated with the segment). A seeded segment x brand
  affinity gives each brand one segment that loves it; a user's segment is mostly the one that
  loves the house brand of the user's strongest interest, where users buy most, so a segment's
  users buy its loved brands more often than others.
- Context of each event: the device (ios, android, web; one per user and calendar day, UTC),
  the hour of day (UTC, from the timestamp) and the price band of the listing the event came
  from (`any`, or `band1`..`band5` when the user browsed a price-filtered listing).
- The planted context signal: (behaviour, device) is distributed as if each user-day's device
  were drawn first (DEVICE_PRIOR: ios 25%, android 55%, web 20%) and each event were a buy with
  the behaviour's buy probability times a device x price factor (`device_multiplier`): ios
  converts on items above the catalogue's mean log price, web on those below, android almost never. The
  factors average 1 over the devices at every price, so the price alone says nothing about a
  buy; the device says much, and much more together with the item's price (about 85% of buys
  are on the device that "owns" the item's price, against ~30% of clicks). The factors are near
  their bound (a factor cannot exceed 1 / prior): a conversion-only effect cannot plant more
  with three devices. The device is drawn from its posterior given the drawn behaviour
  (`_context_chunk`), which is what keeps the behaviour columns bit-identical to a set written
  without side features. It varies per user-day, so ids cannot learn it; it is fixed for a whole
  day so that a training sample (one per user, item and day, with the context of its first
  event) carries the device of its buy. A model without the context can only guess the device
  from the same day's earlier buys in the history.
- The planted engagement signal: 80% of events come from a listing filtered to one of five price
  bands (quintiles of the catalogue's standardized log price) and always touch an item of that
  band; the other 20% come from an unfiltered listing (`any`). The band is drawn after the
  behaviour, per event (`_context_chunk`), so the item draws are unchanged. A request's band
  says which items it can engage with at all, a signal on every task that ids and histories
  cannot carry (a session's category only loosely fixes its items' prices).

Output: one `.npy` per EventLog column (narrow dtypes) and per context column (`device.npy`,
`hour.npy`, uint8), `user_offsets.npy`, the catalogue (`catalogue_item.npy`,
`catalogue_category.npy`), `items.csv` (item_id, brand, price, category_id), `users.csv`
(user_id, segment, age), the feature specs `spec.yaml` (with the side features) and
`spec_noside.yaml` (without), and `meta.json` (last: it marks a complete set), written chunk by
chunk into preallocated memory-mapped files. Events are sorted by user, then strictly
increasing time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml
from tqdm import tqdm

from feature_store.schema import ACTION_CODE, ACTIONS
from feature_store.spec import FeatureSpec
from models.data.events import EventLog

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: items.csv, users.csv, the context columns and the spec files; 3: + price_band
READABLE_VERSIONS = (1, 2, 3)  # a version-1 set has the same behaviour columns and no side features
META_FILE = "meta.json"
COLUMNS = ("user_id", "item_id", "category_id", "action", "timestamp")
CONTEXT_COLUMNS = ("device", "hour", "price_band")  # per event, uint8 .npy files beside COLUMNS
CONTEXT_COLUMNS_V2 = ("device", "hour")  # what a version-2 set has
ITEMS_FILE, USERS_FILE = "items.csv", "users.csv"
SPEC_FILE, SPEC_NOSIDE_FILE = "spec.yaml", "spec_noside.yaml"
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

# Side features (separate random streams: the behaviour above does not depend on them).
SIDE_STREAM = 3  # Generator seeds [seed, 3, ...]; the behaviour uses [seed, 0], [seed, 1], [seed, 2, chunk]
EXTRA_ITEMS_SHARE = 0.01  # catalogue items beyond the event catalogue: features, never an event
N_BRANDS = 50
P_HOUSE_BRAND = 0.6  # an item carries its category's house brand, else a uniformly drawn one
PRICE_LOG_MEAN, PRICE_CATEGORY_SD, PRICE_ITEM_SD = 3.0, 0.8, 0.5  # log price = category mean + item noise
PRICE_TERCILES = (-0.4307, 0.4307)  # standard normal terciles of the standardized log price
N_SEGMENTS = 8
AFFINITY_NOISE_SD = 0.3  # log-normal noise of every segment x brand multiplier
AFFINITY_LOVED = 6.0  # each brand has one segment whose multiplier is 6x the others' (before normalizing)
SEGMENT_LOYALTY = 3.0  # a user's segment is drawn ∝ affinity[segment, house brand of the strongest interest]^3
AGE_BASE, AGE_PER_SEGMENT, AGE_SD = 24.0, 4.0, 7.0
DEVICES = ("ios", "android", "web")  # device.npy holds the index; load_synthetic gives the text
DEVICE_PRIOR = (0.25, 0.55, 0.20)  # of a user-day's device in the planted model (realized shares differ)
# Buy multiplier of device d for standardized log price z: exp(DEVICE_EFFECT[d] + DEVICE_PRICE_SIGN[d] x
# DEVICE_PRICE_SLOPE x z), scaled to average 1 over DEVICE_PRIOR at every price: ios buys expensive
# items (z > 0), web cheap ones (z < 0), android almost never. Near the bound: a multiplier cannot
# exceed 1 / prior, and at |z| >= 0.5 the owning device gets > 95% of its maximum.
DEVICE_EFFECT = (0.0, -6.0, 0.0)
DEVICE_PRICE_SIGN = (1.0, 0.0, -1.0)
DEVICE_PRICE_SLOPE = 8.0
PRICE_BANDS = ("any", "band1", "band2", "band3", "band4", "band5")  # price_band.npy holds the index
PRICE_BAND_EDGES = (-0.8416, -0.2533, 0.2533, 0.8416)  # standard normal quintiles of the standardized log price
P_UNFILTERED = 0.2  # share of events from a listing without a price filter (band "any")


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
) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Events of users [u0, u1): sorted by user, strictly increasing time per user.

    Also returns what the device is drawn from: each event's buy probability and its cart + fav
    probability (what the action draw used).
    """
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
    rates: dict[str, npt.NDArray[np.float64]] = {}
    for name in ("buy", "cart", "fav"):
        base, top_bonus, revisit_bonus = ACTION_RATES[name]
        rates[name] = base + top_bonus * is_top + revisit_bonus * rev
        lower, upper = upper, upper + rates[name]
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
    cols = {
        "user_id": gu + 1,
        "item_id": cat.raw_item[item],
        "category_id": category + 1,
        "action": action,
        "timestamp": ts,
    }
    return cols, rates["buy"], rates["cart"] + rates["fav"]


# ---------------------------------------------------------------------------------------------
# Side features: item attributes, user profiles, per-event context, and the planted signal


@dataclass(frozen=True, eq=False)
class _Items:
    """Attributes of every catalogue item, indexed by raw item id (index 0 unused)."""

    n_extra: int  # items after the event catalogue (ids items+1 ..): in items.csv, never in an event
    category: npt.NDArray[np.int64]  # raw category id
    house: npt.NDArray[np.int64]  # house brand of each raw category id
    brand: npt.NDArray[np.int64]  # brand index 0..N_BRANDS-1
    price: npt.NDArray[np.float64]  # rounded to cents, as written to items.csv
    z: npt.NDArray[np.float64]  # standardized log price (over the whole catalogue)
    device_factor: npt.NDArray[np.float64]  # [n + 1, 3] device_multiplier(z)
    price_bucket: npt.NDArray[np.int64]  # 0 cheap, 1 mid, 2 expensive
    price_band: npt.NDArray[np.int64]  # 1..5: the price quintile, as the index into PRICE_BANDS


@dataclass(frozen=True, eq=False)
class _Affinity:
    """The user segment x brand affinity, [N_SEGMENTS, N_BRANDS], mean 1 per brand."""

    matrix: npt.NDArray[np.float64]
    loved: npt.NDArray[np.int64]  # each brand's loved segment


def _items(p: SynthParams, cat: _Catalogue) -> _Items:
    rng = np.random.default_rng([p.seed, SIDE_STREAM, 0])
    n_extra = max(1, round(p.items * EXTRA_ITEMS_SHARE))
    total = p.items + n_extra
    category = np.zeros(total + 1, dtype=np.int64)
    category[cat.raw_item] = cat.cat + 1
    extra = np.searchsorted(cat.cat_pop_cdf, rng.random(n_extra), side="right")
    category[p.items + 1 :] = np.minimum(extra, p.categories - 1) + 1
    house = rng.integers(0, N_BRANDS, p.categories + 1)  # each category's house brand
    own = rng.random(total + 1) < P_HOUSE_BRAND
    brand = np.where(own, house[category], rng.integers(0, N_BRANDS, total + 1)).astype(np.int64)
    category_mu = rng.normal(PRICE_LOG_MEAN, PRICE_CATEGORY_SD, p.categories + 1)
    log_price = category_mu[category] + rng.normal(0.0, PRICE_ITEM_SD, total + 1)
    price = np.maximum(np.round(np.exp(log_price), 2), 0.01)
    lp = np.log(price)
    z = (lp - lp[1:].mean()) / lp[1:].std()
    band = np.searchsorted(np.asarray(PRICE_BAND_EDGES), z).astype(np.int64) + 1
    return _Items(n_extra, category, house, brand, price, z, device_multiplier(z), _price_bucket(z), band)


def _affinity(p: SynthParams) -> _Affinity:
    rng = np.random.default_rng([p.seed, SIDE_STREAM, 1])
    raw = np.exp(rng.normal(0.0, AFFINITY_NOISE_SD, (N_SEGMENTS, N_BRANDS)))
    loved = rng.integers(0, N_SEGMENTS, N_BRANDS).astype(np.int64)
    raw[loved, np.arange(N_BRANDS)] *= AFFINITY_LOVED
    return _Affinity(raw / raw.mean(axis=0, keepdims=True), loved)  # segments are equally likely a priori


def device_multiplier(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """[n, 3] factor on the buy probability of an item with standardized log price `z` per device.

    ios favours items above the mean log price (z > 0), web those below, android almost never
    converts; the factors average 1 over the device prior at every price, so the overall buy
    rate at each price is unchanged. At |z| >= 0.5 the favoured device's factor is within 0.1% of
    its bound 1 / prior and the others' are near 0.
    """
    slope = DEVICE_PRICE_SLOPE * np.asarray(DEVICE_PRICE_SIGN)
    w = np.exp(np.asarray(DEVICE_EFFECT)[None, :] + np.asarray(z, dtype=np.float64)[:, None] * slope[None, :])
    return np.asarray(w / (w @ np.asarray(DEVICE_PRIOR))[:, None], dtype=np.float64)


def _profiles(p: SynthParams, users: _Users, items: _Items, affinity: _Affinity) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """Segment and age of every user.

    A user's segment is drawn ∝ affinity[segment, b]^SEGMENT_LOYALTY for b the house brand of the
    user's strongest interest: mostly the segment that loves that brand. Users buy most in their
    strongest interest, so a segment's users buy the brands it loves more often than other brands.
    """
    rng = np.random.default_rng([p.seed, SIDE_STREAM, 2])
    logits = SEGMENT_LOYALTY * np.log(affinity.matrix[:, items.house[users.top + 1]].T)
    segment = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1).astype(np.int64)
    age = np.clip(np.round(rng.normal(AGE_BASE + AGE_PER_SEGMENT * segment, AGE_SD)), 16, 80).astype(np.int64)
    return segment, age


def _context_chunk(
    p: SynthParams,
    items: _Items,
    cols: dict[str, npt.NDArray[Any]],
    p_buy: npt.NDArray[np.float64],
    p_rest: npt.NDArray[np.float64],
    chunk: int,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The device (one per user and calendar day, UTC), the hour of day (UTC) and the price band
    of the listing of each event of a chunk.

    The behaviour is already drawn. A user-day's device is drawn from its posterior given the
    day's actions under the model "device ~ DEVICE_PRIOR, then each event is a buy with
    probability p_buy x device_multiplier(price)[device], a cart or fav with p_rest, else a
    click". The multipliers average 1 over the prior, so that model gives every event the
    behaviour's own action probabilities: (behaviour, device) is distributed (nearly: the model
    also couples the events of a day) as if drawn from it, and the behaviour columns stay
    exactly as they were. The price band is the event's item's own band, except for a
    P_UNFILTERED share of events drawn as unfiltered ("any"). Own generators per chunk; chunks
    hold whole users.
    """
    rng = np.random.default_rng([p.seed, SIDE_STREAM, 3, chunk])
    user, ts = cols["user_id"], cols["timestamp"]
    n = user.shape[0]
    day = ts // 86_400
    starts = np.flatnonzero(np.r_[True, (user[1:] != user[:-1]) | (day[1:] != day[:-1])])
    action = cols["action"][:, None]
    m = items.device_factor[cols["item_id"]]
    # log p(the event's action | device), up to a per-event constant: a buy's is log m, a cart's
    # or a fav's does not depend on the device, a click's is log(1 - p_rest - p_buy m).
    click = np.log(np.maximum(1.0 - p_rest[:, None] - p_buy[:, None] * m, 1e-9))
    buy = np.log(np.maximum(m, 1e-300))
    ll = np.where(action == ACTION_CODE["buy"], buy, np.where(action == ACTION_CODE["click"], click, 0.0))
    day_ll = np.add.reduceat(ll, starts, axis=0) + np.log(np.asarray(DEVICE_PRIOR))
    day_device = np.argmax(day_ll + rng.gumbel(size=day_ll.shape), axis=1)
    device = np.repeat(day_device, np.diff(np.r_[starts, n])).astype(np.uint8)
    hour = ((ts % 86_400) // 3_600).astype(np.uint8)
    unfiltered = np.random.default_rng([p.seed, SIDE_STREAM, 4, chunk]).random(n) < P_UNFILTERED
    price_band = np.where(unfiltered, 0, items.price_band[cols["item_id"]]).astype(np.uint8)
    return device, hour, price_band


def _price_bucket(z: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """0 cheap, 1 mid, 2 expensive: terciles of the standardized log price (about ±0.43)."""
    return np.searchsorted(np.asarray(PRICE_TERCILES), z).astype(np.int64)


def _write_table(path: Path, header: tuple[str, ...], columns: list[list[Any]]) -> None:
    with path.open("w") as f:
        f.write(",".join(header) + "\n")
        f.writelines(",".join(map(str, row)) + "\n" for row in zip(*columns, strict=True))


def spec_document(side: bool = True) -> dict[str, Any]:
    """The feature spec of a synthetic set (written as spec.yaml and, without side features, spec_noside.yaml)."""
    doc: dict[str, Any] = {
        "name": "synthetic" if side else "synthetic-noside",
        "events": {"path": ".", "format": "synthetic", "user": "user_id", "item": "item_id", "action": "action",
                   "timestamp": "timestamp", "category": "category_id"},
        "actions": {a: [code] for code, a in enumerate(ACTIONS)},
        "tasks": [
            {"name": "click", "positive": ["click", "cart", "fav", "buy"], "weight": 1.0},
            {"name": "cart", "positive": ["cart", "fav"], "parent": "click", "weight": 3.0},
            {"name": "buy", "positive": ["buy"], "parent": "click", "weight": 10.0},
        ],
    }
    if side:
        doc["item_features"] = {"path": ITEMS_FILE, "key": "item_id", "categorical": ["brand"],
                                "numeric": [{"name": "price", "log1p": True}]}
        doc["user_features"] = {"path": USERS_FILE, "key": "user_id", "categorical": ["segment"],
                                "numeric": ["age"]}
        doc["context_features"] = {"categorical": ["device", "price_band"], "numeric": ["hour"]}
    return doc


def write_specs(directory: str | Path) -> tuple[Path, Path]:
    """Write spec.yaml (with the side features) and spec_noside.yaml into a synthetic set's directory."""
    d = Path(directory)
    written = []
    for name, side in ((SPEC_FILE, True), (SPEC_NOSIDE_FILE, False)):
        doc = spec_document(side)
        FeatureSpec.parse(doc, name)  # refuse to write a spec the loader would refuse
        what = "with" if side else "without"
        head = f"# Feature spec of this synthetic set, {what} its side features (written by `rankserve synth`).\n"
        (d / name).write_text(head + yaml.safe_dump(doc, sort_keys=False))
        written.append(d / name)
    return written[0], written[1]


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
    items = _items(params, cat)
    affinity = _affinity(params)
    total = int(users.n_events.sum())
    offsets = np.r_[0, np.cumsum(users.n_events)].astype(np.int64)
    dtypes = {
        "user_id": _narrow(params.users),
        "item_id": _narrow(params.items),
        "category_id": _narrow(params.categories),
        "action": np.dtype(np.uint8),
        "timestamp": _narrow(END_TS),
        "device": np.dtype(np.uint8),
        "hour": np.dtype(np.uint8),
        "price_band": np.dtype(np.uint8),
    }
    files = {
        c: np.lib.format.open_memmap(d / f"{c}.npy", mode="w+", dtype=dtypes[c], shape=(total,))
        for c in (*COLUMNS, *CONTEXT_COLUMNS)
    }
    action_counts = np.zeros(len(ACTIONS), dtype=np.int64)
    item_counts = np.zeros(params.items + 1, dtype=np.int64)
    segment, age = _profiles(params, users, items, affinity)
    # Planted-signal tallies: (device, price tercile) and (loved pair or not) -> [events, buys].
    by_device_price = np.zeros((len(DEVICES), 3, 2), dtype=np.int64)
    by_affinity = np.zeros((2, 2), dtype=np.int64)
    by_price_band = np.zeros(len(PRICE_BANDS), dtype=np.int64)

    u0, chunk = 0, 0
    with tqdm(total=total, unit="ev", unit_scale=True, file=sys.stderr, disable=not progress, desc="synth") as bar:
        while u0 < params.users:
            # Whole users per chunk, as many as fit in CHUNK_EVENTS (at least one).
            u1 = max(int(np.searchsorted(offsets, offsets[u0] + CHUNK_EVENTS, side="right")) - 1, u0 + 1)
            cols, p_buy, p_rest = _generate_chunk(params, cat, users, u0, u1, chunk)
            cols["device"], cols["hour"], cols["price_band"] = _context_chunk(params, items, cols, p_buy, p_rest, chunk)
            lo, hi = int(offsets[u0]), int(offsets[u1])
            for c, f in files.items():
                f[lo:hi] = cols[c]
            action_counts += np.bincount(cols["action"], minlength=len(ACTIONS))
            item_counts += np.bincount(cols["item_id"], minlength=params.items + 1)
            is_buy = (cols["action"] == ACTION_CODE["buy"]).astype(np.int64)
            cell = cols["device"].astype(np.int64) * 6 + items.price_bucket[cols["item_id"]] * 2 + is_buy
            by_device_price += np.bincount(cell, minlength=by_device_price.size).reshape(by_device_price.shape)
            loved = affinity.loved[items.brand[cols["item_id"]]] == segment[cols["user_id"] - 1]
            by_affinity += np.bincount(loved * 2 + is_buy, minlength=4).reshape(2, 2)
            by_price_band += np.bincount(cols["price_band"], minlength=len(PRICE_BANDS))
            bar.update(hi - lo)
            u0, chunk = u1, chunk + 1
    for f in files.values():
        f.flush()
    del files

    order = np.argsort(cat.raw_item)
    np.save(d / "catalogue_item.npy", cat.raw_item[order].astype(dtypes["item_id"]))
    np.save(d / "catalogue_category.npy", (cat.cat[order] + 1).astype(dtypes["category_id"]))
    np.save(d / "user_offsets.npy", offsets)
    ids = np.arange(1, params.items + items.n_extra + 1)
    _write_table(
        d / ITEMS_FILE,
        ("item_id", "brand", "price", "category_id"),
        [ids.tolist(), [f"brand{b:02d}" for b in items.brand[1:].tolist()],
         [f"{x:.2f}" for x in items.price[1:].tolist()], items.category[1:].tolist()],
    )
    _write_table(
        d / USERS_FILE,
        ("user_id", "segment", "age"),
        [list(range(1, params.users + 1)), [f"seg{s}" for s in segment.tolist()], age.tolist()],
    )
    write_specs(d)
    top1 = np.sort(item_counts)[::-1][: max(params.items // 100, 1)].sum() / max(total, 1)

    def rate(tally: npt.NDArray[np.int64]) -> float:
        return round(float(tally[1] / max(tally.sum(), 1)), 5)

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
            "catalogue_items": params.items + items.n_extra,
            "extra_items": items.n_extra,
        },
        "side": {
            "brands": N_BRANDS,
            "segments": N_SEGMENTS,
            "devices": list(DEVICES),
            "buy_rate_by_device_price": {
                dev: dict(zip(("cheap", "mid", "expensive"), (rate(t) for t in by_device_price[k]), strict=True))
                for k, dev in enumerate(DEVICES)
            },
            "buy_rate_loved_brand": rate(by_affinity[1]),
            "buy_rate_other_brand": rate(by_affinity[0]),
            "price_band_share": {
                band: round(float(c / max(total, 1)), 5) for band, c in zip(PRICE_BANDS, by_price_band, strict=True)
            },
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


def load_synthetic(
    directory: str | Path,
    max_users: int | None = None,
    seed: int = 0,
    context: Iterable[str] | None = None,
) -> EventLog:
    """The set as an EventLog (already sorted and unique). With `max_users`, a deterministic
    random subset of users whose rows alone are read from the memory-mapped columns.

    `context`: the context columns to load (`device` and `price_band` as text, `hour` as
    float64), default all the set has; pass `()` to skip them. A set written before side
    features has none, one written before price bands has device and hour.
    """
    d = Path(directory)
    try:
        meta = json.loads((d / META_FILE).read_text())
        cols = {c: np.load(d / f"{c}.npy", mmap_mode="r") for c in COLUMNS}
        offsets = np.load(d / "user_offsets.npy")
    except FileNotFoundError as exc:
        raise ValueError(
            f"{d} is not a complete synthetic set (missing {exc.filename}); run `rankserve synth`"
        ) from exc
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{d}: synthetic format version {version} is not one of {list(READABLE_VERSIONS)}")
    available = CONTEXT_COLUMNS if version >= 3 else CONTEXT_COLUMNS_V2 if version == 2 else ()
    wanted = tuple(available if context is None else context)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise ValueError(
            f"{d}: no context column(s) {missing} in this synthetic set (it has {list(available)}); "
            "regenerate it with `rankserve synth` for device, hour and price_band"
        )
    n_users = offsets.shape[0] - 1
    if max_users is None or max_users >= n_users:
        rows: slice | npt.NDArray[np.int64] = slice(None)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(n_users, size=max_users, replace=False))
        lengths = offsets[chosen + 1] - offsets[chosen]
        rows = np.repeat(offsets[chosen] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
    ctx: dict[str, npt.NDArray[Any]] = {}
    for name in wanted:
        raw = np.load(d / f"{name}.npy", mmap_mode="r")[rows]
        if name in ("device", "price_band"):
            ctx[name] = np.asarray(DEVICES if name == "device" else PRICE_BANDS, dtype=object)[raw]
        else:
            ctx[name] = np.asarray(raw, dtype=np.float64)
    return EventLog(
        np.asarray(cols["user_id"][rows], dtype=np.int64),
        np.asarray(cols["item_id"][rows], dtype=np.int64),
        np.asarray(cols["category_id"][rows], dtype=np.int64),
        np.asarray(cols["action"][rows], dtype=np.uint8),
        np.asarray(cols["timestamp"][rows], dtype=np.int64),
        context=ctx,
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
