"""A small generic data set in a team's own format, for the feature-spec tests.

String user and item ids, custom action names (view, like, purchase) and an impression action,
an item catalogue with side features (including items nobody touched), a user table, and context
columns on every event row. Impressions come in pages of four items shown at one timestamp.
The context of an event is a function of (user, hour), so every
sample at one (user, timestamp) shares one context and a test can send it with the request.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

START_TS = 1_700_000_000
DEVICES = ("ios", "android", "web")
CITIES = ("paris", "lyon", "nice", "lille")
BRANDS = ("acme", "globex", "initech", "umbrella", "hooli")

SPEC_YAML = """\
name: shop
events: {path: events.csv, user: user_id, item: item_id, action: action, timestamp: ts, category: cat}
actions: {view: [view], like: [like], buy: [purchase], impression: [impression]}
tasks:
  - {name: engage, positive: [view, like, buy], weight: 1}
  - {name: buy, positive: [buy], parent: engage, weight: 10}
item_features: {path: items.csv, categorical: [brand, seller], numeric: [{name: price, log1p: true}]}
user_features: {path: users.csv, categorical: [city], numeric: [age]}
context_features: {categorical: [device], numeric: [hour]}
sequence: {max_length: 500, short_length: 10}
"""


def user_name(u: int) -> str:
    return f"u-{u:04d}"


def item_name(i: int) -> str:
    return f"sku-{i:05d}"


def context_of(user: str, ts: int) -> dict[str, str | float]:
    """The context of any event of `user` at `ts` (a function of the user and the hour)."""
    hour_index = ts // 3600
    return {"device": DEVICES[(sum(map(ord, user)) + hour_index) % len(DEVICES)], "hour": float(hour_index % 24)}


def write_shop(directory: Path, users: int = 60, items: int = 300, untouched_items: int = 20, seed: int = 0) -> Path:
    """Write events.csv, items.csv, users.csv and shop.yaml into `directory`; returns the spec path."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    category = rng.integers(0, 12, size=items + untouched_items)
    rows: list[tuple[str, str, str, int, int, str, float]] = []
    for u in range(users):
        user = user_name(u)
        ts = START_TS + int(rng.integers(0, 3 * 86_400))
        favourites = rng.choice(items, size=8, replace=False)
        for _ in range(int(rng.integers(20, 80))):
            ts += int(rng.exponential(4 * 3600))
            item = int(rng.choice(favourites)) if rng.random() < 0.6 else int(rng.integers(0, items))
            r = rng.random()
            ctx = context_of(user, ts)
            device, hour = str(ctx["device"]), float(ctx["hour"])
            if r < 0.45:  # a page of impressions shown together: one timestamp, one context
                for shown in rng.choice(items, size=4, replace=False):
                    rows.append((user, item_name(int(shown)), "impression", ts, int(category[shown]), device, hour))
                continue
            action = "view" if r < 0.85 else "like" if r < 0.95 else "purchase"
            rows.append((user, item_name(item), action, ts, int(category[item]), device, hour))
    with (directory / "events.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "action", "ts", "cat", "device", "hour"])
        w.writerows(rows)
    with (directory / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "brand", "seller", "price", "cat"])
        for i in range(items + untouched_items):
            w.writerow([item_name(i), BRANDS[i % len(BRANDS)], f"seller{i % 17}", round(float(rng.lognormal(3, 1)), 2),
                        int(category[i])])
    with (directory / "users.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "city", "age"])
        for u in range(users - 5):  # a few users have no row: they get the defaults
            w.writerow([user_name(u), CITIES[u % len(CITIES)], int(rng.integers(18, 70))])
    spec = directory / "shop.yaml"
    spec.write_text(SPEC_YAML)
    return spec
