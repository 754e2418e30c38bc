"""The transport-free ranking core: fetch -> retrieve -> score -> fuse -> top-N.

`RankingService.rank(RankRequest) -> RankResponse`. REST and gRPC only decode, call and encode.
The feature fetch is I/O on the event loop; retrieval and scoring are CPU work, run on the loop
too, one request after the other. Handing each request to a worker thread and back cost about a
quarter more server CPU per request than the work itself (thread wake-ups and GIL hand-offs
around every kernel; BENCHMARKS.md), for no throughput: the kernels are serial per request.

To keep a fetch from waiting behind a queue of computations (its budget is for the store, not
the loop), a request fetches only once it holds one of `COMPUTE_TURNS` turns: the next request's
fetch overlaps the current one's computation, so a reply waits behind one computation at most (a
few ms on the standard workload, against a 100 ms budget), and the rest wait before fetching. A
computation that would wait for the kernels' launch lock (held by a shadow step or a model's
warm-up in another thread) runs on a one-thread pool instead, so the loop never waits for it.

With micro-batching on (`scorer_batch_wait_ms` > 0, meant for the CUDA provider) that pool builds
each request's scorer inputs and `service.batching.ScoreBatcher` scores the inputs of concurrent
requests in one call on its own thread; the pool then fuses each request's own rows.

A bounded number of requests (`max_waiting_requests`, counted from arrival) may be in progress;
beyond it the service answers "overloaded" at once, before any fetch, rather than letting
queueing delay blow up the tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from feature_store.codecs import Sequence
from feature_store.errors import FeatureStoreError
from feature_store.store import FetchResult, OnlineStore
from service.batching import BatcherClosed, ScoreBatcher
from service.errors import DeadlineExceeded, InvalidRequest, ModelUnavailable, Overloaded, RankServeError
from service.experiments.manager import ExperimentManager, Route
from service.experiments.shadow import ShadowRunner
from service.observability.logging_setup import arm_var, trace_id_var
from service.observability.metrics import Metrics
from service.observability.tracing import Tracing
from service.registry import EncodedContext, LoadedModel, ModelRegistry
from service.retrieval.base import kernels_busy
from service.settings import Settings
from service.types import Features, RankedItem, RankRequest, RankResponse

log = logging.getLogger("rankserve.core")

# requests that may be fetching or computing at once on the event loop (without micro-batching):
# one computes while the next one's fetch is in flight; more would only queue fetches behind
# computations, where their budget would run out
COMPUTE_TURNS = 2



@dataclass
class StageClock:
    """Per-stage wall times of one request (ms), also observed into the stage histograms.

    The stages' wall-clock boundaries (`spans`: stage, start ns, end ns) are what tracing exports.
    """

    metrics: Metrics
    timings_ms: dict[str, float] = field(default_factory=dict)
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    started_ns: int = field(default_factory=time.time_ns)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        seconds = now - self._t
        self._t = now
        self.timings_ms[stage] = round(seconds * 1000, 3)
        self.metrics.stage_seconds.labels(stage).observe(seconds)
        end_ns = time.time_ns()
        self.spans.append((stage, end_ns - int(seconds * 1e9), end_ns))


def top_n(scores: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.int64]:
    """Indices of the n highest scores, best first; ties keep the candidates' input order."""
    n = min(n, scores.shape[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n < scores.shape[0]:
        part = np.argpartition(-scores, n - 1)[:n]
        # include every candidate tied with the n-th score, so the stable sort decides ties by input order
        cutoff = scores[part].min()
        part = np.flatnonzero(scores >= cutoff)
    else:
        part = np.arange(scores.shape[0])
    order = part[np.lexsort((part, -scores[part]))]
    return order[:n].astype(np.int64)


class RankingService:
    """Ranks candidates for one user. Owns nothing transport-specific.

    `experiments` routes each request to an arm (one implicit "default" arm serving the newest
    model when no experiments file is configured); `shadows` receives the sampled shadow jobs
    after the primary answer is computed.
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        store: OnlineStore,
        metrics: Metrics,
        experiments: ExperimentManager | None = None,
        shadows: ShadowRunner | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.experiments = experiments or ExperimentManager(settings, registry, metrics)
        self.shadows = shadows
        # micro-batching's input building and fusion; a computation that would wait for the kernels' launch lock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank-cpu")
        self._turns = asyncio.Semaphore(COMPUTE_TURNS)
        self._in_progress = 0
        self.max_in_progress = settings.max_waiting_requests
        # cross-request micro-batching of the scorer (off unless scorer_batch_wait_ms > 0)
        self.batcher: ScoreBatcher | None = None
        if settings.scorer_batch_wait_ms > 0:
            self.batcher = ScoreBatcher(settings.scorer_batch_wait_ms / 1000, settings.scorer_batch_max_candidates,
                                        on_batch=metrics.observe_scorer_batch)

    def close(self) -> None:
        """Finish the queued CPU work, then score what waits in the batcher (drain) and stop its thread."""
        self._pool.shutdown(wait=True, cancel_futures=False)
        if self.batcher is not None:
            self.batcher.close()

    @property
    def cpu_queue_depth(self) -> int:
        """Requests admitted and not yet answered: fetching, queued for CPU or on it (the overload bound)."""
        return self._in_progress

    def validate(self, req: RankRequest) -> int:
        """Check limits; returns the effective top_n. Raises InvalidRequest saying what to fix.

        Ids and context are checked against the serving model's schema once the request is routed.
        """
        s = self.settings
        if len(req.candidates) > s.max_candidates:
            raise InvalidRequest(
                f"{len(req.candidates)} candidates exceed the limit of {s.max_candidates}; split the request"
            )
        n = s.default_top_n if req.top_n is None else req.top_n
        if not 1 <= n <= s.max_top_n:
            raise InvalidRequest(f"top_n must be between 1 and {s.max_top_n}, got {n}")
        if req.request_time is not None and not 0 <= req.request_time < 1 << 32:
            raise InvalidRequest(f"request_time must be unix seconds in 0..{(1 << 32) - 1}, got {req.request_time}")
        return n

    async def fetch(self, user_key: int, item_keys: list[int], context: Mapping[str, Any] | None = None) -> Features:
        """One store round trip within the fetch budget; on failure, rank with what we have.

        `user_key` / `item_keys` are the resolved int64 store keys; `context` rides along (raw) for shadows.
        """
        n = len(item_keys)
        try:
            result: FetchResult = await asyncio.wait_for(
                self.store.fetch(user_key, item_keys), timeout=self.settings.fetch_budget_s
            )
        except (FeatureStoreError, TimeoutError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.metrics.degraded.labels(reason).inc()
            log.warning("feature store unavailable, ranking degraded", extra={"reason": reason, "error": str(exc)})
            zeros = np.zeros(n, dtype=np.int64)
            return Features(0, Sequence.empty(), zeros, zeros, reason, context=context)
        return Features(
            user_index=result.user_index or 0,
            history=result.sequence,
            item_index=result.item_index,
            category_index=result.category_index,
            degraded_reason=None,
            user_side=result.user_side,
            item_side=result.item_side,
            item_found=result.found,
            context=context,
        )

    def _compute(
        self, model: LoadedModel, feats: Features, context: EncodedContext | None, request_ts: int, n: int,
        clock: StageClock,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float32]]:
        probs = model.scorer.predict(self._prepare(model, feats, context, request_ts, clock))
        clock.lap("score")
        return self._fuse(model, probs, n, clock)

    def _fuse(
        self, model: LoadedModel, probs: npt.NDArray[np.float32], n: int, clock: StageClock
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float32]]:
        fused = model.fusion(probs)
        order = top_n(fused, n)
        clock.lap("fuse")
        return order, fused, probs

    def _prepare(
        self, model: LoadedModel, feats: Features, context: EncodedContext | None, request_ts: int, clock: StageClock
    ) -> dict[str, np.ndarray]:
        """Gather and retrieve (the pool's part of a batched request): the scorer inputs."""
        history = model.searched_history(feats.history, request_ts)
        self.metrics.history_length.observe(len(history))
        inputs = model.inputs(history, feats.user_index, feats.item_index, feats.category_index, request_ts,
                              model.side_rows(feats, context))
        clock.lap("retrieve")
        return inputs

    @contextlib.asynccontextmanager
    async def _turn(self, deadline: float) -> AsyncIterator[None]:
        """One of the `COMPUTE_TURNS` turns to fetch and rank, waited for within the deadline (none
        with micro-batching: its requests must reach the batcher together)."""
        if self.batcher is not None:
            yield
            return
        async with asyncio.timeout(deadline - time.perf_counter()):
            await self._turns.acquire()
        try:
            yield
        finally:
            self._turns.release()

    async def _rank_fetched(
        self, model: LoadedModel, feats: Features, context: EncodedContext | None, request_ts: int, n: int,
        clock: StageClock, deadline: float,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float32]]:
        """Retrieve, score and fuse: on the loop, or off it where it would wait (the batcher, the launch lock)."""
        work: Awaitable[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float32]]]
        if self.batcher is not None:
            work = self._compute_batched(self.batcher, model, feats, context, request_ts, n, clock)
        elif kernels_busy():
            # a shadow step or a model's warm-up is in a parallel kernel: wait for it on the pool, not
            # on the loop, which would stall every other request and the probes
            work = asyncio.get_running_loop().run_in_executor(
                self._pool, self._compute, model, feats, context, request_ts, n, clock)
        elif time.perf_counter() >= deadline:  # on the loop a computation cannot be cut short: not begun
            raise TimeoutError
        else:
            return self._compute(model, feats, context, request_ts, n, clock)
        return await asyncio.wait_for(work, timeout=deadline - time.perf_counter())

    async def _compute_batched(
        self, batcher: ScoreBatcher, model: LoadedModel, feats: Features, context: EncodedContext | None,
        request_ts: int, n: int, clock: StageClock,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float32]]:
        """`_compute` with the scorer call shared: inputs on the pool, scoring in the batcher, fusion on the pool.

        The pool is free while a request waits for its batch, so the next requests' inputs are built
        meanwhile and join it. Cancelled (deadline) before its batch is taken, a request is left out of it.
        """
        loop = asyncio.get_running_loop()
        inputs = await loop.run_in_executor(self._pool, self._prepare, model, feats, context, request_ts, clock)
        try:
            future = batcher.submit(model.scorer, inputs)
        except BatcherClosed as exc:
            raise ModelUnavailable("the service is shutting down; retry on another replica") from exc
        probs = await asyncio.wrap_future(future)
        clock.lap("score")  # the wait for the batch included
        return await loop.run_in_executor(self._pool, self._fuse, model, probs, n, clock)

    async def rank(self, req: RankRequest) -> RankResponse:
        clock = StageClock(self.metrics)
        span = self.tracing.start(req.trace_headers, clock.started_ns) if self.tracing is not None else None
        if span is not None:
            # bound for the rest of the request's task (each REST or gRPC request has its own), so
            # the adapters' own error lines carry it too
            trace_id_var.set(span.trace_id)
        attributes: dict[str, str | int | float | bool] = {"rankserve.candidates": len(req.candidates)}
        if req.request_id is not None:
            attributes["rankserve.request_id"] = req.request_id
        error: BaseException | None = None
        try:
            n = self.validate(req)
            route = self.experiments.route(req.user_id, req.arm)
            attributes.update({"rankserve.arm": route.arm, "rankserve.model": route.model.key})
            resp = await self._rank_in_arm(req, n, route, clock)
            attributes["rankserve.degraded"] = resp.degraded
            return resp
        except RankServeError as exc:
            error = exc
            # one line per refused or failed request (the response says the same to the caller)
            level = logging.INFO if exc.http_status < 500 else logging.WARNING
            log.log(level, "request not ranked", extra={"code": exc.code, "reason": exc.message})
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            if span is not None:
                span.finish(clock.spans, attributes, error)

    async def _rank_in_arm(self, req: RankRequest, n: int, route: Route, clock: StageClock) -> RankResponse:
        token = arm_var.set(route.arm)  # every log line of this request carries its arm
        outcome = "internal"
        activity = self.shadows.activity if self.shadows is not None else None
        if activity is not None:
            activity.enter()  # shadow steps start only while no request is being ranked (fetch decode included)
        try:
            resp = await self._rank(req, n, route, clock)
            outcome = "degraded" if resp.degraded else "ok"
            return resp
        except RankServeError as exc:
            outcome = exc.code
            raise
        finally:
            if activity is not None:
                activity.leave()
            self.metrics.arm_requests.labels(route.arm, outcome).inc()
            arm_var.reset(token)

    async def _rank(self, req: RankRequest, n: int, route: Route, clock: StageClock) -> RankResponse:
        model = route.model
        arm = route.arm
        started = time.perf_counter()
        self.metrics.candidates.observe(len(req.candidates))
        request_ts = int(time.time()) if req.request_time is None else req.request_time
        # the ids and the context as this arm's model reads them (its schema): bad ones are the caller's error
        user_key = model.resolve_user(req.user_id)
        item_keys = model.resolve_items(req.candidates)
        context = model.encode_context(req.context)
        if not req.candidates:
            return RankResponse([], model.key, arm, False, req.request_id)

        # admitted from arrival: a request that cannot be served soon is refused before it costs a
        # store round trip, and the bound counts requests in the fetch as well as those queued for CPU
        if self._in_progress >= self.max_in_progress:
            raise Overloaded(f"{self._in_progress} requests are in progress (limit {self.max_in_progress}); "
                             "retry after a short backoff")
        self._in_progress += 1
        deadline = started + self.settings.request_timeout_s
        try:
            async with self._turn(deadline):
                clock.lap("queue")
                feats = await self.fetch(user_key, item_keys, req.context)
                clock.lap("fetch")
                order, fused, probs = await self._rank_fetched(model, feats, context, request_ts, n, clock, deadline)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"ranking took longer than {self.settings.request_timeout_s}s") from exc
        finally:
            self._in_progress -= 1

        tasks = model.bundle.tasks
        cands = req.candidates
        # Python floats of the top rows in two calls: indexing numpy scalars per item cost ~4 µs each
        top_scores: list[float] = fused[order].tolist()
        top_probs: list[list[float]] = probs[order].tolist()
        items = [
            RankedItem(
                item_id=cands[i],  # as sent: an int stays an int, a string a string
                score=score,
                task_scores=dict(zip(tasks, task_probs, strict=True)),
            )
            for i, score, task_probs in zip(order.tolist(), top_scores, top_probs, strict=True)
        ]
        clock.lap("encode")
        elapsed = time.perf_counter() - started
        self.metrics.request_seconds.labels(arm).observe(elapsed)
        if items:
            self.metrics.fused_score.labels(arm).observe(items[0].score)
        if route.shadows and self.shadows is not None and feats.degraded_reason is None:
            # shadows compare on real features only; jobs are enqueued after this call returns
            self.shadows.offer(
                route.shadows, request_id=req.request_id, user_id=req.user_id, candidates=req.candidates, top_n=n,
                request_ts=request_ts, features=feats, primary=model, fused=fused, probs=probs,
                primary_seconds=elapsed,
            )
        debug: dict[str, object] = {}
        if req.debug:
            searched = model.searched_history(feats.history, request_ts)  # a view, no copy
            debug = {
                "history_length": len(searched),
                # the newest behaviour searched: how fresh the streamed history is
                "history_newest_ts": int(searched.timestamp[-1]) if len(searched) else None,
                "user_known": feats.user_index != 0,
                "items_known": int(np.count_nonzero(feats.item_index)),
                "degraded_reason": feats.degraded_reason,
                "fusion": model.fusion.describe(),
                "experiment": {"arm": arm, "bucket": route.bucket, "retrieval_k": model.retrieval.k},
            }
        return RankResponse(
            items=items,
            model=model.key,
            arm=arm,
            degraded=feats.degraded_reason is not None,
            request_id=req.request_id,
            timings_ms={**clock.timings_ms, "total": round(elapsed * 1000, 3)} if req.debug else {},
            debug=debug,
        )
