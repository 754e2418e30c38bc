"""Experiments: sticky A/B arms, each pinning a bundle version, fusion and retrieval; plus shadows.

The config is a YAML file (`RANKSERVE_EXPERIMENTS_FILE`, format in docs/EXPERIMENTS.md),
validated in two steps: the shape with pydantic (names, shares summing to exactly 10,000
buckets), then against the registry (every pinned bundle loads, verifies and warms up; fusion
names only tasks the bundle predicts; retrieval strategy exists and k is within the bundle's
limits). Any failure refuses the whole file with one message listing every problem, and the
previous config keeps serving. It is re-read on an admin call and when the file changes.

The file's shape and the sticky bucket hash are in `spec`.

Without an experiments file there is one implicit arm, "default", serving the registry's
current (newest) model exactly as before.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from feature_store.fusion import Fusion
from service.background import run_every
from service.errors import BundleRejected, ExperimentsRejected, InvalidRequest, ModelUnavailable
from service.experiments.shadow import Shadow
from service.experiments.spec import (
    BUCKETS,
    DEFAULT_ARM,
    ExperimentsSpec,
    FusionSpec,
    RetrievalSpec,
    bucket_of,
    parse_experiments,
)
from service.observability.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry
from service.retrieval import Retriever, available_retrievers, make_retriever, parse_strategy
from service.scoring import Scorer, make_scorer
from service.settings import Settings

log = logging.getLogger("rankserve.experiments")

# -- compiled, immutable ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Arm:
    name: str
    first_bucket: int
    buckets: int
    model: LoadedModel  # a view of the pinned bundle with the arm's fusion and retrieval
    strategy: str
    shadows: tuple[Shadow, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "share": self.buckets / 100,
            "buckets": [self.first_bucket, self.first_bucket + self.buckets - 1] if self.buckets else [],
            "bundle": self.model.key,
            "fusion": self.model.fusion.describe(),
            "retrieval": {"strategy": self.strategy, "k": self.model.retrieval.k},
            "shadows": [
                {"name": s.name, "bundle": s.model.key, "sample_rate": s.sample_rate,
                 "fusion": s.model.fusion.describe(), "retrieval": {"k": s.model.retrieval.k}}
                for s in self.shadows
            ],
        }


@dataclass(frozen=True, eq=False)
class Experiments:
    salt: str
    arms: tuple[Arm, ...]
    source: Path
    digest: str
    loaded_at: float
    bundles: tuple[LoadedModel, ...] = ()  # the registry's instances the arms and shadows are views of
    ends: tuple[int, ...] = field(init=False)  # cumulative bucket bounds, for bisect

    def __post_init__(self) -> None:
        object.__setattr__(self, "ends", tuple(itertools.accumulate(a.buckets for a in self.arms)))

    def arm_at(self, bucket: int) -> Arm:
        return self.arms[bisect.bisect_right(self.ends, bucket)]

    def get(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def shadows(self) -> list[Shadow]:
        return [s for a in self.arms for s in a.shadows]


@dataclass(frozen=True)
class Route:
    """Where one request goes: its arm's name, model view and shadows."""

    arm: str
    model: LoadedModel
    shadows: tuple[Shadow, ...] = ()
    bucket: int | None = None  # None: forced by the override, or no experiments configured


@dataclass(frozen=True)
class ReloadResult:
    status: Literal["loaded", "unchanged"]
    experiments: Experiments


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


# strategies whose search runs on a thread pool: a shadow's instance gets `shadow_threads` of them
THREADED_STRATEGIES = frozenset({"exact", "faiss_knn", "eta", "sim_hard", "twin_v2"})


def build_retriever(settings: Settings, strategy: str, *, shadow: bool = False) -> Retriever:
    """A retriever instance of `strategy`, which may carry options ("eta:bits=128,shortlist=512").

    exact takes the device setting and a shadow's threaded strategy `shadow_threads` threads,
    unless the strategy's own options set them.
    """
    name, given = parse_strategy(strategy)
    options: dict[str, Any] = {}
    if name == "exact":
        options["device"] = settings.retrieval_device
    if shadow and name in THREADED_STRATEGIES:
        options["num_threads"] = settings.shadow_threads
    retriever: Retriever = make_retriever(name, **(options | given))
    return retriever


class ExperimentManager:
    """Holds the current experiments, reloads them, and routes requests to arms."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        metrics: Metrics,
        on_change: Callable[[Experiments], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.path = settings.experiments_file
        self._on_change = on_change
        self._current: Experiments | None = None
        self._last_error: str | None = None
        self._seen_state: tuple[int, int, int] | None = None
        self._lock = asyncio.Lock()
        self._shadow_scorers: dict[str, Scorer] = {}  # per bundle key: kept across reloads

    @property
    def configured(self) -> bool:
        return self.path is not None

    @property
    def current(self) -> Experiments | None:
        return self._current

    @property
    def last_error(self) -> str | None:
        return self._last_error

    # -- routing (on the request path: no I/O, no locks) --------------------------------------------

    def route(self, user_id: int | str, override: str | None = None) -> Route:
        exps = self._current
        if exps is None:
            if self.path is not None:
                raise ModelUnavailable(f"experiments file {self.path} is not loaded: {self._last_error}")
            if override not in (None, DEFAULT_ARM):
                raise InvalidRequest(f"unknown arm {override!r}: no experiments are configured, the only arm is "
                                     f"{DEFAULT_ARM!r}")
            return Route(DEFAULT_ARM, self.registry.require())
        if override is not None:
            arm = exps.get(override)
            if arm is None:
                names = ", ".join(a.name for a in exps.arms)
                raise InvalidRequest(f"unknown arm {override!r}; arms: {names}")
            return Route(arm.name, arm.model, arm.shadows)
        bucket = bucket_of(exps.salt, user_id)
        arm = exps.arm_at(bucket)
        return Route(arm.name, arm.model, arm.shadows, bucket)

    # -- loading ---------------------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """Read, validate and swap in the file; unchanged content is not reloaded.

        Raises ExperimentsRejected (the previous config keeps serving).
        """
        async with self._lock:
            path = self.path
            if path is None:
                raise ExperimentsRejected("no experiments file is configured; set RANKSERVE_EXPERIMENTS_FILE")
            state = _file_state(path)
            self._seen_state = state
            try:
                text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            except OSError as exc:
                return self._reject(f"experiments file {path} refused: cannot read it: {exc}")
            except UnicodeDecodeError as exc:  # refused like any bad content: not a crash of the loader
                return self._reject(f"experiments file {path} refused: not UTF-8 text ({exc.reason} at byte "
                                    f"{exc.start})")
            digest = hashlib.sha256(text.encode()).hexdigest()
            current = self._current
            if current is not None and current.digest == digest:
                self.metrics.experiments_reloads.labels("unchanged").inc()
                return ReloadResult("unchanged", current)
            try:
                spec = parse_experiments(text, f"experiments file {path}")
                exps = await asyncio.to_thread(self._compile, spec, path, digest)
            except ExperimentsRejected as exc:
                return self._reject(exc.message)
            if self._on_change is not None:
                try:  # shadow lanes and the sink, before the swap: a sink that cannot open refuses the file
                    self._on_change(exps)
                except (OSError, ValueError) as exc:
                    return self._reject(f"experiments file {path} refused: shadow sink unavailable: {exc}")
            self._current = exps
            self.registry.pin(exps.bundles)  # versions no arm or shadow uses any more are unloaded
            self._last_error = None
            self.metrics.experiments_reloads.labels("loaded").inc()
            self.metrics.set_series(self.metrics.arm_share,
                                    {(arm.name, arm.model.key): arm.buckets / 100 for arm in exps.arms})
            log.info("experiments loaded", extra={
                "source": str(path), "digest": digest[:12],
                "arms": {a.name: {"share": a.buckets / 100, "bundle": a.model.key,
                                  "shadows": [s.name for s in a.shadows]} for a in exps.arms},
            })
            return ReloadResult("loaded", exps)

    def _reject(self, message: str) -> ReloadResult:
        self._last_error = message
        self.metrics.experiments_reloads.labels("rejected").inc()
        serving = self._current.digest[:12] if self._current else None
        log.error("experiments refused; the previous config keeps serving",
                  extra={"reason": message, "serving_digest": serving})
        raise ExperimentsRejected(message)

    async def poll(self, stop: asyncio.Event) -> None:
        """Reload when the file's mtime, size or inode changes, every `experiments_poll_interval_s`."""
        if self.path is None:
            return
        await run_every("experiments-poller", self.settings.experiments_poll_interval_s, self._poll_once, stop)

    async def _poll_once(self) -> None:
        if self.path is None or _file_state(self.path) == self._seen_state:
            return
        with contextlib.suppress(ExperimentsRejected):  # logged with its reason; retried on the next change
            await self.reload()

    def _compile(self, spec: ExperimentsSpec, source: Path, digest: str) -> Experiments:
        """Load every pinned bundle and build the arms' and shadows' model views (in a worker thread)."""
        problems: list[str] = []
        models: dict[str, LoadedModel] = {}
        keys = {a.bundle for a in spec.arms} | {s.bundle for a in spec.arms for s in a.shadows}
        for key in sorted(keys):
            try:
                models[key] = self.registry.ensure(key)
            except (BundleRejected, ModelUnavailable) as exc:
                problems.append(f"bundle {key}: {exc.message}")
        if problems:
            raise ExperimentsRejected(f"experiments file {source} refused: {'; '.join(problems)}")

        arms: list[Arm] = []
        start = 0
        scorers: dict[str, Scorer] = {}
        for a in spec.arms:
            strategy = (a.retrieval.strategy if a.retrieval else None) or self.settings.retrieval_strategy
            try:
                primary = self._view(models[a.bundle], a.fusion, a.retrieval, None)
            except (ValueError, RuntimeError, BundleRejected) as exc:
                problems.append(f"arm {a.name!r}: {_message(exc)}")
                continue
            shadows: list[Shadow] = []
            for s in a.shadows:
                try:
                    scorer = scorers.get(s.bundle) or self._shadow_scorer(models[s.bundle])
                    scorers[s.bundle] = scorer
                    view = self._view(models[s.bundle], s.fusion or a.fusion, s.retrieval or a.retrieval, scorer)
                except (ValueError, RuntimeError, BundleRejected) as exc:
                    problems.append(f"arm {a.name!r} shadow {s.label!r}: {_message(exc)}")
                    continue
                shadows.append(Shadow(a.name, s.label, view, s.sample_rate))
            arms.append(Arm(a.name, start, a.buckets, primary, strategy, tuple(shadows)))
            start += a.buckets
        if problems:
            raise ExperimentsRejected(f"experiments file {source} refused: {'; '.join(problems)}")
        self._shadow_scorers = scorers  # sessions of shadows no longer configured are released
        return Experiments(spec.salt, tuple(arms), source, digest, time.time(), tuple(models.values()))

    def _shadow_scorer(self, model: LoadedModel) -> Scorer:
        """A separate session per shadow bundle, with few threads, so its work stays on the lane thread."""
        cached = self._shadow_scorers.get(model.key)
        if cached is not None:
            return cached
        s = self.settings
        return make_scorer(model.bundle, s.scorer_runtime, s.shadow_threads, s.execution_provider)

    def _view(
        self,
        model: LoadedModel,
        fusion: FusionSpec | None,
        retrieval: RetrievalSpec | None,
        shadow_scorer: Scorer | None,
    ) -> LoadedModel:
        """`model` with an arm's fusion and retrieval (and a shadow's own scorer and retriever).

        Raises ValueError (unknown task, bad transform, k out of range, unknown strategy).
        """
        s = self.settings
        new_fusion = model.fusion
        if fusion is not None:
            base = model.fusion.describe()
            weights = fusion.weights if fusion.weights is not None else base["weights"]
            transforms = fusion.transforms if fusion.transforms is not None else base["transforms"]
            new_fusion = Fusion(model.bundle.tasks, weights, transforms)
        settings_r = model.retrieval
        strategy = (retrieval.strategy if retrieval else None) or s.retrieval_strategy
        k = (retrieval.k if retrieval else None) or settings_r.k
        if retrieval is not None and (retrieval.k is not None or retrieval.strategy is not None):
            if not settings_r.use_retrieval:
                raise ValueError(f"bundle {model.key} has no long-term retrieval; remove its retrieval settings")
            limit = int(model.bundle.retrieval.get("max_sequence_length", model.bundle.schema.spec.max_sequence_length))
            if not 1 <= k <= limit:
                raise ValueError(f"retrieval k={k} is outside bundle {model.key}'s limits 1..{limit}")
        if parse_strategy(strategy)[0] not in available_retrievers():  # the name; options are checked when built
            raise ValueError(f"unknown retrieval strategy {strategy!r}; available: {', '.join(available_retrievers())}")
        if shadow_scorer is None and new_fusion is model.fusion and k == settings_r.k and (
            strategy == s.retrieval_strategy
        ):
            return model  # the registry's own instance: nothing differs
        retriever = model.retriever
        if shadow_scorer is not None or strategy != s.retrieval_strategy:
            retriever = build_retriever(s, strategy, shadow=shadow_scorer is not None)
        view = dataclasses.replace(
            model,
            fusion=new_fusion,
            retrieval=dataclasses.replace(settings_r, k=k),
            retriever=retriever,
            scorer=shadow_scorer or model.scorer,
        )
        if retriever is not model.retriever or shadow_scorer is not None:
            view.warm_up()  # a new retriever or session compiles / allocates here, not on the first request
        return view

    # -- admin -----------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        exps = self._current
        if exps is None:
            current = self.registry.current
            arms = []
            if current is not None and self.path is None:
                arms = [{
                    "name": DEFAULT_ARM, "share": 100.0, "buckets": [0, BUCKETS - 1], "bundle": current.key,
                    "fusion": current.fusion.describe(),
                    "retrieval": {"strategy": self.settings.retrieval_strategy, "k": current.retrieval.k},
                    "shadows": [],
                }]
            return {"source": str(self.path) if self.path else None, "digest": None, "salt": None,
                    "buckets": BUCKETS, "loaded_at": None, "arms": arms, "last_error": self._last_error}
        return {
            "source": str(exps.source),
            "digest": exps.digest,
            "salt": exps.salt,
            "buckets": BUCKETS,
            "loaded_at": exps.loaded_at,
            "arms": [a.describe() for a in exps.arms],
            "last_error": self._last_error,
        }


def _message(exc: Exception) -> str:
    return getattr(exc, "message", None) or str(exc)
