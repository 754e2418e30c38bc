"""Key layout, against exact bytes (the layout is a contract with every other reader and writer)."""

from __future__ import annotations

import numpy as np
import pytest
from redis.crc import key_slot

from feature_store import keys


def test_user_keys_exact_bytes() -> None:
    assert keys.user_tag(123) == "{u123}"
    assert keys.sequence_key("v1", 123) == b"rs:v1:{u123}:seq"
    assert keys.profile_key("v1", 123) == b"rs:v1:{u123}:prof"
    assert keys.profile_key("2024-06-01.b", -5) == b"rs:2024-06-01.b:{u-5}:prof"
    assert keys.sequence_key("v1", np.int64(9_007_199_254_740_993)) == b"rs:v1:{u9007199254740993}:seq"


def test_item_and_version_keys_exact_bytes() -> None:
    assert keys.item_key("v1", 42) == b"rs:v1:i:42"
    assert keys.item_keys("v1", [42, 0, 7]) == [b"rs:v1:i:42", b"rs:v1:i:0", b"rs:v1:i:7"]
    assert keys.item_keys("v1", []) == []
    assert keys.meta_key("v1") == b"rs:meta:v1"
    assert keys.ACTIVE_KEY == b"rs:active"
    assert keys.VERSIONS_KEY == b"rs:versions"
    assert keys.version_match_pattern("v1") == b"rs:v1:*"
    assert keys.item_changes_key("v1") == b"rs:v1:item-changes"  # a version's key: dropped with it


def test_a_users_keys_share_one_cluster_slot() -> None:
    for user in (0, 1, 123, 10**12):
        slots = {key_slot(keys.sequence_key(v, user)) for v in ("v1", "v2")} | {key_slot(keys.profile_key("v1", user))}
        assert len(slots) == 1
    # ...and different users spread over slots, as do items.
    assert len({key_slot(keys.profile_key("v1", u)) for u in range(200)}) > 150
    assert len({key_slot(k) for k in keys.item_keys("v1", range(200))}) > 150


def test_item_keys_do_not_match_other_versions_patterns() -> None:
    # "v1" must not match keys of "v10": the pattern ends the version with a colon.
    import fnmatch

    assert not fnmatch.fnmatchcase(keys.item_key("v10", 1).decode(), keys.version_match_pattern("v1").decode())
    assert fnmatch.fnmatchcase(keys.item_key("v1", 1).decode(), keys.version_match_pattern("v1").decode())
    assert not fnmatch.fnmatchcase(keys.meta_key("v1").decode(), keys.version_match_pattern("v1").decode())
    # The recorded schema sits beside the meta, outside every version's data pattern (drop deletes it by name).
    assert keys.schema_key("v1") == b"rs:meta:v1:schema"
    for version in ("v1", "v", "x"):
        assert not fnmatch.fnmatchcase(keys.schema_key("v1").decode(), keys.version_match_pattern(version).decode())


@pytest.mark.parametrize("name", ["v1", "20240601T1200", "a.b-c_d", "9", "x" * 64])
def test_valid_versions(name: str) -> None:
    assert keys.validate_version(name) == name


@pytest.mark.parametrize(
    "name", ["", "-v", ".v", "v:1", "v{1}", "v*", "v?", "v[1]", "v 1", "x" * 65, "meta", "active", "versions", "vé",
             "v1\n"]
)
def test_invalid_versions(name: str) -> None:
    with pytest.raises(ValueError, match="feature-set version"):
        keys.validate_version(name)


def test_append_keys_are_the_users_keys() -> None:
    assert keys.append_keys("v1", 42) == (b"rs:v1:{u42}:seq", b"rs:v1:{u42}:clu", b"rs:v1:{u42}:evid")
    assert keys.append_keys("v1", 42) == (keys.sequence_key("v1", 42), keys.clusters_key("v1", 42),
                                          keys.event_ids_key("v1", 42))
