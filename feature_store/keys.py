"""Redis key layout: small pure functions, one per key kind (unit-tested against exact bytes).

    rs:<ver>:{u<user>}:seq    lifelong behaviour sequence (12-byte records, oldest first)
    rs:<ver>:{u<user>}:prof   user profile (u32 user index, then the user's side tail)
    rs:<ver>:{u<user>}:clu    behaviour clusters of the sequence (twin_v2; optional, see codecs)
    rs:<ver>:{u<user>}:evid   8-byte hashes of the user's newest applied streamed event ids (the consumer's dedupe)
    rs:<ver>:i:<item>         item features (u32 item index, u32 category index, then the side tail)
    rs:<ver>:item-changes     stream of the item ids upserts rewrote (servers drop them from their item caches)
    rs:meta:<ver>             JSON meta of one feature-set version (schema hash, counts, status)
    rs:meta:<ver>:schema      JSON of the schema the version was ingested with (hash and spec)
    rs:versions               SET of all version names that have a meta key
    rs:active                 name of the version the service reads ("active pointer")

`<user>` and `<item>` are the *raw* int64 ids a request carries; values hold dense indices.
The `{u<user>}` hash tag puts all of one user's keys in one Cluster slot, so a user's profile
and sequence are read from one node in one round trip and the append script (one key) is legal
in Cluster. Item keys carry no tag: they spread over all slots, and a request's item reads fan
out to every node in parallel. The version prefix lets a new ingest be written next to the
serving one and switched in with one SET of `rs:active`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

KEY_PREFIX = "rs"
ACTIVE_KEY = b"rs:active"
VERSIONS_KEY = b"rs:versions"

# Version names become part of keys and of a SCAN MATCH pattern: no glob characters, no colons,
# no braces (a brace would change the Cluster hash tag).
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" would let "v1\n" through
# Names whose keys would collide with the non-versioned keys above.
RESERVED_VERSIONS = frozenset({"meta", "active", "versions"})


def validate_version(version: str) -> str:
    """Return `version` if it is a legal feature-set version name, else raise ValueError."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or version in RESERVED_VERSIONS:
        raise ValueError(
            f"bad feature-set version {version!r}: use 1-64 of [A-Za-z0-9_.-], starting with a letter or digit, "
            f"not one of {sorted(RESERVED_VERSIONS)}"
        )
    return version


def user_tag(user_id: int) -> str:
    """The Cluster hash tag of a user: `{u123}`."""
    return f"{{u{int(user_id)}}}"


def user_prefix(version: str, user_id: int) -> bytes:
    return f"{KEY_PREFIX}:{version}:{{u{int(user_id)}}}:".encode()


def sequence_key(version: str, user_id: int) -> bytes:
    """`rs:<ver>:{u<user>}:seq`"""
    return user_prefix(version, user_id) + b"seq"


def profile_key(version: str, user_id: int) -> bytes:
    """`rs:<ver>:{u<user>}:prof`"""
    return user_prefix(version, user_id) + b"prof"


def clusters_key(version: str, user_id: int) -> bytes:
    """`rs:<ver>:{u<user>}:clu`"""
    return user_prefix(version, user_id) + b"clu"


def event_ids_key(version: str, user_id: int) -> bytes:
    """`rs:<ver>:{u<user>}:evid`"""
    return user_prefix(version, user_id) + b"evid"


def append_keys(version: str, user_id: int) -> tuple[bytes, bytes, bytes]:
    """The keys a streamed append writes: sequence, clusters, event ids (one prefix, built once)."""
    prefix = user_prefix(version, user_id)
    return prefix + b"seq", prefix + b"clu", prefix + b"evid"


def item_prefix(version: str) -> bytes:
    return f"{KEY_PREFIX}:{version}:i:".encode()


def item_key(version: str, item_id: int) -> bytes:
    """`rs:<ver>:i:<item>`"""
    return item_prefix(version) + b"%d" % int(item_id)


def item_keys(version: str, item_ids: Iterable[int]) -> list[bytes]:
    """`item_key` for many ids (the per-request hot path: one prefix, bytes formatting)."""
    prefix = item_prefix(version)
    return [prefix + b"%d" % i for i in item_ids]


def meta_key(version: str) -> bytes:
    """`rs:meta:<ver>`: outside the version's data prefix, so dropping the data keeps it to the end."""
    return f"{KEY_PREFIX}:meta:{version}".encode()


def schema_key(version: str) -> bytes:
    """`rs:meta:<ver>:schema`: beside the meta key (versions hold no colon, so no other meta key
    is a prefix of it), outside the version's data prefix like the meta."""
    return f"{KEY_PREFIX}:meta:{version}:schema".encode()


def item_changes_key(version: str) -> bytes:
    """`rs:<ver>:item-changes`: the stream an upsert announces its rewritten item ids on."""
    return f"{KEY_PREFIX}:{version}:item-changes".encode()


def version_match_pattern(version: str) -> bytes:
    """SCAN MATCH pattern of every data key of a version: `rs:<ver>:*`."""
    return f"{KEY_PREFIX}:{version}:*".encode()
