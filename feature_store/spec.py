"""The feature spec: a team's own events, actions, tasks and side features, declared in YAML.

Two halves:

* `FeatureSpec` is what a team writes (docs/SCHEMA.md has the format and a full example): the
  event source and its column names, the actions and the file values that mean each, an optional
  impression action, the tasks (with optional ESMM parents, fusion weights and transforms), side
  features in three groups (user table, item catalogue, request context), id types and sequence
  limits. Validated with pydantic (unknown keys refused); every error is one line naming the field.
* `SideFeatures` is what training fitted for the side features: categorical vocabularies (capped,
  then hashed buckets or the out-of-vocabulary code for the rest) and numeric normalization. It is
  part of the schema, so the schema hash covers it, and the same encoders run in training, in
  ingestion and per request.

Codes of categorical features are per feature: 0 is out-of-vocabulary or missing, 1..V the fitted
vocabulary, then the hash buckets. The scorer reads all categorical features of a sample as one
int64 row (`side_ids`) into one embedding table; `SideFeatures.id_offsets` places each feature's
codes in it. Numeric features arrive normalized as one float32 row (`side_values`).

No pandas and no torch here: the serving path encodes request context with these classes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from feature_store.errors import UserError
from feature_store.fusion import is_transform

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
MAX_ACTIONS = 255  # a stored behaviour keeps its action code in 8 bits
MAX_CONTEXT_STRING = 256  # longest categorical context value a request may send
FEATURE_GROUPS: tuple[str, ...] = ("user", "item", "context")
IdType = Literal["int", "string"]


class SpecError(UserError, ValueError):
    """A feature spec that cannot be used; the message names the field and what to fix."""


# ---------------------------------------------------------------------------------------------
# Stable ids


def stable_id_hash(values: Iterable[str]) -> IntArray:
    """Stable non-negative int64 ids for string ids: blake2b (8-byte digest), top bit cleared.

    Stable across processes and machines (unlike Python's `hash`), so training, ingestion and
    requests agree. A collision needs ~2^31 distinct ids to become likely.
    """
    out = [
        int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF
        for v in values
    ]
    return np.asarray(out, dtype=np.int64)


INT64_MAX = (1 << 63) - 1


def resolve_id(value: int | str, id_type: IdType, what: str = "id") -> int:
    """A request's id (JSON integer or string) as the int64 the store and the model key on.

    `int` ids: integers as they are, strings must be integer text. `string` ids: strings are
    hashed with `stable_id_hash`; an integer is taken as its decimal text, so 42 and "42" agree.
    Raises ValueError with a message naming `what`.
    """
    if isinstance(value, bool):  # bool is an int subclass: refuse it rather than read True as 1
        raise ValueError(f"{what} must be an integer or a string, got a boolean")
    if id_type == "string":
        if isinstance(value, int):
            value = str(value)
        if not value or len(value) > MAX_CONTEXT_STRING:
            raise ValueError(f"{what} must be a non-empty string of at most {MAX_CONTEXT_STRING} characters")
        return int(stable_id_hash([value])[0])
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,19}", text):
            raise ValueError(f"{what} {value[:40]!r} is not an integer, and this model's ids are integers")
        value = int(text)
    if not 0 <= value <= INT64_MAX:
        raise ValueError(f"{what} {value} is outside 0..2^63-1")
    return value


# ---------------------------------------------------------------------------------------------
# The declared spec (YAML)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventsSource(_Strict):
    """Where the events are and which columns hold what."""

    path: str = Field(description="events file (CSV, CSV.gz or Parquet), relative to the spec file")
    format: Literal["auto", "csv", "parquet", "tmall", "taobao", "synthetic"] = Field(
        default="auto", description="auto: by file suffix; tmall, taobao, synthetic: the built-in readers"
    )
    user: str = "user_id"
    item: str = "item_id"
    action: str = "action"
    timestamp: str = Field(default="timestamp", description="unix seconds or ISO-8601 text")
    category: str | None = Field(default=None, description="item category column (optional)")
    event_id: str | None = Field(default=None, description="unique event id column (optional)")


class TaskDecl(_Strict):
    """A prediction task: positive when any of `positive` happened for the (user, item) target."""

    name: str = Field(pattern=NAME_PATTERN)
    positive: list[str] = Field(min_length=1)
    parent: str | None = Field(default=None, description="ESMM: p(task) = p(parent) x p(task | parent)")
    weight: float = Field(default=1.0, ge=0.0, description="default fusion weight")
    transform: str = Field(default="identity", description="fusion transform: identity, log or power:<exponent>")

    @field_validator("transform")
    @classmethod
    def _check_transform(cls, value: str) -> str:
        if is_transform(value):
            return value
        raise ValueError(f"must be identity, log or power:<exponent>, got {value!r}")


class CategoricalDecl(_Strict):
    """A categorical side feature: a vocabulary of its most frequent values, the rest hashed or OOV."""

    name: str = Field(pattern=NAME_PATTERN)
    max_vocabulary: int = Field(default=10_000, ge=1, le=10_000_000)
    hash_buckets: int = Field(default=0, ge=0, le=1_000_000, description="buckets for values outside the vocabulary")
    default: str = Field(default="", description="value used when missing ('' = the out-of-vocabulary code)")


class NumericDecl(_Strict):
    """A numeric side feature, normalized by the mean and deviation fitted at training."""

    name: str = Field(pattern=NAME_PATTERN)
    default: float = Field(default=0.0, description="value used when missing (before the transform)")
    log1p: bool = Field(default=False, description="log(1 + max(x, 0)) before normalizing (counts, prices)")

    @field_validator("default")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


def _shorthand(value: Any) -> Any:
    """`[brand, seller]` is short for `[{name: brand}, {name: seller}]`."""
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class ContextFeatures(_Strict):
    """Features sent with each request (`context`); in training, event columns of the same names."""

    categorical: list[CategoricalDecl] = Field(default_factory=list)
    numeric: list[NumericDecl] = Field(default_factory=list)

    @field_validator("categorical", "numeric", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return _shorthand(value)


class TableFeatures(ContextFeatures):
    """Features of a user table or an item catalogue: one row per id."""

    path: str = Field(description="CSV, CSV.gz or Parquet file, relative to the spec file")
    key: str | None = Field(default=None, description="id column (default: the events' user or item column name)")


class IdsDecl(_Strict):
    user: Literal["auto", "int", "string"] = "auto"
    item: Literal["auto", "int", "string"] = "auto"


class SequenceDecl(_Strict):
    max_length: int = Field(default=10_000, ge=1, le=1_000_000, description="lifelong sequence cap in the store")
    short_length: int = Field(default=20, ge=1, le=1_000, description="most recent behaviours attended directly")


class FeatureSpec(_Strict):
    """A team's data, declared (see the module doc and docs/SCHEMA.md)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    events: EventsSource
    actions: dict[str, list[str]] = Field(min_length=1, description="action name -> the file values that mean it")
    impression: str | None = Field(
        default=None, description="the action meaning 'shown, not engaged' (default: an action named impression)"
    )
    tasks: list[TaskDecl] = Field(min_length=1)
    user_features: TableFeatures | None = None
    item_features: TableFeatures | None = None
    context_features: ContextFeatures | None = None
    ids: IdsDecl = Field(default_factory=IdsDecl)
    sequence: SequenceDecl = Field(default_factory=SequenceDecl)

    @field_validator("actions", mode="before")
    @classmethod
    def _action_values_as_text(cls, value: Any) -> Any:
        """File values may be written as YAML numbers (Tmall's 0..3); they are matched as text."""
        if isinstance(value, dict):
            return {
                k: [str(x) for x in (v if isinstance(v, list) else [v])] if v is not None else v
                for k, v in value.items()
            }
        return value

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        for name, values in self.actions.items():
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"actions: name {name!r} must match {NAME_PATTERN}")
            if not values:
                raise ValueError(f"actions.{name}: list at least one file value")
        owner: dict[str, str] = {}
        for name, values in self.actions.items():
            for v in values:
                if v in owner and owner[v] != name:
                    raise ValueError(f"actions.{name}: file value {v!r} already means {owner[v]!r}")
                owner[v] = name
        impression = self.impression_action
        if self.impression is not None and self.impression not in self.actions:
            raise ValueError(f"impression: {self.impression!r} is not one of the actions {list(self.actions)}")
        if len(self.behaviour_actions) > MAX_ACTIONS:
            raise ValueError(f"actions: at most {MAX_ACTIONS} behaviour actions, got {len(self.behaviour_actions)}")
        if not self.behaviour_actions:
            raise ValueError("actions: declare at least one action besides the impression")
        tasks = {t.name: t for t in self.tasks}
        if len(tasks) != len(self.tasks):
            raise ValueError(f"tasks: names must be unique, got {[t.name for t in self.tasks]}")
        for k, task in enumerate(self.tasks):
            for a in task.positive:
                if a not in self.actions:
                    raise ValueError(f"tasks[{k}].positive: unknown action {a!r}; declared: {list(self.actions)}")
                if a == impression:
                    raise ValueError(f"tasks[{k}].positive: {a!r} is the impression action, which is never positive")
            if task.parent is not None and task.parent not in tasks:
                raise ValueError(f"tasks[{k}].parent: unknown task {task.parent!r}; declared: {list(tasks)}")
        for k, task in enumerate(self.tasks):
            seen, at = [task.name], task.parent
            while at is not None:
                if at in seen:
                    raise ValueError(f"tasks[{k}].parent: cycle {' -> '.join([*seen, at])}")
                seen.append(at)
                at = tasks[at].parent
        names: dict[str, str] = {}
        for group in FEATURE_GROUPS:
            decl = self.feature_group(group)
            if decl is None:
                continue
            for name in [d.name for d in decl.categorical] + [d.name for d in decl.numeric]:
                if name in names:
                    raise ValueError(f"{group}_features: {name!r} is already declared in {names[name]}_features")
                names[name] = group
        return self

    @property
    def impression_action(self) -> str | None:
        """The declared impression action, else an action named `impression`, else none."""
        if self.impression is not None:
            return self.impression
        return "impression" if "impression" in self.actions else None

    @property
    def behaviour_actions(self) -> tuple[str, ...]:
        """Actions that enter the behaviour sequence, in declared order (their codes)."""
        return tuple(a for a in self.actions if a != self.impression_action)

    def feature_group(self, group: str) -> ContextFeatures | None:
        return {"user": self.user_features, "item": self.item_features, "context": self.context_features}[group]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def parse(cls, doc: Any, source: str = "spec") -> FeatureSpec:
        """Validate a parsed YAML/JSON document; errors become one `SpecError` line naming the field."""
        if not isinstance(doc, dict):
            raise SpecError(f"{source}: expected a mapping at the top level, got {type(doc).__name__}")
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise SpecError(f"{source}: {_first_error(exc)}") from None

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        p = Path(path)
        try:
            doc = yaml.load(p.read_text(), Loader=_SafeSpecLoader)
        except FileNotFoundError:
            raise SpecError(f"feature spec not found: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"cannot read feature spec {p}: {exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" line {where.line + 1}" if where is not None else ""
            raise SpecError(f"{p}:{line} not valid YAML: {getattr(exc, 'problem', exc)}") from None
        return cls.parse(doc, str(p))


class _SafeSpecLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping (PyYAML keeps the last one
    silently, so a second `view:` under `actions` or a second `tasks:` would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _first_error(exc: ValidationError) -> str:
    """The first pydantic error as `field.path: message` (the one line a CLI prints)."""
    err = exc.errors()[0]
    loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in err["loc"]).replace(".[", "[")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling against docs/SCHEMA.md)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


# ---------------------------------------------------------------------------------------------
# Fitted side features


def _as_text(values: Iterable[Any]) -> list[str | None]:
    """Values as text; None, NaN and empty strings are missing (None). Integral floats lose their '.0'."""
    out: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            text = str(v).strip()
            out.append(text or None)
    return out


@dataclass(frozen=True, eq=False)
class CategoricalEncoder:
    """Value -> code: 0 missing or out of vocabulary, 1..V the vocabulary, then hash buckets."""

    name: str
    vocabulary: tuple[str, ...]
    hash_buckets: int = 0
    default: str = ""

    @classmethod
    def fit(cls, decl: CategoricalDecl, values: Iterable[Any]) -> CategoricalEncoder:
        """The `max_vocabulary` most frequent values (ties by value, so fitting is deterministic)."""
        return cls._ranked(decl, Counter(v for v in _as_text(values) if v is not None))

    @classmethod
    def fit_counts(cls, decl: CategoricalDecl, values: Iterable[Any], counts: Iterable[int]) -> CategoricalEncoder:
        """`fit` on a column given as its distinct values and their counts (large columns)."""
        total: Counter[str] = Counter()
        for v, c in zip(_as_text(values), counts, strict=True):
            if v is not None:
                total[v] += int(c)
        return cls._ranked(decl, total)

    @classmethod
    def _ranked(cls, decl: CategoricalDecl, counts: Counter[str]) -> CategoricalEncoder:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: decl.max_vocabulary]
        return cls(decl.name, tuple(v for v, _ in ranked), decl.hash_buckets, decl.default)

    @property
    def size(self) -> int:
        """Rows of this feature's embedding block."""
        return 1 + len(self.vocabulary) + self.hash_buckets

    @cached_property
    def _index(self) -> dict[str, int]:
        return {v: k + 1 for k, v in enumerate(self.vocabulary)}

    def encode_one(self, value: Any) -> int:
        text = _as_text([value])[0]
        if text is None:
            text = self.default or None
        if text is None:
            return 0
        code = self._index.get(text)
        if code is not None:
            return code
        if self.hash_buckets:
            return 1 + len(self.vocabulary) + int(stable_id_hash([text])[0] % self.hash_buckets)
        return 0

    def encode(self, values: Iterable[Any]) -> IntArray:
        return np.fromiter((self.encode_one(v) for v in values), dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocabulary": list(self.vocabulary), "hash_buckets": self.hash_buckets,
                "default": self.default}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CategoricalEncoder:
        return cls(str(d["name"]), tuple(str(v) for v in d["vocabulary"]), int(d["hash_buckets"]), str(d["default"]))


@dataclass(frozen=True, eq=False)
class NumericEncoder:
    """x -> ((log1p(x) if log1p else x) - mean) / std, missing -> default first; float32."""

    name: str
    mean: float
    std: float
    default: float = 0.0
    log1p: bool = False

    @classmethod
    def fit(cls, decl: NumericDecl, values: Iterable[Any]) -> NumericEncoder:
        x = cls._raw(values, decl.default, decl.log1p)
        mean = float(x.mean()) if x.size else 0.0
        std = float(x.std()) if x.size else 1.0
        return cls(decl.name, mean, std if std > 1e-12 else 1.0, decl.default, decl.log1p)

    @staticmethod
    def _raw(values: Iterable[Any], default: float, log1p: bool) -> npt.NDArray[np.float64]:
        if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":  # a numeric column: vectorized
            x = np.asarray(values, dtype=np.float64)
            x = np.where(np.isfinite(x), x, default)
            return np.log1p(np.maximum(x, 0.0)) if log1p else x
        out: list[float] = []
        for v in values:
            try:
                f = float(v) if v is not None and not isinstance(v, bool) and v != "" else math.nan
            except (TypeError, ValueError):
                f = math.nan
            out.append(f if math.isfinite(f) else default)
        x = np.asarray(out, dtype=np.float64)
        return np.log1p(np.maximum(x, 0.0)) if log1p else x

    def encode(self, values: Iterable[Any]) -> FloatArray:
        """Missing, non-numeric and non-finite values take the default."""
        x = self._raw(values, self.default, self.log1p)
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mean": self.mean, "std": self.std, "default": self.default, "log1p": self.log1p}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NumericEncoder:
        return cls(str(d["name"]), float(d["mean"]), float(d["std"]), float(d["default"]), bool(d["log1p"]))


@dataclass(frozen=True, eq=False)
class FeatureGroup:
    """The fitted encoders of one group (user, item or context)."""

    categorical: tuple[CategoricalEncoder, ...] = ()
    numeric: tuple[NumericEncoder, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.categorical) + tuple(e.name for e in self.numeric)

    def encode_rows(self, columns: Mapping[str, Iterable[Any]], n: int) -> tuple[IntArray, FloatArray]:
        """Per-feature codes [n, C] and normalized values [n, N] of `n` rows; absent columns are missing."""
        ids = np.zeros((n, len(self.categorical)), dtype=np.int64)
        values = np.zeros((n, len(self.numeric)), dtype=np.float32)
        for j, cat in enumerate(self.categorical):
            ids[:, j] = cat.encode(columns.get(cat.name, [None] * n))
        for j, num in enumerate(self.numeric):
            with np.errstate(over="ignore"):
                column = num.encode(columns.get(num.name, [None] * n))
            beyond = ~np.isfinite(column)  # finite in, beyond float32 once normalized (e.g. 1e40)
            if beyond.any():  # the default, as for a non-finite value: a table row is not refused
                column[beyond] = num.encode([None])[0]
            values[:, j] = column
        return ids, values

    def to_dict(self) -> dict[str, Any]:
        return {"categorical": [e.to_dict() for e in self.categorical], "numeric": [e.to_dict() for e in self.numeric]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureGroup:
        return cls(tuple(CategoricalEncoder.from_dict(e) for e in d.get("categorical", ())),
                   tuple(NumericEncoder.from_dict(e) for e in d.get("numeric", ())))


@dataclass(frozen=True, eq=False)
class SideFeatures:
    """The fitted side features of a schema, in the scorer's order: user, item, context."""

    user: FeatureGroup = field(default_factory=FeatureGroup)
    item: FeatureGroup = field(default_factory=FeatureGroup)
    context: FeatureGroup = field(default_factory=FeatureGroup)

    @classmethod
    def fit(cls, spec: FeatureSpec, columns: Mapping[str, Mapping[str, Iterable[Any]]]) -> SideFeatures:
        """Fit every declared feature on `columns[group][feature name]` (training rows only for context)."""
        groups: dict[str, FeatureGroup] = {}
        for group in FEATURE_GROUPS:
            decl = spec.feature_group(group)
            if decl is None:
                groups[group] = FeatureGroup()
                continue
            cols = columns.get(group, {})
            groups[group] = FeatureGroup(
                tuple(CategoricalEncoder.fit(d, cols.get(d.name, ())) for d in decl.categorical),
                tuple(NumericEncoder.fit(d, cols.get(d.name, ())) for d in decl.numeric),
            )
        return cls(**groups)

    def groups(self) -> tuple[FeatureGroup, FeatureGroup, FeatureGroup]:
        return self.user, self.item, self.context

    @cached_property
    def n_ids(self) -> int:
        """Width of the scorer's `side_ids` input (0: the input is absent)."""
        return sum(len(g.categorical) for g in self.groups())

    @cached_property
    def n_values(self) -> int:
        """Width of the scorer's `side_values` input (0: the input is absent)."""
        return sum(len(g.numeric) for g in self.groups())

    @cached_property
    def id_offsets(self) -> IntArray:
        """Where each `side_ids` column's codes start in the one shared embedding table."""
        sizes = [e.size for g in self.groups() for e in g.categorical]
        offsets = np.asarray(np.cumsum([0, *sizes[:-1]]) if sizes else [], dtype=np.int64)
        offsets.setflags(write=False)  # cached and shared by every request
        return offsets

    @cached_property
    def default_rows(self) -> tuple[tuple[IntArray, FloatArray], ...]:
        """Per group (user, item, context): the codes and values of a row with every feature missing."""
        rows = []
        for group in self.groups():
            ids, values = group.encode_rows({}, 1)
            ids.setflags(write=False)
            values.setflags(write=False)
            rows.append((ids[0], values[0]))
        return tuple(rows)

    @property
    def table_rows(self) -> int:
        """Rows of the shared side-feature embedding table."""
        return sum(e.size for g in self.groups() for e in g.categorical)

    def to_dict(self) -> dict[str, Any]:
        return {name: g.to_dict() for name, g in zip(FEATURE_GROUPS, self.groups(), strict=True)}

    # Value equality, so schemas compare by content (a schema read back equals the one written);
    # the encoders themselves stay identity-compared because their vocabularies can be large.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, SideFeatures) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SideFeatures:
        return cls(**{name: FeatureGroup.from_dict(d.get(name, {})) for name in FEATURE_GROUPS})


class ContextError(ValueError):
    """A request's context that does not match the spec; the message names the field."""


_FLOAT_MAX = int(np.finfo(np.float64).max)


def encode_context(group: FeatureGroup, context: Mapping[str, Any] | None) -> tuple[IntArray, FloatArray]:
    """A request's `context` object -> (codes [C], values [N]); missing names take the defaults.

    Unknown names, wrong types (a number for a categorical is read as its text; a string or a
    boolean for a numeric is refused), over-long strings and numbers out of float32's range once
    normalized raise `ContextError` naming the field.
    """
    ctx = dict(context or {})
    known = set(group.names)
    unknown = sorted(set(ctx) - known)
    if unknown:
        allowed = sorted(known) or "none: this model has no context features"
        raise ContextError(f"context.{unknown[0]}: unknown context feature; allowed: {allowed}")
    ids = np.zeros(len(group.categorical), dtype=np.int64)
    values = np.zeros(len(group.numeric), dtype=np.float32)
    for j, cat in enumerate(group.categorical):
        v = ctx.get(cat.name)
        if isinstance(v, bool) or not (v is None or isinstance(v, str | int | float)):
            raise ContextError(f"context.{cat.name}: expected a string, got {type(v).__name__}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ContextError(f"context.{cat.name}: expected a string, got a non-finite number")
        if isinstance(v, str) and len(v) > MAX_CONTEXT_STRING:
            raise ContextError(f"context.{cat.name}: longer than {MAX_CONTEXT_STRING} characters")
        ids[j] = cat.encode_one(v)
    for j, num in enumerate(group.numeric):
        v = ctx.get(num.name)
        # math.isfinite on floats only: it overflows on an integer past float range (refused just below)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                              or (isinstance(v, float) and not math.isfinite(v))):
            raise ContextError(f"context.{num.name}: expected a finite number, got {type(v).__name__} {v!r:.40}")
        if isinstance(v, int) and abs(v) > _FLOAT_MAX:  # an integer no float holds (JSON's ints have no bound)
            raise ContextError(f"context.{num.name}: {v!r:.40} is out of range")
        with np.errstate(over="ignore"):  # an overflow is refused below, by name
            values[j] = num.encode([v])[0]
        if not math.isfinite(values[j]):  # finite in, beyond float32 once normalized (e.g. 1e300)
            raise ContextError(f"context.{num.name}: {v!r:.40} is out of range")
    return ids, values
