"""The synthetic generator: deterministic, well-formed, skewed, and carrying the planted signal."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from models.data.events import EventLog
from models.data.synth import COLUMNS, META_FILE, SynthParams, generate, load_synthetic
from service.cli import main as cli_main

PARAMS = SynthParams(users=60, items=5_000, categories=60, events_min=100, events_max=3_000, seed=7)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    generate(PARAMS, d, progress=False)
    return d


@pytest.fixture(scope="module")
def log(synth_dir: Path) -> EventLog:
    return load_synthetic(synth_dir)


def test_same_seed_same_arrays(synth_dir: Path, tmp_path: Path) -> None:
    generate(PARAMS, tmp_path / "again", progress=False)
    for name in (*COLUMNS, "catalogue_item", "catalogue_category", "user_offsets"):
        a, b = np.load(synth_dir / f"{name}.npy"), np.load(tmp_path / "again" / f"{name}.npy")
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    other = SynthParams(**{**PARAMS.__dict__, "seed": 8})
    generate(other, tmp_path / "other", progress=False)
    assert not np.array_equal(
        np.load(synth_dir / "item_id.npy")[:1000], np.load(tmp_path / "other" / "item_id.npy")[:1000]
    )


def test_shapes_and_meta(synth_dir: Path, log: EventLog) -> None:
    meta = json.loads((synth_dir / META_FILE).read_text())
    n = meta["counts"]["events"]
    assert len(log) == n and meta["params"]["seed"] == 7 and meta["elapsed_s"] >= 0
    for name in COLUMNS:
        col = np.load(synth_dir / f"{name}.npy", mmap_mode="r")
        assert col.shape == (n,) and col.dtype.str == meta["dtypes"][name]
    offsets = np.load(synth_dir / "user_offsets.npy")
    users, log_offsets = log.user_offsets()
    np.testing.assert_array_equal(offsets, log_offsets)
    assert users.tolist() == list(range(1, PARAMS.users + 1))
    per_user = np.diff(offsets)
    assert per_user.min() >= PARAMS.events_min and per_user.max() <= PARAMS.events_max
    assert per_user.std() > 0  # a range draws different lengths
    assert sum(meta["counts"]["actions"].values()) == n
    counts = np.bincount(log.action, minlength=4)
    assert counts[0] / n > 0.85 and (counts[1:] > 0).all()  # mostly clicks, every action present


def test_histories_sorted_and_canonical(log: EventLog) -> None:
    same_user = log.user_id[1:] == log.user_id[:-1]
    assert (np.diff(log.user_id) >= 0).all()
    assert (np.diff(log.timestamp)[same_user] > 0).all()  # strictly increasing per user
    again = EventLog.from_unsorted(log.user_id, log.item_id, log.category_id, log.action, log.timestamp)
    assert len(again) == len(log)
    np.testing.assert_array_equal(again.item_id, log.item_id)


def test_catalogue_consistent(synth_dir: Path, log: EventLog) -> None:
    items = np.load(synth_dir / "catalogue_item.npy")
    cats = np.load(synth_dir / "catalogue_category.npy")
    assert items.tolist() == list(range(1, PARAMS.items + 1))
    np.testing.assert_array_equal(cats[log.item_id - 1], log.category_id)
    sizes = np.sort(np.bincount(cats))[::-1]
    assert sizes[0] > 10 * np.median(sizes)  # power-law category sizes
    assert set(np.unique(cats).tolist()) == set(range(1, PARAMS.categories + 1))


def test_popularity_skew(log: EventLog) -> None:
    counts = np.sort(np.bincount(log.item_id, minlength=PARAMS.items + 1)[1:])[::-1]
    top1 = counts[: PARAMS.items // 100].sum() / counts.sum()
    assert top1 > 0.15  # the top 1% of items draw far more than 1% of events


def test_planted_signal_beats_popularity(log: EventLog) -> None:
    """Each user's last 10% of events fall in that user's top categories far more than in the global top."""
    users, offsets = log.user_offsets()
    cut = offsets[:-1] + (0.9 * np.diff(offsets)).astype(np.int64)
    early = np.zeros(len(log), dtype=bool)
    for k in range(users.shape[0]):
        early[offsets[k] : cut[k]] = True
    global_top = np.argsort(np.bincount(log.category_id[early]))[::-1][:5]
    personal, popular, revisit = [], [], []
    for k in range(users.shape[0]):
        hist, future = slice(offsets[k], cut[k]), slice(cut[k], offsets[k + 1])
        top = np.argsort(np.bincount(log.category_id[hist]))[::-1][:5]
        personal.append(np.isin(log.category_id[future], top).mean())
        popular.append(np.isin(log.category_id[future], global_top).mean())
        revisit.append(np.isin(log.item_id[future], log.item_id[hist]).mean())
    assert np.mean(personal) > np.mean(popular) + 0.2
    assert np.mean(revisit) > 0.3


def test_load_subset_reads_only_chosen_users(synth_dir: Path, log: EventLog) -> None:
    sub = load_synthetic(synth_dir, max_users=5, seed=3)
    chosen = np.unique(sub.user_id)
    assert chosen.shape[0] == 5
    mask = np.isin(log.user_id, chosen)
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(sub, name), getattr(log, name)[mask])
    np.testing.assert_array_equal(load_synthetic(synth_dir, max_users=5, seed=3).item_id, sub.item_id)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures the root logger; give the other tests theirs back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--users", "3", "--items", "40", "--categories", "4"]
    assert cli_main([*argv, "--events-per-user", "10:30", "--seed", "2", "--no-progress"]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["params"] == {"users": 3, "items": 40, "categories": 4, "events_min": 10, "events_max": 30, "seed": 2}
    assert cli_main([*argv[:-1], "50", "--events-per-user", "10", "--no-progress"]) == 2  # items < categories
    with pytest.raises(SystemExit):
        cli_main([*argv, "--events-per-user", "30:10"])


def test_incomplete_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a complete synthetic set"):
        load_synthetic(tmp_path)
