"""Does shadow traffic touch the primary's latency? One run, interleaved phases, JSON out.

One `rankserve serve` process with an experiments file (one arm, 100% of users) and
`RANKSERVE_SHADOW_FAULT=slow=sleep:10x,failing=raise` (the test-only fault hook). Phases differ
only in the arm's shadows, switched by rewriting the file and calling the admin reload:

* ``none``     - no shadow (the baseline);
* ``slow``     - a shadow that sleeps 10x the primary's latency, then scores for real (sample rate 1.0);
* ``failing``  - a shadow that raises on every call (sample rate 1.0);
* ``cpu``      - informational: a healthy shadow of the same size scoring every request
  (sample rate 1.0), i.e. up to twice the CPU work per request on the same 2 cores;
* ``none_paced`` and ``cpu_paced`` - informational: the same without and with the healthy shadow,
  the client pausing ``--pace-ms`` between requests, so the server has idle time for shadows
  (compared with each other).

Every round runs each phase once, in rotated order, so machine noise hits all phases alike.
Before a phase is measured, the previous phase's shadow work is drained (queue and in-flight at
0). The client sends at concurrency 1 over REST keep-alive and times each request end to end.
Reported: pooled percentiles per phase and their ratio to `none` (the acceptance), and the median
over rounds of the per-round p50 and p95 ratios (paired: a burst of outside load spoils one
block, not a whole phase).
The acceptance check: `slow` and `failing` keep p50 and p99 within 10% of `none`, and no
primary request fails. Extra server settings: `--server-env RANKSERVE_SHADOW_YIELD=false`.

    python -m loadtest.bench_shadow [--rounds 80 --requests 40] [--out report.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from loadtest.bench import Workload, bench_events, build_bundle, candidate_sets, percentiles
from loadtest.prom import metric_sum

log = logging.getLogger("rankserve.bench_shadow")

REQUEST_TIME = 1_700_000_000
CPU_SHADOW = [{"name": "cpu", "bundle": "bench/1", "sample_rate": 1.0}]
PHASES: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "slow": [{"name": "slow", "bundle": "bench/1", "sample_rate": 1.0}],
    "failing": [{"name": "failing", "bundle": "bench/1", "sample_rate": 1.0}],
    "cpu": CPU_SHADOW,
    "none_paced": [],
    "cpu_paced": CPU_SHADOW,
}
PACED = {"none_paced", "cpu_paced"}  # the client pauses between requests: the server has idle time
BASELINE = {p: ("none_paced" if p in PACED else "none") for p in PHASES}
ACCEPTANCE = ("slow", "failing")
FAULT = "slow=sleep:10x,failing=raise"


def write_config(path: Path, shadows: list[dict[str, Any]]) -> None:
    doc = {"salt": "bench", "arms": [{"name": "main", "share": 100, "bundle": "bench/1", "shadows": shadows}]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)


def shadow_counts(text: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for outcome in ("ok", "error", "timeout", "starved", "dropped"):
        out[outcome] = int(metric_sum(text, "rankserve_shadow_jobs_total", outcome=outcome))
    return out


class Bench:
    def __init__(self, base: str, token: str, config: Path, bodies: list[bytes]) -> None:
        self.client = httpx.Client(base_url=base, timeout=30)
        self.auth = {"Authorization": f"Bearer {token}"}
        self.config = config
        self.bodies = bodies
        self.sent = 0

    def metrics(self) -> str:
        return self.client.get("/metrics").text

    def switch(self, phase: str) -> None:
        write_config(self.config, PHASES[phase])
        resp = self.client.post("/v1/admin/experiments/reload", headers=self.auth)
        if resp.status_code != 200:
            raise RuntimeError(f"reload for phase {phase} failed: {resp.status_code} {resp.text[:300]}")
        deadline = time.monotonic() + 120
        while True:  # the previous phase's shadow work must not overlap this phase
            text = self.metrics()
            busy = metric_sum(text, "rankserve_shadow_queue_depth") + metric_sum(text, "rankserve_shadow_inflight")
            if busy == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("shadow work did not drain within 120 s")
            time.sleep(0.05)

    def request(self, pause_s: float = 0.0) -> tuple[float, str | None]:
        """One timed request; returns (ms, None) or (ms, what went wrong)."""
        if pause_s:
            time.sleep(pause_s)
        body = self.bodies[self.sent % len(self.bodies)]
        self.sent += 1
        t0 = time.perf_counter()
        resp = self.client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
        ms = (time.perf_counter() - t0) * 1000
        if resp.status_code != 200:
            return ms, f"{resp.status_code} {resp.json().get('error', {}).get('code')}"
        return ms, "degraded" if resp.json()["degraded"] else None


def start_server(env: dict[str, str], model_dir: Path, redis_url: str, log_path: Path) -> tuple[Any, str]:
    from feature_store.embedded import free_port

    http_port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))} | env
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-port", "0", "--model-dir", str(model_dir), "--redis-url", redis_url],
        env=full_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def stop_server(proc: Any) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--history", type=int, default=5_000)
    p.add_argument("--candidates", type=int, default=300)
    p.add_argument("--k", type=int, default=64)
    p.add_argument(
        "--rounds", type=int, default=80,
        help="each round runs every phase once (80 x 40 = 3,200 requests per phase: a steadier p99)",
    )
    p.add_argument("--requests", type=int, default=40, help="measured requests per phase and round")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests at the start of each phase")
    p.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    p.add_argument("--pace-ms", type=float, default=25.0, help="client pause between requests in *_paced phases")
    p.add_argument("--threads", type=int, default=None, help="scorer threads (default: available CPUs)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server setting, e.g. RANKSERVE_SHADOW_YIELD=false (repeatable)")
    p.add_argument("--out", type=Path, help="also write the JSON report here")


def run(args: argparse.Namespace) -> int:
    from feature_store.embedded import EmbeddedValkey
    from feature_store.redis_store import create_store
    from feature_store.schema import FeatureSchema
    from feature_store.store import EmbeddedConfig, FeatureStoreConfig
    from ingest.bulk import ingest_log
    from service.settings import available_cpus

    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown or "none" not in phases:
        log.error("phases must include 'none' and come from %s; got %s", list(PHASES), phases)
        return 2
    w = Workload(items=args.items, users=args.users, history=args.history, candidates=args.candidates, k=args.k)
    threads = args.threads or available_cpus()
    root = Path(tempfile.mkdtemp(prefix="rankserve-bench-shadow-"))
    t0 = time.perf_counter()
    report: dict[str, Any] = {"workload": asdict(w), "cpus": available_cpus(), "scorer_threads": threads,
                              "rounds": args.rounds, "requests_per_phase_round": args.requests, "fault": FAULT}
    proc = None
    try:
        bundle = build_bundle(root, w)
        schema = FeatureSchema.load(bundle / "schema")
        events, _ = bench_events(w)
        reqs = candidate_sets(w, events, 64)
        bodies = [json.dumps({"user_id": u, "candidates": c, "top_n": w.top_n, "request_time": REQUEST_TIME}).encode()
                  for u, c in reqs]
        with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:

            async def ingest() -> None:
                async with create_store(FeatureStoreConfig(url=valkey.url)) as store:
                    await ingest_log(store, events, schema, "bench", activate=True)

            asyncio.run(ingest())
            report["setup_s"] = round(time.perf_counter() - t0, 1)
            config = root / "experiments.yaml"
            write_config(config, [])
            token = secrets.token_hex(16)
            env = {
                "RANKSERVE_EXPERIMENTS_FILE": str(config), "RANKSERVE_EXPERIMENTS_POLL_INTERVAL_S": "0",
                "RANKSERVE_ADMIN_TOKEN": token, "RANKSERVE_SHADOW_FAULT": FAULT, "RANKSERVE_SHADOW_QUEUE_SIZE": "16",
                "RANKSERVE_SHADOW_SINK_DIR": str(root / "sink"), "RANKSERVE_SCORER_THREADS": str(threads),
                "RANKSERVE_POLL_INTERVAL_S": "0", "RANKSERVE_MAX_CANDIDATES": str(max(1000, w.candidates)),
                "RANKSERVE_LOG_LEVEL": "WARNING",
            }
            extra = dict(kv.split("=", 1) for kv in args.server_env)
            env.update(extra)
            report["server_env"] = extra
            proc, base = start_server(env, root / "models", valkey.url, root / "server.log")
            bench = Bench(base, token, config, bodies)
            for _ in range(3 * args.warmup):  # JIT, allocators, page cache: before any phase is timed
                bench.request()
            times: dict[str, list[float]] = {p: [] for p in phases}
            per_round: dict[str, list[dict[str, float]]] = {p: [] for p in phases}
            failures: Counter[str] = Counter()
            problems: dict[str, Counter[str]] = {p: Counter() for p in phases}
            jobs: dict[str, Counter[str]] = {p: Counter() for p in phases}
            for r in range(args.rounds):
                order = phases[r % len(phases):] + phases[: r % len(phases)]
                for phase in order:
                    bench.switch(phase)
                    pause = args.pace_ms / 1000 if phase in PACED else 0.0
                    for _ in range(args.warmup):
                        bench.request(pause)
                    before = shadow_counts(bench.metrics())
                    block = []
                    for _ in range(args.requests):
                        ms, problem = bench.request(pause)
                        block.append(ms)
                        if problem:
                            failures[phase] += 1
                            problems[phase][problem] += 1
                    times[phase] += block
                    per_round[phase].append(percentiles(block))
                    jobs[phase] += shadow_counts(bench.metrics()) - before
                log.info("round %d/%d done", r + 1, args.rounds)
            report["phases"] = {
                p: {**percentiles(times[p]), "failed_requests": failures[p], "failures": dict(problems[p]),
                    "shadow_jobs": dict(jobs[p])}
                for p in phases
            }
            compared = [p for p in phases if BASELINE[p] in phases and BASELINE[p] != p]
            report["ratio_vs_baseline"] = {
                p: {"baseline": BASELINE[p], **{
                    q: round(report["phases"][p][q] / report["phases"][BASELINE[p]][q], 3) for q in ("p50", "p99")
                }}
                for p in compared
            }
            # paired by round (p50 and p95: a block is too short for its own p99): a burst of outside
            # load spoils one block, not a whole phase
            report["median_round_ratio_vs_baseline"] = {
                p: {q: round(float(np.median([b[q] / a[q] for a, b in zip(per_round[BASELINE[p]], per_round[p],
                                                                          strict=True)])), 3)
                    for q in ("p50", "p95")}
                for p in compared
            }
            report["acceptance"] = {
                p: bool(report["ratio_vs_baseline"][p]["p50"] <= 1.10 and report["ratio_vs_baseline"][p]["p99"] <= 1.10
                        and failures[p] == 0)
                for p in ACCEPTANCE if p in phases
            }
            bench.client.close()
            stop_server(proc)
            proc = None
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


def main() -> int:
    from service.observability.logging_setup import configure_logging

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_shadow", description=__doc__.splitlines()[0])
    add_arguments(parser)
    configure_logging("INFO", json_logs=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
