"""Model registry: bundles in MODEL_DIR/<name>/<version>/, verified, warmed up, swapped atomically.

A `LoadedModel` is immutable. Swapping replaces one reference, so a request that already took
the old model finishes on it while new requests get the new one. A bundle that fails any check
(sha256, schema hash against the feature store, scorer load, warm-up inference) is refused
with a logged reason and the current model keeps serving.

Only what can still serve stays loaded: the current model and the versions pinned by experiment
arms and shadows (`pin`). Everything else is dropped at each swap, so a long-running process that
hot-swaps many versions holds the scorer sessions and tables of a few, not of all it ever loaded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.bundle import Bundle, BundleError, list_versions, open_bundle
from feature_store.codecs import Sequence
from feature_store.fusion import Fusion
from feature_store.schema import SchemaSpec
from feature_store.spec import ContextError, encode_context
from service.assemble import RetrievalSettings, SideRows, Tables, scorer_inputs
from service.background import run_every
from service.errors import BundleRejected, InvalidRequest, ModelUnavailable
from service.ids import resolve_candidates, resolve_user
from service.retrieval import Retriever
from service.scoring import Scorer, make_scorer, resolve_runtime
from service.settings import Settings
from service.types import Features, RawId

log = logging.getLogger("rankserve.registry")

MakeRetriever = Callable[[], Retriever]
EncodedContext = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """Everything a request needs from one bundle, ready to use."""

    bundle: Bundle
    scorer: Scorer
    tables: Tables
    retrieval: RetrievalSettings
    fusion: Fusion
    retriever: Retriever
    loaded_at: float

    @property
    def key(self) -> str:
        return f"{self.bundle.name}/{self.bundle.version}"

    @property
    def spec(self) -> SchemaSpec:
        """The bundle's schema: its id types, actions, tasks and side features."""
        return self.bundle.schema.spec

    @cached_property
    def has_side(self) -> bool:
        """The scorer reads side features (`side_ids` / `side_values`)."""
        side = self.spec.side
        return bool(side.n_ids or side.n_values)

    # -- per request: ids and context, with this model's schema (InvalidRequest naming the field) --------

    def resolve_user(self, user_id: RawId) -> int:
        return resolve_user(user_id, self.spec.id_types[0])

    def resolve_items(self, candidates: SequenceABC[RawId]) -> list[int]:
        return resolve_candidates(candidates, self.spec.id_types[1])

    def encode_context(self, context: Mapping[str, Any] | None) -> EncodedContext | None:
        """The request's context as codes and values of this schema; None when it has no context features."""
        group = self.spec.side.context
        if not context and not group.names:
            return None
        try:
            return encode_context(group, context)
        except ContextError as exc:
            raise InvalidRequest(str(exc)) from None

    def searched_history(self, history: Sequence, request_ts: int) -> Sequence:
        """The events this model searches for a request at `request_ts`: the newest
        `max_sequence_length` of its schema before it, as its training samples were built
        (`models.batching.Collator`). The store may hold a few more: it trims capped sequences lazily."""
        return history.before(request_ts).last(self.spec.max_sequence_length)

    def side_rows(self, feats: Features, context: EncodedContext | None) -> SideRows | None:
        """What `inputs` needs of the fetched side bytes and the encoded context (None: no side features)."""
        if not self.has_side:
            return None
        return SideRows(feats.user_side, feats.item_side, feats.item_found, context)

    def describe(self) -> dict[str, Any]:
        return {
            **self.bundle.describe(),
            "fusion": self.fusion.describe(),
            "runtime": self.scorer.runtime,
            # the TorchScript scorer is always float, whatever the bundle's ONNX scorer is
            "scorer_quantization": self.bundle.scorer_quantization if self.scorer.runtime == "onnx" else None,
            "provider": self.scorer.provider,
            "loaded_at": self.loaded_at,
        }

    def inputs(
        self, history: Sequence, user_index: int, item: np.ndarray, category: np.ndarray, request_ts: int,
        side: SideRows | None = None, lap: Callable[[str], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Gather and retrieve: the scorer inputs for one request (side features: `side`, else the defaults;
        `lap`: `scorer_inputs`' timer hook)."""
        return scorer_inputs(
            self.tables, self.retrieval, self.retriever, history, user_index, item, category, request_ts,
            spec=self.spec, side=side, lap=lap,
        )

    def score(
        self, history: Sequence, user_index: int, item: np.ndarray, category: np.ndarray, request_ts: int,
        side: SideRows | None = None,
    ) -> np.ndarray:
        return self.scorer.predict(self.inputs(history, user_index, item, category, request_ts, side))

    def warm_up(self) -> None:
        """Run synthetic requests through retrieval and scoring (JIT, allocators, page cache)."""
        rng = np.random.default_rng(0)
        n_items = self.tables.item_key.shape[0]
        n_cats = self.tables.category_key.shape[0]
        now = int(time.time())
        # empty, shorter than k, longer than k, and a long history that repeats its behaviours (the
        # distinct-row path and the ordered exact scan): every kernel compiles here, not in a request
        for length, n_cand, repeats in ((0, 1, 1), (3, 7, 1), (2 * self.retrieval.k + 5, 64, 1), (700, 64, 4)):
            pick = np.tile(np.arange(length), repeats)
            hist = Sequence(
                item=rng.integers(0, n_items, length)[pick],
                category=rng.integers(0, n_cats, length)[pick],
                action=rng.integers(0, self.spec.n_actions, length)[pick],
                # repeats within the last hour: one time-gap bucket, so the behaviours repeat exactly
                timestamp=np.sort(rng.integers(now - (3000 if repeats > 1 else 30 * 86_400), now, length * repeats)),
            )
            probs = self.score(hist, 0, rng.integers(0, n_items, n_cand), rng.integers(0, n_cats, n_cand), now)
            if probs.shape != (n_cand, len(self.bundle.tasks)) or not np.all(np.isfinite(probs)):
                raise BundleRejected(f"warm-up produced {probs.shape} / non-finite scores")


class ModelRegistry:
    """Holds the serving model and loads new versions; thread-safe, swap is one assignment."""

    def __init__(
        self,
        settings: Settings,
        retriever_factory: MakeRetriever,
        schema_hash: Callable[[], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self._retriever_factory = retriever_factory
        self._schema_hash = schema_hash or (lambda: None)
        self._current: LoadedModel | None = None
        self._loaded: dict[str, LoadedModel] = {}
        self._pinned: frozenset[str] = frozenset()  # keys the experiments' arms and shadows use
        self._refused: dict[Path, str] = {}  # path -> reason, so a bad bundle is not retried every poll
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # one bundle load at a time (poller, admin reload, experiments)
        self.swaps = 0

    # -- reads -----------------------------------------------------------------------------------

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def require(self) -> LoadedModel:
        model = self._current
        if model is None:
            raise ModelUnavailable(f"no model is loaded yet from {self.settings.model_dir}")
        return model

    def get(self, key: str) -> LoadedModel | None:
        """A loaded model by "name/version" (experiments pin versions)."""
        return self._loaded.get(key)

    def loaded(self) -> list[LoadedModel]:
        with self._lock:  # loader threads write it while the event loop reads
            return list(self._loaded.values())

    def refused(self) -> dict[str, str]:
        with self._lock:
            return {str(p): reason for p, reason in self._refused.items()}

    # -- loading ---------------------------------------------------------------------------------

    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        root = self.settings.model_dir
        names = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
        )
        if len(names) != 1:
            raise ModelUnavailable(
                f"{root} holds bundles {names or 'none'}; set RANKSERVE_MODEL_NAME to choose one"
                if names
                else f"no bundles under {root}: export one with `rankserve export --out {root}`"
            )
        return names[0]

    def load(self, path: Path) -> LoadedModel:
        """Open, verify and warm up one bundle; raises BundleRejected with the reason."""
        s = self.settings
        try:
            bundle = open_bundle(path, verify=s.verify_bundles)
        except BundleError as exc:
            raise BundleRejected(str(exc)) from exc
        store_hash = self._schema_hash()
        if store_hash is not None and store_hash != bundle.schema.hash:
            # name what differs, from the schema the store recorded at ingest (StoreSchemaHash.schema), when known
            stored = getattr(self._schema_hash, "schema", None)
            known = getattr(stored, "schema_hash", None) == store_hash
            differs = stored.difference(bundle.schema.spec) if stored is not None and known else ""
            raise BundleRejected(
                f"{path}: schema {bundle.schema.hash[:12]} does not match the feature store's active schema "
                f"{store_hash[:12]}{differs}; ingest with this bundle's schema "
                f"(`rankserve ingest --schema {path}`) first"
            )
        quantized = bundle.scorer_quantization is not None and resolve_runtime(bundle, s.scorer_runtime) == "onnx"
        if quantized and s.scorer_batch_wait_ms > 0:
            # dynamic quantization scales a call's inputs by the whole batch: batched with other requests, a
            # candidate's scores would depend on them, and micro-batching promises each request its own
            raise BundleRejected(
                f"{path}: its ONNX scorer is quantized ({bundle.scorer_quantization}), whose scores depend on the "
                f"other rows of a batch, and micro-batching is on (scorer_batch_wait_ms={s.scorer_batch_wait_ms}); "
                "set RANKSERVE_SCORER_BATCH_WAIT_MS=0 or serve a float bundle"
            )
        try:
            model = LoadedModel(
                bundle=bundle,
                scorer=make_scorer(bundle, s.scorer_runtime, s.threads, s.execution_provider),
                tables=Tables.from_dict(bundle.tables),
                retrieval=RetrievalSettings.from_manifest(bundle.retrieval, bundle.schema.spec.time_gap_buckets),
                fusion=Fusion.from_declared(bundle.tasks, bundle.fusion, s.fusion_weights, s.fusion_transforms),
                retriever=self._retriever_factory(),
                loaded_at=time.time(),
            )
            model.warm_up()
        except BundleRejected:
            raise
        except Exception as exc:  # whatever a broken bundle raises refuses it; it never serves nor stops a loop
            raise BundleRejected(f"{path}: cannot load: {exc}") from exc
        return model

    def _refuse(self, path: Path, exc: BundleRejected) -> None:
        with self._lock:
            self._refused[path] = exc.message
        log.error("bundle refused", extra={"bundle": str(path), "reason": exc.message})

    def _accept(self, path: Path) -> None:
        with self._lock:
            self._refused.pop(path, None)

    def _install(self, model: LoadedModel) -> None:
        with self._lock:
            old = self._current
            self._loaded[model.key] = model
            self._current = model
            self.swaps += 1
            dropped = self._drop_unused()
        log.info("model serving", extra={"model": model.key, "previous": old.key if old else None,
                                         "dropped": dropped})

    def pin(self, models: Iterable[LoadedModel]) -> None:
        """Keep exactly these (the experiments' arms and shadows) loaded beside the current model."""
        with self._lock:
            for model in models:
                self._loaded[model.key] = model
            self._pinned = frozenset(m.key for m in models)
            dropped = self._drop_unused()
        if dropped:
            log.info("models unloaded", extra={"models": dropped})

    def _drop_unused(self) -> list[str]:
        """Forget every model neither current nor pinned (caller holds the lock); their keys."""
        current = self._current.key if self._current is not None else None
        dropped = [key for key in self._loaded if key != current and key not in self._pinned]
        for key in dropped:
            del self._loaded[key]
        return dropped

    def ensure(self, key: str) -> LoadedModel:
        """The bundle "name/version", loaded (verified, warmed up) if not yet; never made current.

        Experiments pin versions with it. Raises BundleRejected saying what is missing or wrong.
        """
        model = self._loaded.get(key)
        if model is not None:
            return model
        name, _, version = key.partition("/")
        root = self.settings.model_dir
        path = root / name / version
        if not name or name.startswith(".") or not version.isdigit() or not path.is_dir():
            versions = list_versions(root, name) if name and not name.startswith(".") else []
            raise BundleRejected(
                f"no bundle {key} under {root} (versions of {name!r}: {versions or 'none'})"
            )
        with self._loading:
            model = self._loaded.get(key)
            if model is not None:
                return model
            try:
                model = self.load(path)
            except BundleRejected as exc:
                self._refuse(path, exc)
                raise
            self._accept(path)
            if model.key != key:
                raise BundleRejected(f"{path}: its manifest says {model.key}, not {key}")
            with self._lock:
                self._loaded[key] = model
        log.info("model loaded (pinned, not current)", extra={"model": key})
        return model

    def load_version(self, version: int | None = None) -> LoadedModel:
        """Load `version` (default: the newest not refused) and make it current."""
        with self._loading:
            return self._load_version(version)

    def _load_version(self, version: int | None) -> LoadedModel:
        name = self.model_name()
        versions = list_versions(self.settings.model_dir, name)
        if version is not None:
            if version not in versions:
                raise BundleRejected(f"no version {version} of {name} under {self.settings.model_dir}")
            candidates = [version]
        else:
            candidates = [v for v in reversed(versions) if self.settings.model_dir / name / str(v) not in self._refused]
        if not candidates:
            raise ModelUnavailable(f"no loadable version of {name} under {self.settings.model_dir}")
        last_error = ""
        for v in candidates:
            path = self.settings.model_dir / name / str(v)
            current = self._current
            if current is not None and current.bundle.path == path and version is None:
                return current
            pinned = self._loaded.get(f"{name}/{v}") if version is None else None
            if pinned is not None and pinned.bundle.path == path:  # already loaded for an experiment
                self._install(pinned)
                return pinned
            try:
                model = self.load(path)
            except BundleRejected as exc:
                self._refuse(path, exc)
                last_error = exc.message
                continue
            self._accept(path)
            self._install(model)
            return model
        raise BundleRejected(last_error)

    def newer_version_available(self) -> bool:
        try:
            name = self.model_name()
        except ModelUnavailable:
            return False
        current = self._current
        for v in reversed(list_versions(self.settings.model_dir, name)):
            path = self.settings.model_dir / name / str(v)
            if path in self._refused:
                continue
            return current is None or v > current.bundle.version
        return False

    async def poll(self, stop: asyncio.Event) -> None:
        """Pick up new versions every `poll_interval_s` until `stop` is set."""
        await run_every("model-poller", self.settings.poll_interval_s, self._poll_once, stop)

    async def _poll_once(self) -> None:
        if not self.newer_version_available():
            return
        try:
            await asyncio.to_thread(self.load_version)
        except (BundleRejected, ModelUnavailable) as exc:
            log.warning("new version not loaded", extra={"reason": exc.message})
