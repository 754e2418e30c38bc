"""`rankserve bench --sections side-features` at a tiny size: both servers answer every request
over REST and gRPC, the side bundle has the 3 item, 2 user and 2 context features and shares the
base's retrieval weights, the report holds both variants and their ratios, and nothing is left
running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.bench import Workload
from loadtest.bench_side import TARGET_RATIO, _Tally, compare, prepare_side_workload
from loadtest.serving import prepare_workload

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
TINY = Workload(items=3_000, categories=50, users=6, history=300, candidates=40, k=16, iterations=5, warmup=2)


def _servers_of(root: Path) -> list[str]:
    """Command lines of running `rankserve serve` processes reading a model under `root`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "service.cli serve" in cmd and str(root) in cmd:
                found.append(cmd)
    return found


def test_side_workload_twins_the_base_bundle(tmp_path: Path) -> None:
    from export.bundle import open_bundle

    base = prepare_workload(tmp_path / "base", TINY, "generated")
    side = prepare_side_workload(tmp_path / "side", TINY, base)
    spec = side.schema.spec
    assert spec.side.user.names == ("city", "age")
    assert spec.side.item.names == ("brand", "seller", "price")
    assert spec.side.context.names == ("device", "hour")
    assert spec.scorer_inputs[-2:] == ("side_ids", "side_values")
    assert side.schema.vocab_sizes() == base.schema.vocab_sizes() and spec.actions == base.schema.spec.actions
    assert len(side.item_table) == len(base.catalogue[0]) and len(side.user_table) == len(base.users)
    tb, ts = open_bundle(base.bundle_path).tables, open_bundle(side.bundle_path).tables
    assert set(tb) == set(ts)
    for name in tb:  # same tables: both retrieve the same behaviours at the same cost
        np.testing.assert_array_equal(tb[name], ts[name], err_msg=name)


def test_compare_ratios() -> None:
    base = _Tally(latencies_ms=[10.0] * 10, cpu_s=1.0, requests=100, round_cpu_ms=[10.0, 10.0])
    side = _Tally(latencies_ms=[11.0] * 10, cpu_s=1.2, requests=100, round_cpu_ms=[11.0, 13.0])
    out = compare({"base": base, "side": side})
    assert out["ratio"]["server_cpu"] == 1.2 and out["ratio"]["p50"] == 1.1
    assert out["ratio"]["server_cpu_rounds"] == [1.1, 1.3]
    assert out["target_ratio"] == TARGET_RATIO and out["within_target"] is False


def test_bench_side_features_section(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "service.cli", "bench", "--data", "generated", "--items", str(TINY.items),
           "--users", str(TINY.users), "--history", str(TINY.history), "--candidates", str(TINY.candidates),
           "--k", str(TINY.k), "--iterations", "5", "--warmup", "2", "--sections", "side-features",
           "--side-rounds", "2", "--side-requests", "6", "--side-concurrency", "2", "--side-transports", "rest,grpc",
           "--side-inprocess", "3", "--out", str(out)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the bench's work directory: its servers' --model-dir
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())["side_features"]
    for transport in ("rest", "grpc"):
        r = report[transport]
        assert r["rounds"] == 2
        for variant in ("base", "side"):
            assert r[variant]["n"] == 12 and r[variant]["failures"] == 0, r[variant]
            assert r[variant]["server_cpu_ms_per_request"] > 0
        # a round's ratio needs the base's CPU of that round, which /proc counts in 10 ms ticks: six
        # tiny requests can read 0 (that round is left out of the per-round ratios, as it should be)
        measured = [cpu for cpu in r["base"]["server_cpu_ms_per_request_by_round"] if cpu > 0]
        assert r["ratio"]["server_cpu"] > 0 and len(r["ratio"]["server_cpu_rounds"]) == len(measured) >= 1
    stages = report["in_process_stages_p50_ms"]
    assert {"fetch", "retrieve", "score", "cpu"} <= set(stages["side"])
    assert "side features: rest side / base" in done.stdout and "side features: grpc side / base" in done.stdout
    assert _servers_of(tmp_path) == []  # both servers stopped
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(("rankserve-bench-", "rankserve-valkey-"))]
    assert left == []  # its work directory and the embedded Valkeys' removed


def test_unknown_section_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "service.cli", "bench", "--sections", "side-feature"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "side_features" in (done.stdout + done.stderr)
