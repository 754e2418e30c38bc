"""Sharded ingest without a server: `shard_of` partitions store keys (disjoint, covering, stable,
as documented), a shard's slice of the log is each user's newest events, and a bad `--shard`
is one error line naming the flag, exit 2, before anything connects."""

from __future__ import annotations

import hashlib
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ingest.bulk import Shard, ShardArgumentError, ingest_users, select_shard, shard_of, shard_record
from tests.integration.conftest import make_events
from tests.unit.test_cli import rankserve
from tests.unit.test_spec_cli import error_line


def reference_shard(key: int, count: int) -> int:
    """The documented function, written out: blake2b (8 bytes) of the key's 8 little-endian bytes, mod N."""
    return int.from_bytes(hashlib.blake2b(struct.pack("<q", key), digest_size=8).digest(), "little") % count


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16])
def test_shards_partition_the_users(count: int) -> None:
    rng = np.random.default_rng(count)
    ids = np.unique(np.r_[rng.integers(-(2**63), 2**63 - 1, 5_000, dtype=np.int64), np.arange(-50, 5_000),
                          [-(2**63), 2**63 - 1]])
    masks = [Shard(i, count).members(ids) for i in range(count)]
    hits = np.sum(masks, axis=0)
    assert (hits == 1).all(), "every user is in exactly one shard"  # disjoint and covering
    sizes = np.array([m.sum() for m in masks])
    assert sizes.min() > 0.8 * len(ids) / count, sizes  # and roughly even
    # stable: the documented function, not Python's hash (which is salted per process for strings)
    sample = ids[:: max(1, len(ids) // 300)]
    assert shard_of(sample, count).tolist() == [reference_shard(int(k), count) for k in sample]
    # the order of the ids does not matter
    perm = rng.permutation(len(ids))
    np.testing.assert_array_equal(shard_of(ids[perm], count), shard_of(ids, count)[perm])


def test_pinned_assignments() -> None:
    """A change of the hash would re-shard stored checkpoints: pin a few values."""
    assert shard_of(np.array([0, 1, 42, -1, 2**62], dtype=np.int64), 4).tolist() == [
        reference_shard(k, 4) for k in (0, 1, 42, -1, 2**62)
    ]
    assert shard_of(np.zeros(0, dtype=np.int64), 3).shape == (0,)


def test_shard_slices_keep_each_users_newest_events() -> None:
    events = make_events(n_users=25, max_events=60, seed=3)
    user_ids, offsets = ingest_users(events, None)
    cap = 17
    seen: list[int] = []
    for index in range(3):
        selected = np.flatnonzero(Shard(index, 3).members(user_ids))
        sub, sub_users, sub_offsets = select_shard(events, user_ids, offsets, selected, cap)
        assert sub_offsets[0] == 0 and sub_offsets[-1] == len(sub)
        for k, user in enumerate(sub_users.tolist()):
            rows = np.flatnonzero(events.user_id == user)[-cap:]
            got = slice(int(sub_offsets[k]), int(sub_offsets[k + 1]))
            np.testing.assert_array_equal(sub.item_id[got], events.item_id[rows])
            np.testing.assert_array_equal(sub.timestamp[got], events.timestamp[rows])
            assert (sub.user_id[got] == user).all()
        seen += sub_users.tolist()
    assert sorted(seen) == sorted(user_ids.tolist())


def test_parse_and_record_names() -> None:
    assert Shard.parse("2/5") == Shard(2, 5) and str(Shard.parse(" 0 / 1 ")) == "0/1"
    for bad in ("3/3", "x/2", "0/0", "1", "-1/2", "1/2/3", ""):
        with pytest.raises(ShardArgumentError, match="--shard"):
            Shard.parse(bad)
    assert shard_record("v20240601", 2, 8) == "v20240601.shard-2-of-8"
    with pytest.raises(ValueError, match="too long for a sharded load"):
        shard_record("v" * 60, 0, 16)


BAD_SHARDS = {
    ("--shard", "3/3", "--version", "v1"): "--shard '3/3'",
    ("--shard", "x/2", "--version", "v1"): "--shard 'x/2'",
    ("--shard", "0/0", "--version", "v1"): "--shard '0/0'",
    ("--shard", "0/3"): "--shard 0/3 needs --version",
}


def test_bad_shard_is_one_line_exit_2() -> None:
    # No store is named: the flags are refused before anything connects (or starts the embedded one).
    with ThreadPoolExecutor(len(BAD_SHARDS)) as pool:
        done = dict(zip(BAD_SHARDS, pool.map(lambda argv: rankserve("ingest", *argv), BAD_SHARDS), strict=True))
    for argv, expected in BAD_SHARDS.items():
        line = error_line(done[argv], "ingest")
        assert line.startswith(expected), (argv, line)

