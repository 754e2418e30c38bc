"""The experiments file: its shape (pydantic), its parsing, and the sticky user-to-bucket hash.

Assignment: bucket = blake2b(f"{salt}:{user_id}", 8 bytes) big-endian mod 10,000; arms own
contiguous bucket ranges in the order they are declared. The hash is fixed (never Python's
`hash()`, which is salted per process), so a user lands in the same arm in every replica and
after every restart.
"""

from __future__ import annotations

import hashlib
import math
import typing

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.errors import ExperimentsRejected

BUCKETS = 10_000
DEFAULT_ARM = "default"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BUNDLE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*/[1-9][0-9]*$"  # name/version; no leading dot: no path tricks


def bucket_of(salt: str, user_id: int | str) -> int:
    """The user's bucket in [0, 10000): stable across processes, restarts and languages.

    Of the id as sent (its decimal text for an integer), so 42 and "42" share a bucket.
    """
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


# -- the file's shape ------------------------------------------------------------------------------


class FusionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] | None = Field(default=None, description="per task; unset: the bundle's")
    transforms: dict[str, str] | None = Field(default=None, description="identity, log or power:<exponent>")

    @field_validator("weights")
    @classmethod
    def _finite(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for task, w in (value or {}).items():
            if not math.isfinite(w):
                raise ValueError(f"weight of {task!r} must be finite, got {w}")
        return value


class RetrievalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: str | None = Field(default=None, description="GSU strategy name; unset: RANKSERVE_RETRIEVAL_STRATEGY")
    k: int | None = Field(default=None, ge=1, description="behaviours retrieved per candidate; unset: the bundle's")


class ShadowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="default: the bundle with '/' as '-'")
    bundle: str = Field(pattern=BUNDLE_PATTERN, description='"name/version"')
    sample_rate: float = Field(gt=0, le=1, description="share of the arm's requests scored by this shadow")
    fusion: FusionSpec | None = Field(default=None, description="default: the arm's")
    retrieval: RetrievalSpec | None = Field(default=None, description="default: the arm's")

    @property
    def label(self) -> str:
        return self.name or self.bundle.replace("/", "-")


class ArmSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    share: float = Field(ge=0, le=100, description="percent of users, in steps of 0.01 (one bucket)")
    bundle: str = Field(pattern=BUNDLE_PATTERN, description='pinned "name/version"')
    fusion: FusionSpec | None = None
    retrieval: RetrievalSpec | None = None
    shadows: list[ShadowSpec] = Field(default_factory=list)

    @field_validator("share")
    @classmethod
    def _whole_buckets(cls, value: float) -> float:
        if abs(value * 100 - round(value * 100)) > 1e-6:
            raise ValueError(f"share must be a multiple of 0.01% (one of {BUCKETS} buckets), got {value}")
        return value

    @model_validator(mode="after")
    def _unique_shadows(self) -> ArmSpec:
        labels = [s.label for s in self.shadows]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"shadow names must be unique within an arm, repeated: {dupes}")
        return self

    @property
    def buckets(self) -> int:
        return round(self.share * 100)


class ExperimentsSpec(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid")

    salt: str = Field(min_length=1, max_length=128, description="changing it reshuffles every user")
    arms: list[ArmSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _arms(self) -> ExperimentsSpec:
        names = [a.name for a in self.arms]
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique, repeated: {dupes}")
        total = sum(a.buckets for a in self.arms)
        if total != BUCKETS:
            shares = ", ".join(f"{a.name} {a.share:g}%" for a in self.arms)
            raise ValueError(
                f"arm shares sum to {total / 100:g}% ({shares}); they must sum to exactly 100% ({BUCKETS} buckets)"
            )
        return self


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping (YAML keeps the last one silently: a
    leftover second `share:` or `bundle:` would change an arm without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[typing.Any, typing.Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_experiments(text: str, source: str = "experiments file") -> ExperimentsSpec:
    """YAML text -> validated spec; ExperimentsRejected naming every problem otherwise."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeySafeLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ExperimentsRejected(f"{source} refused: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ExperimentsRejected(f"{source} refused: expected a mapping with 'salt' and 'arms'")
    try:
        return ExperimentsSpec.model_validate(doc)
    except ValidationError as exc:
        raise ExperimentsRejected(f"{source} refused: {_describe_validation(exc)}") from exc
