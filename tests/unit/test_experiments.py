"""Experiment config: parsing and validation, sticky assignment, compilation against a registry of
real (tiny) bundles, reload and polling, routing and overrides."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from service.errors import ExperimentsRejected, InvalidRequest, ModelUnavailable
from service.experiments.manager import (
    BUCKETS,
    Arm,
    ExperimentManager,
    Experiments,
    bucket_of,
    parse_experiments,
)
from service.experiments.shadow import parse_fault
from service.observability.metrics import Metrics
from service.registry import LoadedModel, ModelRegistry
from service.retrieval import make_retriever
from service.settings import Settings
from tests.experiments_helpers import two_version_model_dir, write_config

REPO = Path(__file__).resolve().parents[2]

# -- assignment ----------------------------------------------------------------------------------------


def test_bucket_is_salted_blake2b_mod_10000() -> None:
    expected = int.from_bytes(hashlib.blake2b(b"exp-salt:42", digest_size=8).digest(), "big") % BUCKETS
    assert bucket_of("exp-salt", 42) == expected
    # pinned values: a change here would move users between arms in a running experiment
    assert (bucket_of("exp-salt", 42), bucket_of("exp-salt", 0), bucket_of("other", 42)) == (5888, 9362, 9777)


def fake_experiments(shares: dict[str, float], salt: str = "s") -> Experiments:
    arms, start = [], 0
    for name, share in shares.items():
        buckets = round(share * 100)
        arms.append(Arm(name, start, buckets, cast(LoadedModel, None), "exact", ()))
        start += buckets
    return Experiments(salt, tuple(arms), Path("x.yaml"), "digest", 0.0)


def test_shares_hold_within_one_percent_over_100k_users() -> None:
    shares = {"control": 50.0, "a": 30.0, "b": 15.0, "tiny": 4.5, "override-only": 0.0, "sliver": 0.5}
    exps = fake_experiments(shares, salt="2024-06-home")
    users = np.random.default_rng(0).integers(0, 2**63 - 1, 100_000, dtype=np.int64)
    counts = Counter(exps.arm_at(bucket_of(exps.salt, int(u))).name for u in users)
    for name, share in shares.items():
        observed = 100.0 * counts[name] / len(users)
        assert abs(observed - share) <= 1.0, (name, observed, share)
    assert counts["override-only"] == 0
    # deterministic: the same users land in the same arms again
    again = Counter(exps.arm_at(bucket_of(exps.salt, int(u))).name for u in users)
    assert again == counts


def test_bucket_ranges_are_contiguous_in_declared_order() -> None:
    exps = fake_experiments({"a": 12.34, "b": 0.0, "c": 87.66})
    assert exps.arm_at(0).name == "a" and exps.arm_at(1233).name == "a"
    assert exps.arm_at(1234).name == "c" and exps.arm_at(BUCKETS - 1).name == "c"


def test_assignment_does_not_depend_on_the_process() -> None:
    """Unlike Python's hash(), the bucket is the same in any process, whatever PYTHONHASHSEED."""
    code = ("import json; from service.experiments.manager import bucket_of; "
            "print(json.dumps([bucket_of('s', u) for u in range(500)]))")
    here = [bucket_of("s", u) for u in range(500)]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed},
                             capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == here


def test_another_salt_reshuffles_users() -> None:
    same = sum(bucket_of("a", u) // 5000 == bucket_of("b", u) // 5000 for u in range(20_000)) / 20_000
    assert 0.47 < same < 0.53  # independent 50/50 splits agree half the time


# -- parsing ----------------------------------------------------------------------------------------------


def doc(**arm_overrides: Any) -> dict[str, Any]:
    return {"salt": "s", "arms": [{"name": "a", "share": 60, "bundle": "tiny/1", **arm_overrides},
                                  {"name": "b", "share": 40, "bundle": "tiny/2"}]}


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (json.dumps({"salt": "s", "arms": [{"name": "a", "share": 60, "bundle": "tiny/1"},
                                           {"name": "b", "share": 30, "bundle": "tiny/1"}]}),
         ["sum to 90%", "exactly 100%", "a 60%, b 30%"]),
        (json.dumps(doc(share=59.995)), ["multiple of 0.01"]),
        (json.dumps({"salt": "s", "arms": [{"name": "a", "share": 50, "bundle": "tiny/1"},
                                           {"name": "a", "share": 50, "bundle": "tiny/1"}]}), ["unique", "'a'"]),
        (json.dumps(doc(bundle="../etc/1")), ["arms.0.bundle"]),
        (json.dumps(doc(bundle="tiny/latest")), ["arms.0.bundle"]),
        (json.dumps(doc(weights={"click": 1})), ["arms.0.weights", "Extra inputs"]),
        (json.dumps(doc(shadows=[{"bundle": "tiny/2", "sample_rate": 0}])), ["arms.0.shadows.0.sample_rate"]),
        (json.dumps(doc(shadows=[{"bundle": "tiny/2", "sample_rate": 0.1}, {"bundle": "tiny/2", "sample_rate": 1}])),
         ["shadow names must be unique", "tiny-2"]),
        (json.dumps(doc(fusion={"weights": {"click": float("inf")}})), ["finite"]),
        ("salt: s\narms: [", ["not valid YAML"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        ("salt: s\narms:\n- name: a\n  share: 50\n  share: 100\n  bundle: tiny/1\n",
         ["not valid YAML", "the key 'share' is given twice"]),  # YAML itself would keep the last one
        ("salt: s\nsalt: t\narms: []\n", ["the key 'salt' is given twice"]),
        (json.dumps({"arms": []}), ["salt: Field required", "arms: List should have at least 1 item"]),
    ],
)
def test_invalid_configs_are_refused_with_what_to_fix(text: str, fragments: list[str]) -> None:
    with pytest.raises(ExperimentsRejected) as err:
        parse_experiments(text, "exp.yaml")
    assert err.value.message.startswith("exp.yaml refused: ")
    for fragment in fragments:
        assert fragment in err.value.message


def test_valid_config_parses() -> None:
    spec = parse_experiments(
        "salt: s\narms:\n"
        "  - {name: a, share: 33.33, bundle: tiny/1}\n"
        "  - {name: b, share: 66.67, bundle: tiny/2, retrieval: {k: 4},\n"
        "     shadows: [{bundle: tiny/1, sample_rate: 0.25}, {name: new, bundle: tiny/2, sample_rate: 1}]}\n"
    )
    assert [a.buckets for a in spec.arms] == [3333, 6667]
    assert [s.label for s in spec.arms[1].shadows] == ["tiny-1", "new"]


# -- against a registry of real bundles ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_version_model_dir(tmp_path_factory.mktemp("experiments"), retrained_seed=1)


def make_manager(model_dir: Path, config: Path | None, **overrides: Any) -> ExperimentManager:
    settings = Settings(model_dir=model_dir, experiments_file=config, scorer_threads=1, poll_interval_s=0,
                        retrieval_strategy="exact", **overrides)
    registry = ModelRegistry(settings, lambda: make_retriever("exact"))
    registry.load_version()
    return ExperimentManager(settings, registry, Metrics())


async def test_compiles_arm_views_and_shadows(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    write_config(config, {"salt": "s", "arms": [
        {"name": "control", "share": 50, "bundle": "tiny/1",
         "shadows": [{"name": "self", "bundle": "tiny/1", "sample_rate": 1.0},
                     {"name": "next", "bundle": "tiny/2", "sample_rate": 0.5}]},
        {"name": "treat", "share": 50, "bundle": "tiny/2",
         "fusion": {"weights": {"click": 2, "buy": 5}}, "retrieval": {"strategy": "numpy", "k": 4}},
    ]})
    manager = make_manager(model_dir, config)
    result = await manager.reload()
    assert result.status == "loaded"
    control, treat = result.experiments.arms
    assert control.model is manager.registry.get("tiny/1")  # no overrides: the registry's own instance
    assert treat.model.key == "tiny/2" and treat.model.retrieval.k == 4 and treat.strategy == "numpy"
    assert treat.model.fusion.describe()["weights"] == {"click": 2.0, "cart": 0.0, "buy": 5.0}
    this, following = control.shadows
    assert (this.name, this.model.key, this.sample_rate) == ("self", "tiny/1", 1.0)
    assert following.model.key == "tiny/2"
    # shadows score on their own session and retriever, never the primary's instances (other threads)
    assert this.model.scorer is not control.model.scorer
    assert this.model.retriever is not control.model.retriever
    assert (await manager.reload()).status == "unchanged"
    described = manager.describe()
    assert [a["name"] for a in described["arms"]] == ["control", "treat"]
    assert described["arms"][0]["buckets"] == [0, 4999] and described["arms"][1]["retrieval"]["k"] == 4


async def test_arm_strategies_carry_options_and_shadows_get_few_threads(model_dir: Path, tmp_path: Path) -> None:
    from service.retrieval import EtaRetriever, ExactRetriever, SimHardRetriever

    config = tmp_path / "exp.yaml"
    write_config(config, {"salt": "s", "arms": [
        {"name": "eta", "share": 50, "bundle": "tiny/1", "retrieval": {"strategy": "eta:bits=128,shortlist=512"},
         "shadows": [{"name": "sim", "bundle": "tiny/2", "sample_rate": 1.0,
                      "retrieval": {"strategy": "sim_hard:fallback=pad"}},
                     {"name": "mine", "bundle": "tiny/2", "sample_rate": 1.0,
                      "retrieval": {"strategy": "eta:num_threads=2"}}]},
        {"name": "nodedup", "share": 50, "bundle": "tiny/1", "retrieval": {"strategy": "exact:dedup=false"}},
    ]})
    manager = make_manager(model_dir, config, shadow_threads=1)
    arm, nodedup = (await manager.reload()).experiments.arms
    eta = arm.model.retriever
    assert isinstance(eta, EtaRetriever) and (eta.bits, eta.shortlist, eta.num_threads) == (128, 512, None)
    assert arm.strategy == "eta:bits=128,shortlist=512"
    sim, mine = (s.model.retriever for s in arm.shadows)
    assert isinstance(sim, SimHardRetriever) and sim.fallback == "pad" and sim.num_threads == 1  # shadow_threads
    assert isinstance(mine, EtaRetriever) and mine.num_threads == 2  # the strategy's own option wins
    exact = nodedup.model.retriever
    assert isinstance(exact, ExactRetriever) and not exact.dedup and exact.device == "cpu"


@pytest.mark.parametrize(
    ("arm", "fragments"),
    [
        ({"bundle": "tiny/9"}, ["bundle tiny/9", "no bundle tiny/9", "versions of 'tiny': [1, 2]"]),
        ({"bundle": "nope/1"}, ["no bundle nope/1"]),
        ({"fusion": {"weights": {"clik": 1.0}}}, ["arm 'a'", "['clik']", "does not predict"]),
        ({"fusion": {"transforms": {"buy": "sqrt"}}}, ["transform of 'buy'"]),
        ({"retrieval": {"k": 100_000}}, ["k=100000 is outside bundle tiny/1's limits"]),
        ({"retrieval": {"strategy": "magic"}}, ["unknown retrieval strategy 'magic'"]),
        ({"retrieval": {"strategy": "magic:bits=128"}}, ["unknown retrieval strategy 'magic:bits=128'"]),
        ({"retrieval": {"strategy": "eta:colour=blue"}}, ["arm 'a'", "bad options for retriever 'eta'"]),
        ({"retrieval": {"strategy": "eta:bits"}}, ["bad retriever option 'bits'"]),
        ({"retrieval": {"strategy": "eta:bits=100"}}, ["bits must be a positive multiple of 64"]),
        ({"shadows": [{"name": "x", "bundle": "tiny/2", "sample_rate": 1, "fusion": {"weights": {"ctr": 1}}}]},
         ["arm 'a' shadow 'x'", "['ctr']"]),
    ],
)
async def test_invalid_config_keeps_the_previous_one(
    model_dir: Path, tmp_path: Path, arm: dict[str, Any], fragments: list[str]
) -> None:
    config = tmp_path / "exp.yaml"
    good = {"salt": "s", "arms": [{"name": "a", "share": 100, "bundle": "tiny/1"}]}
    write_config(config, good)
    manager = make_manager(model_dir, config)
    before = (await manager.reload()).experiments
    write_config(config, {"salt": "s", "arms": [{"name": "a", "share": 100, "bundle": "tiny/1", **arm}]})
    with pytest.raises(ExperimentsRejected) as err:
        await manager.reload()
    for fragment in fragments:
        assert fragment in err.value.message, err.value.message
    assert manager.current is before and manager.last_error == err.value.message
    assert manager.route(1).arm == "a"  # still serving


async def test_a_file_that_is_not_utf8_is_refused_not_a_crash(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    write_config(config, {"salt": "s", "arms": [{"name": "a", "share": 100, "bundle": "tiny/1"}]})
    manager = make_manager(model_dir, config)
    before = (await manager.reload()).experiments
    config.write_bytes(b"# M\xfcller's test\n" + config.read_bytes())  # a Latin-1 comment
    with pytest.raises(ExperimentsRejected, match="not UTF-8 text"):
        await manager.reload()
    assert manager.current is before and manager.last_error is not None  # still serving, and it says why


async def test_polling_picks_up_a_changed_file(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    write_config(config, {"salt": "s", "arms": [{"name": "a", "share": 100, "bundle": "tiny/1"}]})
    manager = make_manager(model_dir, config, experiments_poll_interval_s=0.05)
    await manager.reload()
    stop = asyncio.Event()
    poller = asyncio.create_task(manager.poll(stop))
    try:
        write_config(config, {"salt": "s", "arms": [{"name": "x", "share": 60, "bundle": "tiny/1"},
                                                    {"name": "y", "share": 40, "bundle": "tiny/2"}]})
        for _ in range(200):
            if manager.current is not None and manager.current.arms[0].name == "x":
                break
            await asyncio.sleep(0.05)
        assert [a.name for a in manager.current.arms] == ["x", "y"]  # type: ignore[union-attr]
        write_config(config, {"salt": "s", "arms": [{"name": "x", "share": 10, "bundle": "tiny/1"}]})
        for _ in range(200):
            if manager.last_error:
                break
            await asyncio.sleep(0.05)
        assert "sum to 10%" in (manager.last_error or "")
        assert [a.name for a in manager.current.arms] == ["x", "y"]  # type: ignore[union-attr]
    finally:
        stop.set()
        await poller


async def test_routing_and_override(model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    write_config(config, {"salt": "s", "arms": [{"name": "a", "share": 50, "bundle": "tiny/1"},
                                                {"name": "b", "share": 50, "bundle": "tiny/2"},
                                                {"name": "qa", "share": 0, "bundle": "tiny/2"}]})
    manager = make_manager(model_dir, config)
    with pytest.raises(ModelUnavailable, match="not loaded"):
        manager.route(1)  # configured but not loaded yet: no silent fallback to the default arm
    await manager.reload()
    routes = {manager.route(u).arm for u in range(200)}
    assert routes == {"a", "b"}
    route = manager.route(7)
    assert route.bucket == bucket_of("s", 7)
    forced = manager.route(7, "qa")
    assert forced.arm == "qa" and forced.model.key == "tiny/2" and forced.bucket is None
    with pytest.raises(InvalidRequest, match="unknown arm 'zz'; arms: a, b, qa"):
        manager.route(7, "zz")


def test_without_experiments_one_default_arm_serves_the_newest(model_dir: Path) -> None:
    manager = make_manager(model_dir, None)
    route = manager.route(123)
    assert route.arm == "default" and route.model.key == "tiny/2" and route.shadows == ()
    assert manager.route(123, "default").arm == "default"
    with pytest.raises(InvalidRequest, match="no experiments are configured"):
        manager.route(123, "b")
    assert manager.describe()["arms"][0]["bundle"] == "tiny/2"


# -- helpers ----------------------------------------------------------------------------------------------


def test_fault_spec() -> None:
    fault = parse_fault("sleep:10x")
    assert fault.rules == {None: ("sleep", 10.0)}
    fault = parse_fault("slow=sleep:2.5x, bad=raise")
    assert fault.rules == {"slow": ("sleep", 2.5), "bad": ("raise", 0.0)}
    with pytest.raises(ValueError, match="bad shadow fault"):
        parse_fault("sleep:10")
    with pytest.raises(ValueError, match="bad shadow fault"):
        Settings(shadow_fault="explode")


# -- admin token and logs -----------------------------------------------------------------------------------


def test_arm_override_needs_the_admin_token() -> None:
    from service.errors import Forbidden
    from service.transports.auth import authorize_arm_override, bearer_token

    with_token = Settings(admin_token="s3cret")
    assert authorize_arm_override(with_token, "qa", "s3cret") == "qa"
    for token in (None, "", "s3cre", "s3cret2"):
        with pytest.raises(Forbidden, match="Authorization: Bearer"):
            authorize_arm_override(with_token, "qa", token)
    with pytest.raises(Forbidden, match="admin is disabled"):
        authorize_arm_override(Settings(), "qa", "anything")
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer") is None


def test_log_lines_carry_the_arm() -> None:
    import logging

    from service.observability.logging_setup import JsonFormatter, arm_var

    record = logging.LogRecord("rankserve.core", logging.WARNING, __file__, 1, "degraded", None, None)
    token = arm_var.set("treatment")
    try:
        doc = json.loads(JsonFormatter().format(record))
    finally:
        arm_var.reset(token)
    assert doc["arm"] == "treatment"
    assert "arm" not in json.loads(JsonFormatter().format(record))
