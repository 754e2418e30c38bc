"""`rankserve bench --sections stream` at a tiny size: the consumer and the raw floor drain every
round, the probes see their events served, the serving rounds run with the producer on and off,
the consumer process exits 0, and the markdown names each measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]


def test_bench_stream_section(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "service.cli", "bench", "--data", "generated", "--items", "3000", "--users", "6",
           "--history", "300", "--candidates", "40", "--k", "16", "--sections", "stream", "--stream-rounds", "2",
           "--stream-events", "3000", "--stream-rate", "500", "--stream-probes", "5", "--stream-consumer-nice", "5",
           "--stream-serve-requests", "40", "--stream-control-cores", "0.1", "--out", str(out)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())["stream"]
    t = report["throughput"]
    assert t["rounds"] == 2 and len(t["per_round_s"]["consumer"]) == len(t["per_round_s"]["raw_floor"]) == 2
    assert t["consumer_events_per_s"] > 0 and t["raw_floor_events_per_s"] > 0
    assert report["event_to_servable_ms"]["n"] == 5 and report["event_to_servable_ms"]["p99"] > 0
    serving = report["serving_while_consuming"]
    assert serving["idle"]["n"] == serving["consuming"]["n"] == serving["control"]["n"] == 2 * 40
    assert serving["control_cores"] == 0.1 and serving["control_p99_ratio"] > 0
    assert serving["idle_halves_p99_ratio"] > 0  # one idle round of each parity
    assert serving["background_events_per_s"] > 0
    assert serving["consumer_nice"] == 5  # `consume --nice 5`, as the kernel reports the process
    cores = serving["cores"]
    assert set(cores) == {"idle", "consuming", "control"}
    assert "producer" in cores["consuming"] and "producer" not in cores["idle"] and "burner" in cores["control"]
    assert cores["control"]["burner"] > 0  # the control's CPU work ran
    for phase in cores.values():  # the server and its Valkey worked in both phases, within the machine's CPU
        assert {"server", "consumer", "valkey", "machine"} <= set(phase)
        assert phase["server"] > 0 and phase["valkey"] > 0 and phase["consumer"] >= 0
        assert phase["server"] <= phase["machine"] + 0.05
    # the consumer worked while consuming: its append script and reads ran (its own CPU at this size
    # can stay below one clock tick of /proc over a phase, so it is not what tells)
    assert serving["valkey_command_cores"]["consuming"]["evalsha"] > 0
    assert serving["valkey_calls_per_s"]["consuming"]["xreadgroup"] > 0
    assert report["consumer_exit_code"] == 0
    for needle in ("one consumer, events/s appended", "floor / consumer", "event-to-servable", "idle / consuming",
                   "consumer at nice 5", "plain CPU work (control",
                   "cores used, consuming"):
        assert needle in done.stdout


def test_bench_stream_throughput_with_cluster_ids(tmp_path: Path) -> None:
    """`--stream-cluster-ids`: the workload's histories are clustered, and the consumer's rounds
    alternate with and without nearest-centroid ids; events of the clustered users get ids."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "service.cli", "bench", "--data", "generated", "--items", "3000", "--users", "6",
           "--history", "300", "--candidates", "40", "--k", "16", "--sections", "stream", "--stream-rounds", "4",
           "--stream-events", "2000", "--stream-population", "6", "--stream-cluster-ids", "--stream-throughput-only",
           "--out", str(out)]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())["stream"]
    assert set(report) == {"throughput"}
    t = report["throughput"]
    assert t["clustered_users"] == 6 and t["population"] == 6
    assert len(t["per_round_s"]["consumer"]) == len(t["per_round_s"]["consumer_cluster_ids"]) == 2
    assert t["consumer_cluster_ids_events_per_s"] > 0
    # two rounds of 2,000 events for the 6 clustered users, each with an id
    assert t["cluster_ids"] == {"assigned": 4000, "no_clustering": 0, "stale": 0, "changed": 0}
    assert "nearest-centroid cluster ids" in done.stdout
