"""Cross-request micro-batching of the scorer, meant for the CUDA execution provider.

On a GPU one scorer call costs nearly the same for 500 candidates as for 4,000: launch and copy
overheads dominate, so concatenating the candidates of requests that arrive together along the
candidate axis and scoring them in one call raises throughput. `ScoreBatcher` does that: a request
`submit`s its scorer inputs (every input is [B, ...], candidates first) and gets a future of its own
[B, T] probabilities; one batcher thread takes the first waiting request, waits at most `wait_s`
for more (or until `max_candidates` are waiting), concatenates them along axis 0, calls the scorer
once and hands every request exactly its own rows.

* Only requests for the same scorer (the same loaded model) whose inputs have the same names,
  dtypes and trailing shapes are concatenated (an input whose width follows the request, such as
  a history shorter than a fixed window, keeps it apart); the others wait for the next batch, in
  arrival order.
* A request larger than `max_candidates` is scored alone; no request is ever split.
* A request cancelled (its deadline passed) before its batch is taken is left out; one cancelled
  later still has its rows computed and dropped: the other requests' rows never move.
* A scorer exception fails every request of that batch with that same exception.
* `close()` stops accepting requests, scores everything already waiting (without waiting for the
  window) and joins the thread.

The batcher knows nothing about requests or metrics: `on_batch(requests, candidates)` is called
after each scorer call (the service observes it into histograms).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.scoring import Scorer

log = logging.getLogger("rankserve.batching")

F32 = npt.NDArray[np.float32]
Inputs = Mapping[str, npt.NDArray[Any]]
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]
OnBatch = Callable[[int, int], None]


class BatcherClosed(RuntimeError):
    """The batcher is shut down and accepts no more requests."""


def input_signature(inputs: Inputs) -> tuple[int, Signature]:
    """(candidates, (name, dtype, trailing shape) per input); ValueError unless every input has the same B."""
    rows: int | None = None
    sig = []
    for name, array in inputs.items():
        if array.ndim == 0:
            raise ValueError(f"scorer input {name!r} has no candidate axis")
        if rows is None:
            rows = int(array.shape[0])
        elif array.shape[0] != rows:
            raise ValueError(f"scorer input {name!r} has {array.shape[0]} rows, the others {rows}")
        sig.append((name, array.dtype.str, tuple(int(d) for d in array.shape[1:])))
    if rows is None:
        raise ValueError("no scorer inputs")
    return rows, tuple(sig)


@dataclass(eq=False)
class _Pending:
    scorer: Scorer
    inputs: Inputs
    rows: int
    signature: Signature
    future: Future[F32] = field(default_factory=Future)

    def joins(self, head: _Pending) -> bool:
        return self.scorer is head.scorer and self.signature == head.signature


@dataclass
class BatchStats:
    """What the batcher did so far (tests and the bench read it)."""

    batches: int = 0
    requests: int = 0
    candidates: int = 0
    cancelled: int = 0  # requests cancelled before their batch was taken (left out)
    max_requests: int = 0  # the most requests one scorer call served
    max_candidates: int = 0  # the most candidates one scorer call scored
    sizes: list[int] = field(default_factory=list)  # requests per batch, the last 1,000

    def record(self, requests: int, candidates: int) -> None:
        self.batches += 1
        self.requests += requests
        self.candidates += candidates
        self.max_requests = max(self.max_requests, requests)
        self.max_candidates = max(self.max_candidates, candidates)
        self.sizes.append(requests)
        if len(self.sizes) > 1000:
            del self.sizes[:-1000]


class ScoreBatcher:
    """Concatenates the scorer calls of concurrent requests (module docstring); thread-safe."""

    def __init__(
        self, wait_s: float, max_candidates: int, on_batch: OnBatch | None = None, name: str = "scorer-batch"
    ) -> None:
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.wait_s = wait_s
        self.max_candidates = max_candidates
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._closed = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, scorer: Scorer, inputs: Inputs) -> Future[F32]:
        """A future of `scorer.predict(inputs)`, computed with other requests' inputs when they arrive together.

        Cancelling the future before its batch is taken leaves the request out. Raises BatcherClosed
        after `close()`, ValueError for inputs without a common candidate axis.
        """
        rows, signature = input_signature(inputs)
        pending = _Pending(scorer, inputs, rows, signature)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the scorer batcher is shut down")
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken into a batch."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting; score what is already waiting; join the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the batcher thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._score(batch)

    def _next_batch(self) -> list[_Pending] | None:
        """Wait for a first request, then up to `wait_s` for company; the batch taken (None: closed and empty)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.wait_s
            while not self._closed and self._compatible_rows() < self.max_candidates:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take()

    def _compatible_rows(self) -> int:
        head = self._queue[0]
        return sum(p.rows for p in self._queue if p.joins(head))

    def _take(self) -> list[_Pending]:
        """The head request and, in arrival order, every compatible one that still fits (caller holds the lock)."""
        head = self._queue.popleft()
        batch = [head]
        total = head.rows
        rest: deque[_Pending] = deque()
        for p in self._queue:
            if p.joins(head) and total + p.rows <= self.max_candidates:
                batch.append(p)
                total += p.rows
            else:
                rest.append(p)
        self._queue = rest
        return batch

    def _score(self, batch: list[_Pending]) -> None:
        # from here a request's future is RUNNING: cancelling it no longer takes its rows out
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        self.stats.cancelled += len(batch) - len(live)
        if not live:
            return
        scorer = live[0].scorer
        total = sum(p.rows for p in live)
        try:
            if len(live) == 1:
                probs = scorer.predict(live[0].inputs)
            else:
                names = list(live[0].inputs)
                probs = scorer.predict({n: np.concatenate([p.inputs[n] for p in live], axis=0) for n in names})
            if probs.shape[0] != total:
                raise RuntimeError(f"the scorer returned {probs.shape[0]} rows for {total} candidates")
        except BaseException as exc:  # every request of the batch fails with the scorer's own error
            self._observe(len(live), total)
            log.debug("scorer batch failed", extra={"requests": len(live), "candidates": total, "error": str(exc)})
            for p in live:
                p.future.set_exception(exc)
            return
        self._observe(len(live), total)  # before the results: a caller that sees its rows sees the batch counted
        start = 0
        for p in live:
            rows = probs[start : start + p.rows]
            p.future.set_result(rows if len(live) == 1 else rows.copy())
            start += p.rows

    def _observe(self, requests: int, candidates: int) -> None:
        self.stats.record(requests, candidates)
        if self._on_batch is not None:
            try:
                self._on_batch(requests, candidates)
            except Exception:  # a metrics hook must never stop the batcher
                log.exception("on_batch hook failed")
