"""Shadow lanes in process: agreement records, errors, timeouts and drops never reach the caller,
and the rotating JSONL sink keeps a bounded number of files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_store.codecs import Sequence
from service.experiments.manager import ExperimentManager, Experiments
from service.experiments.shadow import ShadowRunner
from service.experiments.sinks import JsonlSink, read_jsonl, sink_files
from service.observability.metrics import Metrics
from service.registry import ModelRegistry
from service.retrieval import make_retriever
from service.settings import Settings
from service.types import Features
from tests.experiments_helpers import two_version_model_dir, write_config

NOW = 1_700_000_000

# -- sink ------------------------------------------------------------------------------------------------


def test_jsonl_rotation_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, max_bytes=2000, max_files=3)
    for i in range(400):
        sink.write({"i": i, "pad": "x" * 40})
    sink.close()
    files = sink_files(tmp_path)
    assert [f.name for f in files] == ["shadow.jsonl.2", "shadow.jsonl.1", "shadow.jsonl"]
    assert all(f.stat().st_size <= 2000 for f in files)
    got = [r["i"] for r in read_jsonl(tmp_path)]
    assert got == list(range(got[0], 400))  # the newest records, oldest first, none lost in between
    assert got[0] > 0  # the oldest were rotated away


def test_single_file_sink_starts_over(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, max_bytes=500, max_files=1)
    for i in range(100):
        sink.write({"i": i})
    sink.close()
    assert [f.name for f in sink_files(tmp_path)] == ["shadow.jsonl"]
    assert [r["i"] for r in read_jsonl(tmp_path)][-1] == 99


def test_reader_skips_a_torn_line(tmp_path: Path) -> None:
    (tmp_path / "shadow.jsonl").write_bytes(b'{"a": 1}\n{"a": 2\n\n{"a": 3}\n')
    assert [r["a"] for r in read_jsonl(tmp_path)] == [1, 3]


# -- lanes with real tiny models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_version_model_dir(tmp_path_factory.mktemp("shadow"), retrained_seed=2)


async def setup(model_dir: Path, tmp_path: Path, **overrides: Any) -> tuple[ExperimentManager, ShadowRunner, Metrics]:
    config = tmp_path / "exp.yaml"
    write_config(config, {"salt": "s", "arms": [{"name": "main", "share": 100, "bundle": "tiny/1", "shadows": [
        {"name": "self", "bundle": "tiny/1", "sample_rate": 1.0},
        {"name": "other", "bundle": "tiny/2", "sample_rate": 1.0},
    ]}]})
    settings = Settings(model_dir=model_dir, experiments_file=config, scorer_threads=1, poll_interval_s=0,
                        shadow_sink_dir=tmp_path / "sink", **overrides)
    registry = ModelRegistry(settings, lambda: make_retriever("exact"))
    metrics = Metrics()
    runner = ShadowRunner(settings, metrics, seed=0)

    def changed(exps: Experiments) -> None:
        runner.configure(exps.shadows())

    manager = ExperimentManager(settings, registry, metrics, on_change=changed)
    await manager.reload()
    return manager, runner, metrics


def offer(
    manager: ExperimentManager, runner: ShadowRunner, user: int | str, n_cand: int = 40, primary_s: float = 0.01,
    context: dict[str, Any] | None = None,
) -> None:
    route = manager.route(user)
    model = route.model
    seed = user if isinstance(user, int) else sum(map(ord, user))
    rng = np.random.default_rng(seed)
    length = 50
    hist = Sequence(
        item=rng.integers(1, 300, length), category=rng.integers(1, 12, length), action=rng.integers(0, 4, length),
        timestamp=np.sort(rng.integers(NOW - 86_400 * 30, NOW - 60, length)),
    )
    feats = Features(1 + seed % 40, hist, rng.integers(1, 300, n_cand), rng.integers(1, 12, n_cand), None,
                     context=context)
    probs = model.score(hist, feats.user_index, feats.item_index, feats.category_index, NOW)
    runner.offer(route.shadows, request_id=f"r{user}", user_id=user, candidates=list(range(n_cand)), top_n=10,
                 request_ts=NOW, features=feats, primary=model, fused=model.fusion(probs), probs=probs,
                 primary_seconds=primary_s)


def count(metrics: Metrics, shadow: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "rankserve_shadow_jobs_total", {"arm": "main", "shadow": shadow, "outcome": outcome}
    )
    return value or 0.0


async def wait_for(predicate: Any, within_s: float = 120.0) -> None:
    # A liveness bound, not a time budget: a fresh checkout compiles the kernels on a shadow's
    # first load, which on a loaded 2-core machine took over 20 s.
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("chunk", [16, 1000])  # 40 candidates in steps of 14/13/13, or one step
async def test_self_shadow_agrees_perfectly_and_another_bundle_does_not(
    model_dir: Path, tmp_path: Path, chunk: int
) -> None:
    manager, runner, metrics = await setup(model_dir, tmp_path, shadow_chunk=chunk)
    try:
        for user in range(8):
            offer(manager, runner, user)
        await wait_for(lambda: count(metrics, "self", "ok") == 8 and count(metrics, "other", "ok") == 8)
    finally:
        await runner.aclose()
    records = list(read_jsonl(tmp_path / "sink"))
    assert len(records) == 16
    mine = [r for r in records if r["shadow"] == "self"]
    assert all(r["kendall_tau"] == 1.0 and r["spearman"] == 1.0 and r["overlap_at_10"] == 1.0
               and r["ndcg_at_n"] == 1.0 and set(r["score_mae"].values()) == {0.0} for r in mine)
    theirs = [r for r in records if r["shadow"] == "other"]
    assert all(r["shadow_model"] == "tiny/2" and r["primary_model"] == "tiny/1" for r in theirs)
    assert max(r["kendall_tau"] for r in theirs) < 1.0
    assert min(max(r["score_mae"].values()) for r in theirs) > 0
    assert theirs[0]["request"]["request_time"] == NOW and len(theirs[0]["request"]["candidates"]) == 40
    hist = metrics.registry.get_sample_value(
        "rankserve_shadow_agreement_count", {"arm": "main", "shadow": "other", "measure": "kendall_tau"}
    )
    assert hist == 8


async def test_failing_shadow_is_counted_and_contained(model_dir: Path, tmp_path: Path) -> None:
    manager, runner, metrics = await setup(model_dir, tmp_path, shadow_fault="other=raise")
    try:
        for user in range(5):
            offer(manager, runner, user)  # never raises into the caller
        await wait_for(lambda: count(metrics, "other", "error") == 5 and count(metrics, "self", "ok") == 5)
    finally:
        await runner.aclose()
    assert {r["shadow"] for r in read_jsonl(tmp_path / "sink")} == {"self"}


async def test_a_shadow_that_cannot_read_the_context_fails_alone(model_dir: Path, tmp_path: Path) -> None:
    """Each shadow encodes the request context with its own schema: these declare no `device`, so
    their jobs fail (counted) while offering never raises; without a context they succeed, and the
    records carry the request as sent (string ids included) for replay."""
    manager, runner, metrics = await setup(model_dir, tmp_path, shadow_sink_requests=True)
    try:
        for user in range(3):
            offer(manager, runner, user, context={"device": "ios"})
        await wait_for(lambda: count(metrics, "self", "error") == 3 and count(metrics, "other", "error") == 3)
        offer(manager, runner, "u-7", context={})
        await wait_for(lambda: count(metrics, "self", "ok") == 1 and count(metrics, "other", "ok") == 1)
    finally:
        await runner.aclose()
    records = list(read_jsonl(tmp_path / "sink"))
    assert len(records) == 2 and {r["request"]["user_id"] for r in records} == {"u-7"}
    assert all("context" not in r["request"] for r in records)  # an empty context is not recorded


async def test_slow_shadow_times_out_and_a_full_queue_drops(model_dir: Path, tmp_path: Path) -> None:
    # each "other" job sleeps 10 x 0.05 s, past the 0.1 s timeout; the queue holds 2
    manager, runner, metrics = await setup(model_dir, tmp_path, shadow_fault="other=sleep:10x", shadow_timeout_s=0.1,
                                           shadow_queue_size=2, shadow_cpu_share=1.0)
    try:
        for user in range(6):
            offer(manager, runner, user, primary_s=0.05)
            await wait_for(lambda u=user: count(metrics, "self", "ok") == u + 1)  # "self" keeps up meanwhile
        await wait_for(lambda: count(metrics, "other", "timeout") + count(metrics, "other", "dropped") == 6)
    finally:
        await runner.aclose()
    assert count(metrics, "other", "dropped") >= 3 and count(metrics, "other", "timeout") >= 1
    assert {r["shadow"] for r in read_jsonl(tmp_path / "sink")} == {"self"}  # timed-out results are discarded


async def test_a_sink_that_cannot_open_refuses_the_config(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.errors import ExperimentsRejected

    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ExperimentsRejected, match="shadow sink unavailable: shadow_sink=redis needs"):
        await setup(model_dir, tmp_path, shadow_sink="redis")


async def test_shadow_steps_wait_while_the_primary_computes(model_dir: Path, tmp_path: Path) -> None:
    manager, runner, metrics = await setup(model_dir, tmp_path, shadow_timeout_s=0.3)
    try:
        runner.activity.enter()  # a primary request in its CPU stage for longer than the shadow may wait
        offer(manager, runner, 1)
        await wait_for(lambda: count(metrics, "self", "starved") == 1 and count(metrics, "other", "starved") == 1)
        runner.activity.leave()
        offer(manager, runner, 2)
        await wait_for(lambda: count(metrics, "self", "ok") == 1 and count(metrics, "other", "ok") == 1)
    finally:
        await runner.aclose()


# -- report and replay inputs ------------------------------------------------------------------------------


def test_report_summarizes_per_shadow_and_skips_undefined_values() -> None:
    from service.experiments.report import markdown, summarize

    recs = [
        {"arm": "a", "shadow": "s", "primary_model": "m/1", "shadow_model": "m/2", "kendall_tau": 0.5,
         "overlap_at_10": 1.0, "score_mae": {"click": 0.1}},
        {"arm": "a", "shadow": "s", "primary_model": "m/1", "shadow_model": "m/2", "kendall_tau": None,
         "overlap_at_10": 0.5, "score_mae": {"click": 0.3}},
        {"not": "a record"},
    ]
    (summary,) = summarize(recs)
    assert summary.requests == 2 and summary.values["kendall_tau"] == [0.5]
    assert summary.values["overlap_at_10"] == [1.0, 0.5] and summary.mae["click"] == [0.1, 0.3]
    table = markdown([summary]).splitlines()
    assert table[0].count("|") == table[2].count("|")  # no stray pipes in headers or cells
    assert "| a | s | m/1 | m/2 | 2 | 0.5000 |" in table[2] and table[2].endswith("| 0.2000 |")


def test_replay_reads_sink_records_once_per_request_and_plain_requests(tmp_path: Path) -> None:
    from service.experiments.replay import requests_from

    req = {"user_id": 1, "candidates": [3, 4], "top_n": 2, "request_time": NOW}
    sink = [{"request_id": "r1", "shadow": "x", "request": req}, {"request_id": "r1", "shadow": "y", "request": req},
            {"request_id": "r2", "shadow": "x", "request": {**req, "user_id": 2}}]
    assert [(rid, body["user_id"]) for rid, body in requests_from(iter(sink))] == [("r1", 1), ("r2", 2)]
    plain = [{"user_id": 5, "candidates": [1], "debug": False}, {"user_id": 6}]  # the second lacks candidates
    assert list(requests_from(iter(plain))) == [(None, {"user_id": 5, "candidates": [1], "debug": False})]
    with_context = [{"user_id": "u-1", "candidates": ["a", 2], "context": {"device": "ios"}}]
    assert list(requests_from(iter(with_context))) == [(None, with_context[0])]  # ids as sent, context kept


def test_step_budget_paces_steps_and_starves_past_the_deadline() -> None:
    from service.experiments.shadow import ShadowAbandoned, StepBudget

    budget = StepBudget(0.25)  # a step of t is followed by 3t of rest
    budget.acquire(time.perf_counter() + 1)
    budget.release(0.02)
    t0 = time.perf_counter()
    budget.acquire(time.perf_counter() + 1)
    assert time.perf_counter() - t0 >= 0.055
    budget.release(0.02)
    with pytest.raises(ShadowAbandoned) as err:
        budget.acquire(time.perf_counter() + 0.01)  # 60 ms of rest left, 10 ms to the deadline
    assert err.value.outcome == "starved"
    budget.acquire(time.perf_counter() + 1)  # the slot was released by the refusal
    budget.release(0.0)


async def test_sim_hard_shadow_searches_with_the_categories(model_dir: Path, tmp_path: Path) -> None:
    """A shadow's steps go through `assemble`, which hands sim_hard its categories (its `RetrievalContext`)."""
    config = tmp_path / "exp.yaml"
    write_config(config, {"salt": "s", "arms": [{"name": "main", "share": 100, "bundle": "tiny/1", "shadows": [
        {"name": "sim", "bundle": "tiny/1", "sample_rate": 1.0, "retrieval": {"strategy": "sim_hard:fallback=pad"}},
    ]}]})
    settings = Settings(model_dir=model_dir, experiments_file=config, scorer_threads=1, poll_interval_s=0,
                        shadow_sink_dir=tmp_path / "sink", shadow_chunk=16)
    registry = ModelRegistry(settings, lambda: make_retriever("exact"))
    metrics = Metrics()
    runner = ShadowRunner(settings, metrics, seed=0)
    manager = ExperimentManager(settings, registry, metrics, on_change=lambda e: runner.configure(e.shadows()))
    await manager.reload()
    (shadow,) = manager.route(0).shadows
    retriever = shadow.model.retriever
    contexts: list[Any] = []
    search = retriever.search

    def spy(queries: Any, keys: Any, k: int, context: Any = None) -> Any:
        contexts.append(context)
        return search(queries, keys, k, context)

    retriever.search = spy  # type: ignore[method-assign]
    try:
        offer(manager, runner, 0)
        await wait_for(lambda: count(metrics, "sim", "ok") == 1)
    finally:
        await runner.aclose()
    assert len(contexts) == 3  # 40 candidates in steps of 14/13/13
    assert all(c.key_category is not None and c.query_category is not None for c in contexts)
    assert sum(c.query_category.shape[0] for c in contexts) == 40
