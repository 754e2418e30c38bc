"""Cross-request micro-batching of the scorer (`service.batching.ScoreBatcher`), with the real ONNX
Runtime scorer of a real exported bundle.

Batches are made to form deterministically, never by timing: either the window is long and the
batch fills up to `max_candidates` exactly, or a first request holds the batcher thread inside the
scorer (a gate) while the others queue, and a window of 0 then takes everything queued at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_store.codecs import Sequence
from service.batching import BatcherClosed, ScoreBatcher, input_signature
from service.registry import LoadedModel, ModelRegistry
from service.retrieval import make_retriever
from service.settings import Settings
from tests.helpers import tiny_model, tiny_schema

NOW = 1_700_000_000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import write_bundle

    root = tmp_path_factory.mktemp("batching")
    schema = tiny_schema()
    schema.save(root / "schema")
    write_bundle(tiny_model(schema), root / "schema", {"variant": "twin", "data": "tiny"}, root / "models", "tiny")
    return root / "models"


@pytest.fixture(scope="module")
def model(model_dir: Path) -> LoadedModel:
    settings = Settings(model_dir=model_dir, scorer_threads=1, poll_interval_s=0)
    return ModelRegistry(settings, lambda: make_retriever("exact")).load_version()


def history(rng: np.random.Generator, length: int) -> Sequence:
    ts = np.sort(rng.integers(NOW - 60 * 86_400, NOW - 60, length))
    return Sequence(rng.integers(0, 300, length), rng.integers(0, 12, length), rng.integers(0, 4, length), ts)


def request_inputs(model: LoadedModel, seed: int, n: int, length: int = 50) -> dict[str, np.ndarray]:
    """The scorer inputs of one request: `n` candidates, a history of `length` behaviours."""
    rng = np.random.default_rng(seed)
    return model.inputs(history(rng, length), int(rng.integers(0, 40)), rng.integers(0, 300, n),
                        rng.integers(0, 12, n), NOW)


class GatedScorer:
    """The real scorer; the call that sees `hold` rows blocks until `release` (the batcher thread waits there).

    Records the rows of every call; a call of `fail_rows` rows raises `failure`.
    """

    def __init__(self, inner: Any, hold: int = -1) -> None:
        self.inner = inner
        self.runtime = inner.runtime
        self.provider = inner.provider
        self.hold = hold
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []
        self.fail_rows = -1
        self.failure: BaseException = RuntimeError("CUDA error: an illegal memory access was encountered")

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        rows = int(next(iter(inputs.values())).shape[0])
        self.calls.append(rows)
        if rows == self.hold:
            self.entered.set()
            assert self.release.wait(60), "the test never released the gate"
        if rows == self.fail_rows:
            raise self.failure
        out: np.ndarray = self.inner.predict(inputs)
        return out


@pytest.fixture
def gated(model: LoadedModel) -> Iterator[GatedScorer]:
    scorer = GatedScorer(model.scorer, hold=1)
    yield scorer
    scorer.release.set()


def plug(batcher: ScoreBatcher, scorer: GatedScorer, model: LoadedModel) -> Any:
    """A request of `scorer.hold` candidates that holds the batcher thread inside the scorer until `scorer.release`.

    The batcher takes it at once: its window is 0, or the request alone fills `max_candidates`.
    """
    future = batcher.submit(scorer, request_inputs(model, 999, scorer.hold))
    assert scorer.entered.wait(60)
    return future


def test_concurrent_requests_get_exactly_their_own_scores(model: LoadedModel) -> None:
    """Twelve threads submit at once; the batch fills to max_candidates and is scored in one call;
    every request's rows are bit-identical to scoring it alone."""
    sizes = [1, 7, 64, 200, 3, 150, 33, 90, 2, 120, 45, 11]
    reqs = [request_inputs(model, seed, n) for seed, n in enumerate(sizes)]
    alone = [model.scorer.predict(r) for r in reqs]
    counted: list[tuple[int, int]] = []
    batcher = ScoreBatcher(wait_s=600.0, max_candidates=sum(sizes), on_batch=lambda r, c: counted.append((r, c)))
    try:
        barrier = threading.Barrier(len(reqs))

        def submit(inputs: dict[str, np.ndarray]) -> np.ndarray:
            barrier.wait()
            return batcher.submit(model.scorer, inputs).result(timeout=120)

        with ThreadPoolExecutor(len(reqs)) as pool:
            got = list(pool.map(submit, reqs))
    finally:
        batcher.close()
    for one, batched in zip(alone, got, strict=True):
        assert batched.shape == one.shape
        assert np.array_equal(batched, one)
    assert batcher.stats.batches == 1 and batcher.stats.max_requests == len(reqs)
    assert counted == [(len(reqs), sum(sizes))]


def test_max_candidates_is_respected_in_arrival_order(model: LoadedModel, gated: GatedScorer) -> None:
    sizes = [40, 30, 50, 20, 90, 10, 150, 5]  # 150 exceeds the maximum: scored alone, never split
    reqs = [request_inputs(model, 100 + i, n) for i, n in enumerate(sizes)]
    batcher = ScoreBatcher(wait_s=0.0, max_candidates=100)
    try:
        held = plug(batcher, gated, model)
        futures = [batcher.submit(gated, r) for r in reqs]
        assert batcher.waiting == len(reqs)
        gated.release.set()
        got = [f.result(timeout=120) for f in futures]
        held.result(timeout=120)
    finally:
        batcher.close()
    # greedy in arrival order: the head, then every later request that still fits
    assert gated.calls == [1, 40 + 30 + 20 + 10, 50 + 5, 90, 150]
    assert all(c <= 100 for c in gated.calls[1:-1])
    assert batcher.stats.max_requests == 4
    for r, g in zip(reqs, got, strict=True):
        assert np.array_equal(g, model.scorer.predict(r))


def test_a_scorer_error_fails_every_request_of_its_batch_and_only_those(
    model: LoadedModel, gated: GatedScorer
) -> None:
    batcher = ScoreBatcher(wait_s=0.0, max_candidates=10_000)
    other = GatedScorer(model.scorer)  # another model: never in the same batch
    gated.fail_rows = 5 + 9 + 13
    try:
        held = plug(batcher, gated, model)
        doomed = [batcher.submit(gated, request_inputs(model, i, n)) for i, n in enumerate((5, 9, 13))]
        bystander_inputs = request_inputs(model, 50, 8)
        bystander = batcher.submit(other, bystander_inputs)
        gated.release.set()
        held.result(timeout=120)
        errors = []
        for f in doomed:
            with pytest.raises(RuntimeError) as info:
                f.result(timeout=120)
            errors.append(info.value)
        assert all(e is gated.failure for e in errors), "every caller of the batch gets the scorer's own error"
        assert np.array_equal(bystander.result(timeout=120), model.scorer.predict(bystander_inputs))
        # the batcher survives: the next request is scored
        after = request_inputs(model, 77, 6)
        assert np.array_equal(batcher.submit(gated, after).result(timeout=120), model.scorer.predict(after))
    finally:
        batcher.close()


def test_a_cancelled_request_is_left_out_without_moving_the_others(model: LoadedModel, gated: GatedScorer) -> None:
    batcher = ScoreBatcher(wait_s=0.0, max_candidates=10_000)
    reqs = [request_inputs(model, 200 + i, n) for i, n in enumerate((12, 34, 56))]
    try:
        held = plug(batcher, gated, model)
        futures = [batcher.submit(gated, r) for r in reqs]
        assert futures[1].cancel()  # its deadline passed while it waited
        gated.release.set()
        held.result(timeout=120)
        first, third = futures[0].result(timeout=120), futures[2].result(timeout=120)
    finally:
        batcher.close()
    with pytest.raises(CancelledError):
        futures[1].result()
    assert gated.calls[1:] == [12 + 56]
    assert batcher.stats.cancelled == 1
    assert np.array_equal(first, model.scorer.predict(reqs[0]))
    assert np.array_equal(third, model.scorer.predict(reqs[2]))


class RowScorer:
    """A stand-in scorer for inputs of any shape: each row's sum per input, so rows are traceable."""

    runtime = "stand-in"
    provider = "CPUExecutionProvider"

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        rows = int(next(iter(inputs.values())).shape[0])
        self.calls.append(tuple(int(a.shape[1]) if a.ndim > 1 else 0 for a in inputs.values()))
        if rows == 1:  # the plug
            self.entered.set()
            assert self.release.wait(60)
        return np.stack([a.reshape(rows, -1).sum(axis=1) for a in inputs.values()], axis=1).astype(np.float32)


def test_inputs_of_other_shapes_go_to_another_batch() -> None:
    """Inputs whose trailing shapes differ (e.g. a schema whose short-term input follows the history
    length) cannot be concatenated: they are scored in their own call, in arrival order."""
    scorer = RowScorer()
    rng = np.random.default_rng(0)

    def inputs(n: int, width: int) -> dict[str, np.ndarray]:
        return {"a": rng.random((n, width), dtype=np.float32), "b": rng.random(n, dtype=np.float32)}

    reqs = [inputs(4, 3), inputs(9, 5), inputs(6, 3)]
    assert input_signature(reqs[0])[1] != input_signature(reqs[1])[1]
    batcher = ScoreBatcher(wait_s=0.0, max_candidates=10_000)
    try:
        held = batcher.submit(scorer, inputs(1, 3))
        assert scorer.entered.wait(60)
        futures = [batcher.submit(scorer, r) for r in reqs]
        scorer.release.set()
        held.result(timeout=60)
        got = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert scorer.calls[1:] == [(3, 0), (5, 0)]  # the two width-3 requests together, then the width-5 one
    assert batcher.stats.sizes == [1, 2, 1]
    for r, g in zip(reqs, got, strict=True):
        assert np.array_equal(g, scorer.predict(r))


def test_close_drains_what_is_queued_then_refuses(model: LoadedModel) -> None:
    gated = GatedScorer(model.scorer, hold=16)
    # a long window that the queued requests (12 candidates) do not fill: close must not wait for it
    batcher = ScoreBatcher(wait_s=600.0, max_candidates=16)
    reqs = [request_inputs(model, 400 + i, n) for i, n in enumerate((3, 5, 4))]
    held = plug(batcher, gated, model)
    futures = [batcher.submit(gated, r) for r in reqs]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gated.release.set()
    closer.join(120)
    assert not closer.is_alive()
    held.result(timeout=1)
    assert gated.calls == [16, 12]
    for r, f in zip(reqs, futures, strict=True):
        assert np.array_equal(f.result(timeout=1), model.scorer.predict(r))
    with pytest.raises(BatcherClosed):
        batcher.submit(gated, reqs[0])


def test_inputs_without_a_common_candidate_axis_are_refused(model: LoadedModel) -> None:
    inputs = request_inputs(model, 500, 4)
    inputs["weekday"] = inputs["weekday"][:3]
    batcher = ScoreBatcher(wait_s=0.0, max_candidates=100)
    try:
        with pytest.raises(ValueError, match="weekday"):
            batcher.submit(model.scorer, inputs)
    finally:
        batcher.close()


# -- in the service --------------------------------------------------------------------------------


class _Store:
    """A feature store answering every user with one fixed history (the service's fetch)."""

    def __init__(self, sequence: Sequence) -> None:
        self.sequence = sequence

    async def fetch(self, user_id: int, item_ids: Any, *args: Any, **kwargs: Any) -> Any:
        from feature_store.store import FetchResult

        keys = np.asarray(item_ids, dtype=np.int64)
        items = keys % 300
        return FetchResult("v", int(user_id) % 40, self.sequence, items, items % 12, np.ones(len(keys), dtype=bool))


def test_service_ranks_batched_exactly_as_unbatched(model_dir: Path) -> None:
    """RankingService with RANKSERVE_SCORER_BATCH_WAIT_MS > 0: concurrent requests rank exactly as with
    batching off; every request goes through the batcher and the batch-size metric counts each call."""
    from service.core import RankingService
    from service.observability.metrics import Metrics
    from service.types import RankRequest

    rng = np.random.default_rng(7)
    store = _Store(history(rng, 120))
    sizes = [5, 17, 40, 3, 60, 25, 9, 33]
    reqs = [RankRequest(user_id=1000 + i, candidates=[int(x) for x in rng.integers(0, 10_000, n)], top_n=n,
                        request_time=NOW) for i, n in enumerate(sizes)]

    async def rank_all(wait_ms: float) -> tuple[list[Any], RankingService, Metrics]:
        settings = Settings(model_dir=model_dir, scorer_threads=1, poll_interval_s=0, request_timeout_s=60,
                            scorer_batch_wait_ms=wait_ms, scorer_batch_max_candidates=sum(sizes))
        registry = ModelRegistry(settings, lambda: make_retriever("exact"))
        await asyncio.to_thread(registry.load_version)
        metrics = Metrics()
        service = RankingService(settings, registry, store, metrics)  # type: ignore[arg-type]
        try:
            return list(await asyncio.gather(*(service.rank(r) for r in reqs))), service, metrics
        finally:
            service.close()

    plain, plain_service, _ = asyncio.run(rank_all(0))
    batched, service, metrics = asyncio.run(rank_all(100))
    assert plain_service.batcher is None  # off by default
    assert service.batcher is not None
    for a, b in zip(plain, batched, strict=True):
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
        assert [i.score for i in a.items] == [i.score for i in b.items]
        assert [i.task_scores for i in a.items] == [i.task_scores for i in b.items]
    stats = service.batcher.stats
    assert stats.requests == len(reqs) and stats.candidates == sum(sizes)
    assert metrics.registry.get_sample_value("rankserve_scorer_batch_requests_count") == stats.batches
    assert metrics.registry.get_sample_value("rankserve_scorer_batch_requests_sum") == len(reqs)
    assert metrics.registry.get_sample_value("rankserve_scorer_batch_candidates_sum") == sum(sizes)


def test_a_held_launch_lock_is_waited_for_off_the_event_loop(model_dir: Path) -> None:
    """Ranking runs on the event loop, but not while another thread (a shadow step, a model's
    warm-up) holds the kernels' launch lock: that wait happens on the pool, and the loop keeps
    serving meanwhile."""
    import threading

    from service.core import RankingService
    from service.observability.metrics import Metrics
    from service.retrieval.base import launch_lock
    from service.types import RankRequest

    rng = np.random.default_rng(11)
    store = _Store(history(rng, 3000))  # long enough for the exact kernel's parallel launch
    request = RankRequest(user_id=5, candidates=[int(x) for x in rng.integers(0, 10_000, 50)], top_n=10,
                          request_time=NOW)

    async def scenario() -> tuple[int, Any, Any]:
        settings = Settings(model_dir=model_dir, scorer_threads=1, poll_interval_s=0, request_timeout_s=60)
        registry = ModelRegistry(settings, lambda: make_retriever("exact"))
        await asyncio.to_thread(registry.load_version)
        service = RankingService(settings, registry, store, Metrics())  # type: ignore[arg-type]
        try:
            expected = await service.rank(request)
            launch_lock.acquire()
            releaser = threading.Timer(0.5, launch_lock.release)  # the other thread's kernel ends
            releaser.start()
            ranked = asyncio.create_task(service.rank(request))
            ticks = 0
            while not ranked.done():  # the loop turns while the request waits for the lock
                await asyncio.sleep(0.01)
                ticks += 1
            releaser.join()
            return ticks, expected, ranked.result()
        finally:
            service.close()

    ticks, expected, ranked = asyncio.run(scenario())
    assert ticks >= 10, ticks  # about 50 in 0.5 s; a loop blocked on the lock turns once
    assert [(i.item_id, i.score) for i in ranked.items] == [(i.item_id, i.score) for i in expected.items]
