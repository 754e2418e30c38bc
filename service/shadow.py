"""Shadow traffic: score a sample of live requests with other bundles, off the critical path.

After the primary answer is computed, `ShadowRunner.offer` samples each of the arm's shadows and
schedules (`loop.call_soon`) one job per sampled shadow into that shadow's *lane*: a bounded
asyncio queue (full: the job is dropped and counted) drained by one worker task, which runs the
CPU part on the lane's own single thread, never on the primary's CPU executor. A lane per
shadow, so a slow or broken shadow starves only itself.

A job reuses the primary's fetched features (no second store round trip), runs retrieval and
scoring with the shadow's bundle, compares the two rankings (`service.agreement`), observes the
per-shadow histograms and writes one record to the sink. A shadow that raises is counted as an
error; one slower than `shadow_timeout_s` is counted as a timeout and its result discarded (a
thread cannot be interrupted, so the lane waits for it before taking the next job: at most one
job per lane runs at any time). Neither ever reaches the primary's response.

On 2 cores the shadow still competes for CPU with the primary. Three things keep that contention
small: shadow threads run at a lower priority (`shadow_nice`), each shadow scorer gets its own
ONNX Runtime session with `shadow_threads` (default 1) intra-op threads, so its work stays on the
niced lane thread, and shadow retrieval is split into chunks of `shadow_retrieval_chunk`
candidates, because the exact kernel is serialized process-wide: the primary never waits for
more than one chunk (see loadtest/bench_shadow.py for the measured cost).

`RANKSERVE_SHADOW_FAULT` (`sleep:10x`, `raise`, or per shadow `slow=sleep:10x,bad=raise`) is a
testing aid that makes shadows slow or failing; it never applies to primaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from service.agreement import compare
from service.assemble import TopK
from service.metrics import Metrics
from service.registry import LoadedModel
from service.settings import Settings
from service.shadow_sink import JsonlSink, NullSink, RedisStreamSink, Sink

if TYPE_CHECKING:
    from service.core import Features

log = logging.getLogger("rankserve.shadow")

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
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


class ChunkedRetriever:
    """Search in chunks of queries: every chunk is its own (short) kernel launch.

    Per-query results do not depend on the other queries of a batch, so the output is identical
    to one call; what changes is that a shared, serialized kernel is held for one chunk at a time.
    """

    def __init__(self, inner: TopK, chunk: int) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.inner = inner
        self.chunk = chunk

    def search(self, queries: F32, keys: F32, k: int) -> tuple[F32, I64]:
        n = queries.shape[0]
        if n <= self.chunk:
            return self.inner.search(queries, keys, k)
        parts = [self.inner.search(queries[i : i + self.chunk], keys, k) for i in range(0, n, self.chunk)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# -- fault injection (testing aid) -----------------------------------------------------------------


class InjectedFault(RuntimeError):
    """Raised by a shadow under RANKSERVE_SHADOW_FAULT=raise."""


_FAULT_RE = re.compile(
    r"(?:(?P<name>[A-Za-z0-9][A-Za-z0-9_./-]*)=)?(?:sleep:(?P<factor>\d+(?:\.\d+)?)x|(?P<raise>raise))"
)


@dataclass(frozen=True)
class ShadowFault:
    """Per shadow name (None: every shadow): ("sleep", factor of the primary's latency) or ("raise", 0)."""

    rules: Mapping[str | None, tuple[str, float]] = field(default_factory=dict)

    def apply(self, shadow: str, primary_seconds: float) -> None:
        rule = self.rules.get(shadow) or self.rules.get(None)
        if rule is None:
            return
        kind, factor = rule
        if kind == "raise":
            raise InjectedFault(f"injected fault in shadow {shadow!r} (RANKSERVE_SHADOW_FAULT)")
        time.sleep(factor * primary_seconds)


def parse_fault(text: str | None) -> ShadowFault:
    """`sleep:<factor>x` | `raise`, optionally `<shadow>=` first, comma-separated; ValueError if malformed."""
    rules: dict[str | None, tuple[str, float]] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = _FAULT_RE.fullmatch(part)
        if m is None:
            raise ValueError(
                f"bad shadow fault {part!r}: use 'sleep:<factor>x' or 'raise', optionally prefixed by '<shadow>='"
            )
        rules[m["name"]] = ("raise", 0.0) if m["raise"] else ("sleep", float(m["factor"]))
    return ShadowFault(rules)


# -- jobs and lanes --------------------------------------------------------------------------------


@dataclass(eq=False)
class ShadowJob:
    """Everything a shadow needs from one primary request (all arrays are read-only from here on)."""

    shadow: Shadow
    request_id: str | None
    user_id: int
    candidates: list[int]
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
        self._last_error_log = float("-inf")

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
        timeout = self.runner.settings.shadow_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            m.shadow_queue.labels(self.arm, self.name).set(self.queue.qsize())
            m.shadow_inflight.labels(self.arm, self.name).inc()
            future = loop.run_in_executor(self.pool, self.runner.process, job)
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                job.expired = True
                m.shadow_jobs.labels(self.arm, self.name, "timeout").inc()
                self._log_failure("shadow timed out", f"slower than shadow_timeout_s={timeout}")
                with contextlib.suppress(Exception):
                    await future  # one job per lane at a time, even past its timeout
            except Exception as exc:  # any shadow failure stays here: counted, logged, never raised
                m.shadow_jobs.labels(self.arm, self.name, "error").inc()
                self._log_failure("shadow failed", repr(exc))
            finally:
                m.shadow_inflight.labels(self.arm, self.name).dec()

    def _log_failure(self, message: str, detail: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.warning(message, extra={"arm": self.arm, "shadow": self.name, "error": detail})

    def retire(self) -> None:
        """Stop taking jobs; a job already running finishes on its thread, queued ones are dropped."""
        self.task.cancel()
        dropped = self.queue.qsize()
        if dropped:
            self.runner.metrics.shadow_jobs.labels(self.arm, self.name, "dropped").inc(dropped)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for gauge in (self.runner.metrics.shadow_queue, self.runner.metrics.shadow_inflight):
            with contextlib.suppress(KeyError):
                gauge.remove(self.arm, self.name)


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

    @property
    def sink(self) -> Sink:
        if self._sink is None:
            self._sink = make_sink(self.settings)
        return self._sink

    # -- on the event loop ---------------------------------------------------------------------------

    def configure(self, shadows: Iterable[Shadow]) -> None:
        """Lanes for exactly these shadows: new ones start, removed ones retire."""
        wanted = {s.key: s for s in shadows}
        for key in list(self._lanes):
            if key not in wanted:
                self._lanes.pop(key).retire()
        for key, shadow in wanted.items():
            if key not in self._lanes:
                _ = self.sink  # fail at config time, not per job, if the sink cannot be opened
                self._lanes[key] = _Lane(self, shadow)

    def offer(
        self,
        shadows: Iterable[Shadow],
        *,
        request_id: str | None,
        user_id: int,
        candidates: list[int],
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

    def process(self, job: ShadowJob) -> None:
        """Score with the shadow, compare, observe, write the record. Raises on shadow failure."""
        shadow, f = job.shadow, job.features
        started = time.perf_counter()
        self.fault.apply(shadow.name, job.primary_seconds)
        model = shadow.model
        history = f.history.before(job.request_ts)
        inputs = model.inputs(history, f.user_index, f.item_index, f.category_index, job.request_ts)
        probs = model.scorer.predict(inputs)
        fused = model.fusion(probs)
        seconds = time.perf_counter() - started
        if job.expired:
            return
        agreement = compare(job.primary_fused, fused, job.primary_probs, probs, job.primary_tasks,
                            model.bundle.tasks, job.top_n)
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
        try:
            self.sink.write(record)
        except Exception as exc:  # a full disk or an unreachable Redis must not count as a shadow failure
            m.shadow_sink_errors.inc()
            log.warning("shadow sink write failed", extra={"error": repr(exc)})
