"""Request ids as sent (JSON integers or strings, gRPC int64 or string keys) -> the store's int64 keys.

How an id becomes an int64 is the serving model's schema's business (`SchemaSpec.id_types`,
`feature_store.spec.resolve_id`): `int` ids are taken as they are (integer text too), `string`
ids are hashed. A bad id is an `InvalidRequest` naming the field. The common case, a list of
in-range integers for an `int` model, is checked with two C-level passes (min, max), not a
Python loop per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from feature_store.spec import MAX_CONTEXT_STRING, IdType, resolve_id, stable_id_hash
from service.errors import InvalidRequest
from service.types import INT64_MAX, RawId


def resolve_user(value: RawId, id_type: IdType) -> int:
    """The user's int64 store key; InvalidRequest naming `user_id`."""
    if type(value) is int and id_type == "int":
        if not 0 <= value <= INT64_MAX:
            raise InvalidRequest(f"user_id must be an integer in 0..{INT64_MAX} or a string, got {value}")
        return value
    try:
        return resolve_id(value, id_type, "user_id")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def resolve_candidates(values: Sequence[RawId], id_type: IdType) -> list[int]:
    """The candidates' int64 store keys, in order; InvalidRequest naming `candidates[k]`.

    The transports deliver ints and strings only. A list of ints for an `int` model (the common
    case) is range-checked by `min` and `max` (C loops; `min` raises TypeError when strings are mixed in).
    """
    if not values:
        return []
    if id_type == "int":
        ints = cast("Sequence[int]", values)  # if min and max below find ints at both ends
        lo: object
        hi: object
        try:
            lo, hi = min(ints), max(ints)
        except TypeError:  # ints and strings mixed
            lo = hi = None
        if type(lo) is int and type(hi) is int:
            if lo < 0 or hi > INT64_MAX:
                k, bad = next((k, v) for k, v in enumerate(ints) if not 0 <= v <= INT64_MAX)
                raise InvalidRequest(f"candidates[{k}]: candidate ids must be integers in 0..{INT64_MAX} or "
                                     f"strings, got {bad}")
            return ints if isinstance(ints, list) else list(ints)
    elif all(type(v) is str and 0 < len(v) <= MAX_CONTEXT_STRING for v in values):
        keys: list[int] = stable_id_hash(values).tolist()  # type: ignore[arg-type]  # all str: checked
        return keys
    out: list[int] = []
    for k, v in enumerate(values):
        try:
            out.append(resolve_id(v, id_type, f"candidates[{k}]"))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    return out
