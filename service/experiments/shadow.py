"""Shadow traffic: score a sample of live requests with other bundles, off the critical path.

After the primary answer is computed, `ShadowRunner.offer` samples each of the arm's shadows and
schedules (`loop.call_soon`) one job per sampled shadow into that shadow's *lane*: a bounded
asyncio queue (full: the job is dropped and counted) drained by one worker task, which runs the
CPU part on the lane's own single thread, never on the primary's CPU executor. A lane per
shadow, so a slow or broken shadow starves only itself.

A job reuses the primary's fetched features (no second store round trip), runs retrieval and
scoring with the shadow's bundle, compares the two rankings (`service.experiments.agreement`), observes the
per-shadow histograms and writes one record to the sink. A shadow that raises is counted as an
error; one slower than `shadow_timeout_s` is counted as a timeout and its result discarded (a
thread cannot be interrupted, so the lane waits for it before taking the next job: at most one
job per lane runs at any time). Neither ever reaches the primary's response.

On 2 cores the shadow competes with the primary for CPU and for the GIL; what is off the
critical path is the waiting, not the cycles. So a shadow job runs in steps of `shadow_chunk`
candidates (retrieval + scoring of that slice; per-candidate results do not depend on the rest
of the batch) and, with `shadow_yield` (the default), starts each half of a step (retrieval,
then scoring) only once no request has been ranked, fetch included, for `shadow_quiet_ms`
(`PrimaryActivity`). Steps run one at a time in the process, and at most `shadow_cpu_share` of
wall time goes to them (`StepBudget`). A primary request that arrives meanwhile so shares the
CPU with at most half of one step. A shadow that cannot get its steps in before
`shadow_timeout_s` (a saturated primary, a spent budget) is abandoned and counted as `starved`:
shadow traffic is best effort. Each shadow bundle also gets its own ONNX Runtime session with
`shadow_threads` (1) intra-op threads, so its work stays on the lane thread. See
loadtest/bench_shadow.py for the measured cost.

`RANKSERVE_SHADOW_FAULT` (`sleep:10x`, `raise`, or per shadow `slow=sleep:10x,bad=raise`) is a
testing aid that makes shadows slow or failing; it never applies to primaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from feature_store.logs import RateLimitedLog
from service.experiments.agreement import compare
from service.experiments.faults import parse_fault
from service.experiments.sinks import JsonlSink, NullSink, RedisStreamSink, Sink
from service.observability.metrics import Metrics
from service.registry import LoadedModel
from service.settings import Settings
from service.types import Features, RawId

log = logging.getLogger("rankserve.shadow")
T = TypeVar("T")

F32 = npt.NDArray[np.float32]
ERROR_LOG_INTERVAL_S = 10.0  # a shadow failing on every request logs once per interval, not per request


@dataclass(frozen=True, eq=False)
class Shadow:
    """One shadow of an arm: a model view (own scorer session and retriever) and a sample rate."""

    arm: str
    name: str
    model: LoadedModel
    sample_rate: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.arm, self.name)


class PrimaryActivity:
    """How many requests are being ranked, and since when none is; shadow steps wait for quiet.

    `enter`/`leave` run on the event loop around each rank call; `wait_quiet` on lane threads.
    """

    def __init__(self) -> None:
        self._active = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._idle_since = time.monotonic()

    def enter(self) -> None:
        with self._lock:
            self._active += 1
            self._idle.clear()

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._idle_since = time.monotonic()
                self._idle.set()

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """True once no request has been ranked for `quiet_s`; False if that takes over `timeout_s`.

        Requiring a quiet period, not just a gap, keeps shadow steps out of the sub-millisecond
        pauses between back-to-back requests, where they would overlap the next one.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._idle.wait(remaining):
                return False
            quiet = time.monotonic() - self._idle_since
            if quiet >= quiet_s:
                if self._idle.is_set():  # still quiet: no request arrived while we looked
                    return True
                continue
            time.sleep(min(quiet_s - quiet, max(0.0, deadline - time.monotonic())))


class StepBudget:
    """One shadow step at a time in the process, and at most `share` of wall time spent in steps.

    After a step of t seconds the next one may start t * (1/share - 1) later: the shadows' CPU is
    capped whatever their sample rates, and the jobs beyond the cap wait, then starve or drop.
    """

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share = share
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self, deadline: float) -> None:
        """Hold the step slot once the budget allows; ShadowAbandoned("starved") if not before `deadline`."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.perf_counter())):
            raise ShadowAbandoned("starved", "other shadow steps held the slot until shadow_timeout_s")
        wait = self._next - time.perf_counter()
        if wait > 0:
            if time.perf_counter() + wait > deadline:
                self._lock.release()
                raise ShadowAbandoned("starved", "the shadow CPU budget (shadow_cpu_share) ran out before the timeout")
            time.sleep(wait)

    def release(self, spent_s: float) -> None:
        self._next = time.perf_counter() + spent_s * (1 / self.share - 1)
        self._lock.release()


class ShadowAbandoned(Exception):
    """A shadow job given up on purpose; `outcome` is its metric label (timeout, starved)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


# -- jobs and lanes --------------------------------------------------------------------------------


@dataclass(eq=False)
class ShadowJob:
    """Everything a shadow needs from one primary request (all arrays are read-only from here on)."""

    shadow: Shadow
    request_id: str | None
    user_id: RawId  # as sent
    candidates: list[RawId]
    top_n: int
    request_ts: int
    features: Features
    primary_model: str
    primary_tasks: list[str]
    primary_fused: npt.NDArray[np.float64]
    primary_probs: F32
    primary_seconds: float
    expired: bool = False  # set by the lane on timeout: the thread then discards its result


def _lower_priority(nice: int) -> None:
    """Thread initializer: raise this thread's nice value (Linux schedules threads individually)."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted: run at normal priority
        log.debug("cannot lower the shadow thread's priority: %s", exc)


class _Lane:
    """One shadow's bounded queue, worker task and thread."""

    def __init__(self, runner: ShadowRunner, shadow: Shadow) -> None:
        self.runner = runner
        self.arm, self.name = shadow.key
        s = runner.settings
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=s.shadow_queue_size)
        self.pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"shadow-{self.name}"[:15], initializer=_lower_priority,
            initargs=(s.shadow_nice,),
        )
        self.task = asyncio.create_task(self._work(), name=f"shadow-{self.arm}-{self.name}")
        self._failures = RateLimitedLog(log, ERROR_LOG_INTERVAL_S)  # per message: a starved job must not hide an error

    def offer(self, job: ShadowJob) -> None:
        m = self.runner.metrics
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            m.shadow_jobs.labels(self.arm, self.name, "dropped").inc()
            return
        m.shadow_queue.labels(self.arm, self.name).set(self.queue.qsize())

    async def _work(self) -> None:
        m = self.runner.metrics
        try:
            while True:
                job = await self.queue.get()
                m.shadow_queue.labels(self.arm, self.name).set(self.queue.qsize())
                m.shadow_inflight.labels(self.arm, self.name).inc()
                try:
                    await self._run(job)
                finally:
                    m.shadow_inflight.labels(self.arm, self.name).dec()
        finally:  # retired: this lane's gauges go away with it
            for gauge in (m.shadow_queue, m.shadow_inflight):
                m.drop_series(gauge, (self.arm, self.name))

    async def _run(self, job: ShadowJob) -> None:
        m = self.runner.metrics
        # the job checks its own deadline between steps; this backstop covers one step that hangs
        backstop = 2 * self.runner.settings.shadow_timeout_s
        future = asyncio.get_running_loop().run_in_executor(self.pool, self.runner.process, job)
        try:
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # arrives as the inner future completes, and this lane would then never stop
            done, _ = await asyncio.wait({future}, timeout=backstop)
            if not done:
                job.expired = True
                m.shadow_jobs.labels(self.arm, self.name, "timeout").inc()
                self._log_failure("shadow timed out", f"one step ran past {backstop} s")
                await asyncio.wait({future})  # one job per lane at a time, even past its timeout
        except asyncio.CancelledError:
            # retiring: a thread cannot be interrupted; give the running job a bounded chance to end
            # so in-flight counts stay true, then stop
            job.expired = True
            await asyncio.wait({future}, timeout=backstop)
            raise
        exc = future.exception() if future.done() and not future.cancelled() else None  # always retrieved
        if exc is None or job.expired:  # a timed-out job was counted above; a retired one is not counted
            return
        outcome = exc.outcome if isinstance(exc, ShadowAbandoned) else "error"
        m.shadow_jobs.labels(self.arm, self.name, outcome).inc()  # counted and logged here, never raised
        self._log_failure(f"shadow {outcome}", repr(exc))

    def _log_failure(self, message: str, detail: str) -> None:
        self._failures.warning(message, arm=self.arm, shadow=self.name, error=detail)

    def retire(self) -> None:
        """Stop taking jobs; a job already running finishes on its thread, queued ones are dropped."""
        self.task.cancel()
        dropped = self.queue.qsize()
        if dropped:
            self.runner.metrics.shadow_jobs.labels(self.arm, self.name, "dropped").inc(dropped)
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_sink(settings: Settings) -> Sink:
    if settings.shadow_sink == "jsonl":
        return JsonlSink(settings.shadow_sink_dir, settings.shadow_sink_max_bytes, settings.shadow_sink_max_files)
    if settings.shadow_sink == "redis":
        url = settings.shadow_stream_url or settings.feature_store.url
        if not url:
            raise ValueError("shadow_sink=redis needs RANKSERVE_SHADOW_STREAM_URL (or REDIS_URL)")
        return RedisStreamSink(url, settings.shadow_stream_key, settings.shadow_stream_maxlen)
    return NullSink()


class ShadowRunner:
    """Owns the shadow lanes of the current experiments and the sink."""

    def __init__(self, settings: Settings, metrics: Metrics, sink: Sink | None = None, seed: int | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.fault = parse_fault(settings.shadow_fault)
        if self.fault.rules:
            log.warning("RANKSERVE_SHADOW_FAULT is set: shadows are made slow or failing (testing aid)",
                        extra={"fault": settings.shadow_fault})
        self._sink = sink  # created on first use: no sink directory appears unless shadows are configured
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._rng = random.Random(seed)
        self.activity = PrimaryActivity()
        self.budget = StepBudget(settings.shadow_cpu_share)
        self._sink_errors = RateLimitedLog(log, ERROR_LOG_INTERVAL_S)

    @property
    def sink(self) -> Sink:
        if self._sink is None:
            self._sink = make_sink(self.settings)
        return self._sink

    # -- on the event loop ---------------------------------------------------------------------------

    def configure(self, shadows: Iterable[Shadow]) -> None:
        """Lanes for exactly these shadows: new ones start, removed ones retire.

        Raises OSError or ValueError, changing nothing, when shadows are wanted and the sink cannot open.
        """
        wanted = {s.key: s for s in shadows}
        if wanted:
            _ = self.sink  # raises (OSError, ValueError) before anything changes if the sink cannot open
        for key in list(self._lanes):
            if key not in wanted:
                self._lanes.pop(key).retire()
        for key, shadow in wanted.items():
            if key not in self._lanes:
                self._lanes[key] = _Lane(self, shadow)

    def offer(
        self,
        shadows: Iterable[Shadow],
        *,
        request_id: str | None,
        user_id: RawId,
        candidates: list[RawId],
        top_n: int,
        request_ts: int,
        features: Features,
        primary: LoadedModel,
        fused: npt.NDArray[np.float64],
        probs: F32,
        primary_seconds: float,
    ) -> None:
        """Sample the shadows and schedule a job for each sampled one, after the caller returns."""
        loop: asyncio.AbstractEventLoop | None = None
        for shadow in shadows:
            if self._rng.random() >= shadow.sample_rate:
                continue
            lane = self._lanes.get(shadow.key)
            if lane is None:  # the config changed under this request
                continue
            job = ShadowJob(
                shadow=shadow, request_id=request_id, user_id=user_id, candidates=candidates, top_n=top_n,
                request_ts=request_ts, features=features, primary_model=primary.key,
                primary_tasks=primary.bundle.tasks, primary_fused=fused, primary_probs=probs,
                primary_seconds=primary_seconds,
            )
            loop = loop or asyncio.get_running_loop()
            loop.call_soon(lane.offer, job)

    async def aclose(self) -> None:
        for lane in self._lanes.values():
            lane.retire()
        tasks = [lane.task for lane in self._lanes.values()]
        self._lanes.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sink is not None:
            await asyncio.to_thread(self._sink.close)

    # -- on a lane's thread ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, deadline: float) -> Iterator[Callable[[Callable[[], T]], T]]:
        """One budgeted step of a lane: it yields `gated(work)`, which waits until no request is being
        ranked, runs `work` and counts its time against the step budget (released when the step ends)."""
        self.budget.acquire(deadline)
        spent = 0.0

        def gated(work: Callable[[], T]) -> T:
            nonlocal spent
            self._wait_quiet(deadline)
            t0 = time.perf_counter()
            try:
                return work()
            finally:
                spent += time.perf_counter() - t0

        try:
            yield gated
        finally:
            self.budget.release(spent)

    def _wait_quiet(self, deadline: float) -> None:
        s = self.settings
        if s.shadow_yield and not self.activity.wait_quiet(s.shadow_quiet_ms / 1000, deadline - time.perf_counter()):
            raise ShadowAbandoned("starved", "the primary was never quiet long enough before shadow_timeout_s")

    def process(self, job: ShadowJob) -> None:
        """Score with the shadow, compare, observe, write the record. Raises on shadow failure."""
        shadow, f = job.shadow, job.features
        s = self.settings
        started = time.perf_counter()
        deadline = started + s.shadow_timeout_s
        self.fault.delay(shadow.name, job.primary_seconds)
        model = shadow.model
        history = model.searched_history(f.history, job.request_ts)
        n = int(f.item_index.shape[0])
        # the shadow reads the request context with its own schema: a name it lacks fails this job only
        side = model.side_rows(f, model.encode_context(f.context))
        # near-equal slices (never a 1-row remainder: ONNX Runtime's batch-1 path rounds differently)
        parts: list[F32] = []

        def build_inputs(lo: int, hi: int) -> dict[str, np.ndarray]:
            if not parts:  # an injected failure strikes inside the gated work, as a model's error would
                self.fault.fail(shadow.name)
            return model.inputs(history, f.user_index, f.item_index[lo:hi], f.category_index[lo:hi],
                                job.request_ts, side.rows(lo, hi) if side is not None else None)

        for rows in np.array_split(np.arange(n), max(1, -(-n // s.shadow_chunk))):
            if job.expired or time.perf_counter() > deadline:
                raise ShadowAbandoned("timeout", f"slower than shadow_timeout_s={s.shadow_timeout_s}")
            # retrieval and scoring are gated apart: a request that arrives during retrieval goes
            # before this step's scoring, so it overlaps at most half a step
            with self._step(deadline) as gated:
                inputs = gated(partial(build_inputs, int(rows[0]), int(rows[-1]) + 1))
                parts.append(gated(partial(model.scorer.predict, inputs)))
        probs = np.concatenate(parts) if parts else np.zeros((0, len(model.bundle.tasks)), dtype=np.float32)
        seconds = time.perf_counter() - started  # the shadow's own time: retrieval and scoring
        if job.expired:
            return
        # the comparison is lane work too (a rank correlation over every candidate: milliseconds),
        # gated and budgeted like a step, so a request never shares the CPU with more than one step
        with self._step(deadline) as gated:
            agreement = gated(lambda: compare(job.primary_fused, model.fusion(probs), job.primary_probs, probs,
                                              job.primary_tasks, model.bundle.tasks, job.top_n))
        m = self.metrics
        m.shadow_seconds.labels(shadow.arm, shadow.name).observe(seconds)
        for measure, value in agreement.measures().items():
            if value == value:  # NaN (undefined, e.g. one candidate) is left out of the histograms
                m.shadow_agreement.labels(shadow.arm, shadow.name, measure).observe(value)
        for task, diff in agreement.score_mae.items():
            m.shadow_score_diff.labels(shadow.arm, shadow.name, task).observe(diff)
        m.shadow_jobs.labels(shadow.arm, shadow.name, "ok").inc()
        record: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "request_id": job.request_id,
            "arm": shadow.arm,
            "shadow": shadow.name,
            "primary_model": job.primary_model,
            "shadow_model": model.key,
            "primary_ms": round(job.primary_seconds * 1000, 3),
            "shadow_ms": round(seconds * 1000, 3),
            **agreement.as_dict(),
        }
        if self.settings.shadow_sink_requests:
            # request_time is the effective one, so a replay ranks against the same history cut
            record["request"] = {"user_id": job.user_id, "candidates": job.candidates, "top_n": job.top_n,
                                 "request_time": job.request_ts}
            if job.features.context:
                record["request"]["context"] = dict(job.features.context)
        try:
            self.sink.write(record)
        except Exception as exc:  # a full disk or an unreachable Redis must not count as a shadow failure
            m.shadow_sink_errors.inc()
            self._sink_errors.warning("shadow sink write failed", error=repr(exc))
