"""The feature schema: one definition shared by training, ingestion and serving.

A schema names the behaviour actions, the tasks a model predicts (each task is "did any of these
actions happen"), the sequence limits and the vocabularies that map raw ids to dense indices.
Dense index 0 is the out-of-vocabulary bucket of every vocabulary. The schema hash covers the
spec *and* the vocabularies' contents, because the feature store keeps dense indices: a bundle
trained on one vocabulary cannot read a store written with another, and is refused at load.

The derived features (time-gap buckets, weekday, history counters) are pure numpy functions here
so that the offline sample builder and the online service compute them with the same code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.errors import UserError
from feature_store.spec import MAX_ACTIONS, FeatureSpec, IdType, SideFeatures

# The default behaviour actions (the Tmall and Taobao presets). A schema's own actions come from its
# feature spec; the code of an action is its position in `SchemaSpec.actions`.
ACTIONS: tuple[str, ...] = ("click", "cart", "fav", "buy")
ACTION_CODE: dict[str, int] = {name: code for code, name in enumerate(ACTIONS)}

# The train/serve contract of the scorer: its inputs, in order (the exporter's graph signature and
# what the service assembles per request), and its output. `SchemaSpec.scorer_inputs` adds the
# side-feature inputs of a schema that declares side features. The target attention's pooling has
# no parameters, so it runs before the scorer (`models.model.attention_pool` in training, a numba
# kernel in the service, which reads the behaviours' rows in place instead of gathering B x K of
# them); the scorer holds everything with weights, the value projection included.
SCORER_INPUTS: tuple[str, ...] = (
    "cand_repr",  # [B, R]        float32  candidate's representation (item + category rows)
    "cand_cross",  # [B, C]       float32  user-item cross features (schema.cross_features)
    "long_pooled",  # [B, H, R]   float32  per head, the retrieved behaviours' rows weighted by their attention
    "long_attended",  # [B, 1]    float32  1 when at least one behaviour was retrieved, else 0
    "short_pooled",  # [B, H, R]  float32  the same over the most recent S behaviours
    "short_attended",  # [B, 1]   float32
    "user_repr",  # [B, U]        float32  user representation row
    "user_dense",  # [B, D]       float32  schema.history_features
    "weekday",  # [B]             int64    weekday of the request time
)
SIDE_INPUTS: tuple[str, ...] = (
    "side_ids",  # [B, n_ids]    int64    categorical side features (user, item, context), offset into one table
    "side_values",  # [B, n_values] float32 numeric side features (user, item, context), normalized
)
SCORER_OUTPUT = "probs"  # [B, T] float32 task probabilities, in schema task order
SCHEMA_FORMAT = 2  # 2: actions, task parents and side features come from a feature spec

SCHEMA_FILE = "schema.json"
VOCAB_FILES = {"user": "vocab_user.npy", "item": "vocab_item.npy", "category": "vocab_category.npy"}

IntArray = npt.NDArray[np.int64]


class SchemaError(UserError, ValueError):
    """A schema or vocabulary file is missing, malformed, or does not match its hash."""


@dataclass(frozen=True)
class TaskSpec:
    """A prediction task: positive when any of `actions` happened for the (user, item) target.

    With a `parent`, the model predicts p(task) = p(parent) x p(task | parent) (ESMM); `weight`
    and `transform` are the task's default fusion settings.
    """

    name: str
    actions: tuple[str, ...]
    parent: str | None = None
    weight: float = 1.0
    transform: str = "identity"


DEFAULT_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("click", ("click", "cart", "fav", "buy"), weight=1.0),
    TaskSpec("cart", ("cart", "fav"), parent="click", weight=3.0),
    TaskSpec("buy", ("buy",), parent="click", weight=10.0),
)


@dataclass(frozen=True)
class SchemaSpec:
    """The non-vocabulary part of the schema (small, JSON): what a bundle and a store agree on.

    Built from a `FeatureSpec` by `from_feature_spec`; the defaults are the built-in
    click/cart/fav/buy schema of the Tmall and Taobao presets.
    """

    name: str = "default"
    actions: tuple[str, ...] = ACTIONS
    tasks: tuple[TaskSpec, ...] = DEFAULT_TASKS
    max_sequence_length: int = 10_000  # lifelong sequence cap kept in the store and served
    short_sequence_length: int = 20  # most recent behaviours attended directly
    time_gap_buckets: int = 16  # bucket b covers gaps of [2^b - 1, 2^(b+1) - 1) hours
    weekday_buckets: int = 7
    id_types: tuple[IdType, IdType] = ("int", "int")  # (user, item): how request ids become int64
    side: SideFeatures = field(default_factory=SideFeatures)

    def __post_init__(self) -> None:
        if not self.actions or len(set(self.actions)) != len(self.actions):
            raise SchemaError(f"actions must be unique and non-empty, got {self.actions}")
        if len(self.actions) > MAX_ACTIONS:
            raise SchemaError(f"at most {MAX_ACTIONS} actions, got {len(self.actions)}")
        if not self.tasks:
            raise SchemaError("a schema needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise SchemaError(f"task names must be unique, got {names}")
        for task in self.tasks:
            unknown = set(task.actions) - set(self.actions)
            if unknown or not task.actions:
                raise SchemaError(f"task {task.name!r} names unknown actions {sorted(unknown)}")
            if task.parent is not None and task.parent not in names:
                raise SchemaError(f"task {task.name!r} has unknown parent {task.parent!r}")
        self.task_order()  # refuses parent cycles
        if self.max_sequence_length < 1 or self.short_sequence_length < 1:
            raise SchemaError("sequence lengths must be positive")

    @classmethod
    def from_feature_spec(
        cls, spec: FeatureSpec, side: SideFeatures | None = None, id_types: tuple[IdType, IdType] = ("int", "int")
    ) -> SchemaSpec:
        """The schema of a declared spec; `side` and `id_types` are what training fitted and found."""
        return cls(
            name=spec.name,
            actions=spec.behaviour_actions,
            tasks=tuple(TaskSpec(t.name, tuple(t.positive), t.parent, t.weight, t.transform) for t in spec.tasks),
            max_sequence_length=spec.sequence.max_length,
            short_sequence_length=spec.sequence.short_length,
            id_types=id_types,
            side=side if side is not None else SideFeatures(),
        )

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def n_actions(self) -> int:
        return len(self.actions)

    @property
    def n_history_features(self) -> int:
        """Width of `history_features`: log1p count per action plus log1p length."""
        return len(self.actions) + 1

    @property
    def n_cross_features(self) -> int:
        """Width of `cross_features`: log1p count per action, any, log1p hours since the latest."""
        return len(self.actions) + 2

    @property
    def scorer_inputs(self) -> tuple[str, ...]:
        """The scorer's inputs for this schema: the base ones, then side ids and values if any."""
        extra = (("side_ids",) if self.side.n_ids else ()) + (("side_values",) if self.side.n_values else ())
        return SCORER_INPUTS + extra

    def task_parents(self) -> tuple[int, ...]:
        """Index of each task's parent, -1 for none."""
        names = self.task_names
        return tuple(names.index(t.parent) if t.parent is not None else -1 for t in self.tasks)

    def task_order(self) -> tuple[int, ...]:
        """Task indices with every parent before its children (declared order otherwise)."""
        parents = self.task_parents()
        order: list[int] = []
        state = [0] * len(parents)  # 0 new, 1 visiting, 2 done

        def visit(t: int, path: list[int]) -> None:
            if state[t] == 2:
                return
            if state[t] == 1:
                cycle = " -> ".join(self.tasks[k].name for k in [*path, t])
                raise SchemaError(f"task parents form a cycle: {cycle}")
            state[t] = 1
            if parents[t] >= 0:
                visit(parents[t], [*path, t])
            state[t] = 2
            order.append(t)

        for t in range(len(parents)):
            visit(t, [])
        return tuple(order)

    def task_action_matrix(self) -> npt.NDArray[np.bool_]:
        """[n_actions, n_tasks] bool: action a makes task t positive."""
        m = np.zeros((len(self.actions), len(self.tasks)), dtype=bool)
        for t, task in enumerate(self.tasks):
            for a in task.actions:
                m[self.actions.index(a), t] = True
        return m

    def default_fusion(self) -> dict[str, dict[str, Any]]:
        """The tasks' declared fusion weights and transforms (a bundle's default fusion)."""
        return {
            "weights": {t.name: t.weight for t in self.tasks},
            "transforms": {t.name: t.transform for t in self.tasks},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCHEMA_FORMAT,
            "name": self.name,
            "actions": list(self.actions),
            "tasks": [
                {"name": t.name, "actions": list(t.actions), "parent": t.parent, "weight": t.weight,
                 "transform": t.transform}
                for t in self.tasks
            ],
            "max_sequence_length": self.max_sequence_length,
            "short_sequence_length": self.short_sequence_length,
            "time_gap_buckets": self.time_gap_buckets,
            "weekday_buckets": self.weekday_buckets,
            "id_types": list(self.id_types),
            "side": self.side.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchemaSpec:
        if d.get("format") != SCHEMA_FORMAT:
            raise SchemaError(
                f"schema format {d.get('format', 1)} is not {SCHEMA_FORMAT}: retrain or re-export with this version"
            )
        try:
            tasks = tuple(
                TaskSpec(str(t["name"]), tuple(t["actions"]), t.get("parent"), float(t.get("weight", 1.0)),
                         str(t.get("transform", "identity")))
                for t in d["tasks"]
            )
            user_type, item_type = d.get("id_types", ("int", "int"))
            return cls(
                name=str(d["name"]),
                actions=tuple(d["actions"]),
                tasks=tasks,
                max_sequence_length=int(d["max_sequence_length"]),
                short_sequence_length=int(d["short_sequence_length"]),
                time_gap_buckets=int(d["time_gap_buckets"]),
                weekday_buckets=int(d["weekday_buckets"]),
                id_types=(user_type, item_type),
                side=SideFeatures.from_dict(d.get("side", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SchemaError):
                raise
            raise SchemaError(f"bad schema fields: {exc!r}") from exc

    def differences(self, other: SchemaSpec) -> list[str]:
        """Top-level fields (and side-feature groups) where two schemas differ, for error messages."""
        a, b = self.to_dict(), other.to_dict()
        out = [k for k in a if k != "side" and a[k] != b.get(k)]
        out += [f"side.{g}" for g in a["side"] if a["side"][g] != b["side"].get(g)]
        return out


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Raw int64 ids -> dense indices. Index 0 is out-of-vocabulary; known ids are 1..len(ids)."""

    ids: IntArray  # sorted, unique

    @classmethod
    def build(cls, raw_ids: npt.ArrayLike) -> Vocabulary:
        return cls(np.unique(np.asarray(raw_ids, dtype=np.int64)))

    @property
    def size(self) -> int:
        """Rows an embedding table needs: known ids plus the OOV bucket."""
        return int(self.ids.shape[0]) + 1

    def lookup(self, raw_ids: npt.ArrayLike) -> IntArray:
        raw = np.asarray(raw_ids, dtype=np.int64)
        if self.ids.shape[0] == 0:
            return np.zeros(raw.shape, dtype=np.int64)
        pos = np.searchsorted(self.ids, raw)
        pos_clipped = np.minimum(pos, self.ids.shape[0] - 1)
        found = self.ids[pos_clipped] == raw
        return np.where(found, pos_clipped + 1, 0).astype(np.int64)

    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.ids, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class FeatureSchema:
    """Spec plus vocabularies; `hash` identifies both."""

    spec: SchemaSpec
    users: Vocabulary
    items: Vocabulary
    categories: Vocabulary
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        h = hashlib.sha256()
        h.update(json.dumps(self.spec.to_dict(), sort_keys=True).encode())
        for vocab in (self.users, self.items, self.categories):
            h.update(vocab.digest().encode())
        object.__setattr__(self, "hash", h.hexdigest())

    def vocab_sizes(self) -> dict[str, int]:
        return {"user": self.users.size, "item": self.items.size, "category": self.categories.size}

    def manifest_entry(self) -> dict[str, object]:
        """What a bundle manifest records about its schema."""
        return {"hash": self.hash, "spec": self.spec.to_dict(), "vocab_sizes": self.vocab_sizes()}

    def save(self, directory: str | Path) -> list[Path]:
        """Write `schema.json` and one `.npy` per vocabulary; returns the files written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        doc = {"hash": self.hash, "spec": self.spec.to_dict(), "vocab_sizes": self.vocab_sizes()}
        written = [d / SCHEMA_FILE]
        (d / SCHEMA_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
        for key, vocab in zip(VOCAB_FILES, (self.users, self.items, self.categories), strict=True):
            np.save(d / VOCAB_FILES[key], vocab.ids.astype("<i8"))
            written.append(d / VOCAB_FILES[key])
        return written

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> FeatureSchema:
        """Read a saved schema and check that its contents still match the recorded hash."""
        d = Path(directory)
        try:
            doc = json.loads((d / SCHEMA_FILE).read_text())
            vocabs = [
                np.load(d / VOCAB_FILES[k], mmap_mode="r" if mmap else None, allow_pickle=False)
                for k in VOCAB_FILES
            ]
        except FileNotFoundError as exc:
            raise SchemaError(f"schema file missing: {exc.filename}") from exc
        except (OSError, ValueError) as exc:
            raise SchemaError(f"cannot read schema in {d}: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
            raise SchemaError(f"{d / SCHEMA_FILE} is not a schema: a JSON object with a \"spec\" object expected")
        schema = cls(SchemaSpec.from_dict(doc["spec"]), *(Vocabulary(v) for v in vocabs))
        if schema.hash != doc.get("hash"):
            raise SchemaError(
                f"schema in {d} does not match its recorded hash "
                f"({schema.hash[:12]} != {str(doc.get('hash'))[:12]}): files were changed"
            )
        return schema


# ---------------------------------------------------------------------------------------------
# Derived features: used verbatim by the offline sample builder and by the online service.


def time_gap_bucket(gap_seconds: npt.ArrayLike, n_buckets: int) -> IntArray:
    """Log2 bucket of a non-negative gap in hours: 0 for < 1 h, b for [2^b - 1, 2^(b+1) - 1) h."""
    gap_hours = np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0.0) / 3600.0
    bucket = np.floor(np.log2(1.0 + gap_hours)).astype(np.int64)
    return np.clip(bucket, 0, n_buckets - 1)


def weekday(ts: npt.ArrayLike) -> IntArray:
    """Day of week (Monday = 0) of unix seconds, UTC. 1970-01-01 was a Thursday."""
    return ((np.asarray(ts, dtype=np.int64) // 86_400) + 3) % 7


def history_features(actions: npt.NDArray[np.integer], n_actions: int = len(ACTIONS)) -> npt.NDArray[np.float32]:
    """User dense features from the user's (already time-filtered) history of action codes.

    log1p of the count of each action, then log1p of the history length.
    """
    counts = np.bincount(np.asarray(actions, dtype=np.int64), minlength=n_actions)[:n_actions]
    out = np.empty(n_actions + 1, dtype=np.float32)
    out[:n_actions] = np.log1p(counts)
    out[n_actions] = np.log1p(len(actions))
    return out


def history_features_batch(
    actions: npt.NDArray[np.integer], lengths: Sequence[int] | npt.NDArray[np.integer], n_actions: int = len(ACTIONS)
) -> npt.NDArray[np.float32]:
    """`history_features` for many histories laid end to end in `actions` (CSR by `lengths`)."""
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    owner = np.repeat(np.arange(lengths_arr.shape[0]), lengths_arr)
    counts = np.zeros((lengths_arr.shape[0], n_actions), dtype=np.int64)
    np.add.at(counts, (owner, np.asarray(actions, dtype=np.int64)), 1)
    out = np.empty((lengths_arr.shape[0], n_actions + 1), dtype=np.float32)
    out[:, :n_actions] = np.log1p(counts)
    out[:, n_actions] = np.log1p(lengths_arr)
    return out


def cross_features(
    hist_item: npt.NDArray[np.integer],
    hist_action: npt.NDArray[np.integer],
    hist_ts: npt.NDArray[np.integer],
    cand_item: npt.NDArray[np.integer],
    request_ts: int,
    n_actions: int = len(ACTIONS),
) -> npt.NDArray[np.float32]:
    """User-item cross features of each candidate against one user's history, [B, n_actions + 2].

    log1p(count of each action on this exact item), 1 if any, log1p(hours since the latest
    event on it) / 10. Unknown items (dense index 0) never match. TWIN feeds such user-item
    crosses to the model as scalars; a revisit is the strongest signal in behaviour logs.
    """
    cand = np.asarray(cand_item, dtype=np.int64)
    out = np.zeros((cand.shape[0], n_actions + 2), dtype=np.float32)
    items = np.asarray(hist_item, dtype=np.int64)
    if items.shape[0] == 0 or cand.shape[0] == 0:
        return out
    actions = np.asarray(hist_action, dtype=np.int64)
    pairs, counts = np.unique(items * n_actions + actions, return_counts=True)
    known = cand != 0
    for a in range(n_actions):
        want = cand * n_actions + a
        pos = np.minimum(np.searchsorted(pairs, want), pairs.shape[0] - 1)
        hit = (pairs[pos] == want) & known
        out[:, a] = np.where(hit, np.log1p(counts[pos]), 0.0)
    ts = np.asarray(hist_ts, dtype=np.int64)
    order = np.lexsort((ts, items))
    sorted_items = items[order]
    last = np.r_[sorted_items[1:] != sorted_items[:-1], True]
    uniq, last_ts = sorted_items[last], ts[order][last]
    pos = np.minimum(np.searchsorted(uniq, cand), uniq.shape[0] - 1)
    hit = (uniq[pos] == cand) & known
    hours = np.maximum(request_ts - last_ts[pos], 0) / 3600.0
    out[:, n_actions] = hit
    out[:, n_actions + 1] = np.where(hit, np.log1p(hours) / 10.0, 0.0)
    return out


def cross_features_batch(
    hist_item: npt.NDArray[np.integer],
    hist_action: npt.NDArray[np.integer],
    hist_ts: npt.NDArray[np.integer],
    hist_valid: npt.NDArray[np.bool_],
    cand_item: npt.NDArray[np.integer],
    request_ts: npt.NDArray[np.integer],
    n_actions: int = len(ACTIONS),
) -> npt.NDArray[np.float32]:
    """`cross_features` for a batch of samples with padded [B, L] histories (one candidate each)."""
    cand = np.asarray(cand_item, dtype=np.int64)
    match = hist_valid & (hist_item == cand[:, None]) & (cand[:, None] != 0)
    counts = np.stack([(match & (hist_action == a)).sum(axis=1) for a in range(n_actions)], axis=1)
    latest = np.where(match, hist_ts, -1).max(axis=1, initial=-1)
    return cross_features_of_matches(counts, latest, request_ts)


def cross_features_of_matches(
    counts: npt.NDArray[np.integer], latest: npt.NDArray[np.integer], request_ts: npt.NDArray[np.integer]
) -> npt.NDArray[np.float32]:
    """`cross_features` from what it reads of the history: per sample the count of each action on
    the candidate [B, A] and the newest such event's time [B] (-1: none). One formula for every
    way of finding those (a padded history, or an index of the events by item)."""
    n, n_actions = counts.shape
    out = np.zeros((n, n_actions + 2), dtype=np.float32)
    out[:, :n_actions] = np.log1p(counts)
    hit = latest >= 0
    hours = np.maximum(np.asarray(request_ts, dtype=np.int64) - latest, 0) / 3600.0
    out[:, n_actions] = hit
    out[:, n_actions + 1] = np.where(hit, np.log1p(hours) / 10.0, 0.0)
    return out
