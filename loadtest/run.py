"""`make loadtest`: the standard workload on embedded Valkey, served on loopback, driven by Locust.

    python -m loadtest.run --out loadtest/reports [--run-time 60s] [--max-requests 20000] \\
        [--concurrency 8] [--scenarios rest,grpc] [--users 1000] [--data auto|generated|synthetic:DIR]

Steps: build a bundle with the standard table sizes (1M items, random weights), ingest users with
10,000-event histories (from `data-cache/synth` when `rankserve synth` wrote it there, else
generated as `rankserve bench` does) and the whole catalogue into an embedded Valkey, start
`rankserve serve`, then run one headless Locust run per scenario (REST, gRPC) bounded by
--run-time and --max-requests. Each writes Locust's CSV files and HTML report into --out
(`<scenario>_stats.csv`, `<scenario>.html`, ...); `summary.json` / `summary.md` hold the aggregated
rows and `index.html` links the reports. Everything started is stopped at the end. Exit code 1 if
any request failed.

Arms: when the service has experiments (service/experiments.py), the server gets an experiments
file with one arm per retrieval strategy (exact, eta, sim_hard, twin_v2; `--arm-strategies`), so the
Zipf-skewed users land in mixed arms by the service's sticky hash. `--arms` with
`--arm-header x-rankserve-arm` forces arms per request instead (an admin override: the script
starts the server with an admin token and sends it). The server runs with the tuned environment
of the benchmark (loadtest.bench_e2e.TUNED_ENV) unless `--server-env` overrides it.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.bench import Workload
from loadtest.serving import REPO, ServerProcess, ingest, prepare_workload
from loadtest.traffic import write_population

log = logging.getLogger("loadtest.run")

SCENARIOS = {"rest": ["RestUser"], "grpc": ["GrpcUser"], "mixed": ["RestUser", "GrpcUser"]}
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("loadtest/reports"), help="report directory")
    p.add_argument("--scenarios", default="rest,grpc", help=f"comma-separated of {', '.join(SCENARIOS)}")
    p.add_argument("--run-time", default="60s", help="Locust --run-time of each scenario (e.g. 30s, 2m)")
    p.add_argument("--max-requests", type=int, default=20_000, help="stop a scenario after this many requests")
    p.add_argument("--concurrency", type=int, default=8, help="simulated users (closed loop, no think time)")
    p.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    p.add_argument("--think-ms", type=float, default=0.0, help="mean pause between a user's requests")
    p.add_argument("--users", type=int, default=1000, help="users ingested (Zipf-skewed traffic over them)")
    p.add_argument("--history", type=int, default=10_000, help="events per user")
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size (generated data only)")
    p.add_argument("--data", default="auto", help="auto | generated | synthetic:DIR")
    p.add_argument("--min-candidates", type=int, default=100)
    p.add_argument("--max-candidates", type=int, default=1000)
    p.add_argument("--arm-strategies", default="auto",
                   help="one experiment arm per retrieval strategy, users split evenly by the service's sticky "
                        "hash (e.g. exact,eta,sim_hard,twin_v2); 'auto': those four when the service has experiments, "
                        "'none': one default arm")
    p.add_argument("--arms", default="", help="force weighted arms per request, e.g. exact:0.5,eta:0.5 "
                                              "(sent in --arm-header with the admin token)")
    p.add_argument("--arm-header", default="", help="header that forces an arm, x-rankserve-arm (empty: not sent)")
    p.add_argument("--workers", type=int, default=1, help="rankserve worker processes")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the server (repeatable), e.g. RANKSERVE_SCORER_THREADS=1")
    p.add_argument("--keep", action="store_true", help="keep the temporary bundle directory")


def read_aggregated(stats_csv: Path) -> dict[str, Any]:
    """The "Aggregated" row of a Locust `*_stats.csv`, with numbers parsed."""
    with stats_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":
                out: dict[str, Any] = {}
                for key, value in row.items():
                    try:
                        out[key] = float(value) if "." in value or "e" in value.lower() else int(value)
                    except (TypeError, ValueError):
                        out[key] = value
                return out
    raise ValueError(f"{stats_csv} has no Aggregated row")


def locust_command(scenario: str, host: str, grpc_target: str, population: Path, out: Path,
                   args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(args.concurrency), "-r", str(args.spawn_rate), "--run-time", args.run_time,
        "--stop-timeout", "10", "--host", host, "--rs-grpc-target", grpc_target,
        "--rs-population", str(population), "--rs-max-requests", str(args.max_requests),
        "--rs-min-candidates", str(args.min_candidates), "--rs-max-candidates", str(args.max_candidates),
        "--rs-think-ms", str(args.think_ms), "--rs-arms", args.arms, "--rs-arm-header", args.arm_header,
        "--rs-admin-token", ADMIN_TOKEN if args.arm_header else "",
        "--csv", str(out / scenario), "--csv-full-history", "--html", str(out / f"{scenario}.html"),
        *SCENARIOS[scenario],
    ]


ADMIN_TOKEN = "loadtest-admin-token"  # loopback-only server started by this script


def arm_strategies(spec: str) -> list[str]:
    """The retrieval strategy of each experiment arm ([] for no experiments file)."""
    if spec == "none" or not spec:
        return []
    if spec == "auto":
        import importlib.util

        return ["exact", "eta", "sim_hard", "twin_v2"] if importlib.util.find_spec("service.experiments") else []
    return [s for s in spec.split(",") if s]


def write_experiments(path: Path, bundle: str, strategies: list[str]) -> None:
    """An experiments file with one arm per strategy, shares in whole buckets summing to 100%."""
    import yaml

    buckets = [10_000 // len(strategies)] * len(strategies)
    buckets[0] += 10_000 - sum(buckets)
    arms = [{"name": name.replace(":", "-").replace("=", "-").replace(",", "-"), "share": b / 100, "bundle": bundle,
             "retrieval": {"strategy": name}} for name, b in zip(strategies, buckets, strict=True)]
    path.write_text(yaml.safe_dump({"salt": "loadtest", "arms": arms}, sort_keys=False))


def service_counts(base_url: str) -> dict[str, dict[str, int]]:
    """From the service's Prometheus metrics: requests ranked per experiment arm, and searches an
    approximate strategy answered with exact instead, per "strategy/reason" (e.g. twin_v2 without
    clusters)."""
    import httpx

    from loadtest.prom import sums_by

    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {
        "requests_per_arm": sums_by(text, "rankserve_request_seconds_count", lambda labels: labels["arm"]),
        "retrieval_fallbacks": sums_by(
            text, "rankserve_retrieval_fallback_total", lambda labels: f"{labels['strategy']}/{labels['reason']}"
        ),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["| scenario | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in summary["scenarios"].items():
        lines.append(
            f"| {name} | {row['Request Count']} | {row['Failure Count']} | {row['Requests/s']:.1f} | "
            f"{row['50%']} | {row['95%']} | {row['99%']} | {row['Max Response Time']:.0f} |"
        )
    arms = summary.get("requests_per_arm")
    if arms:
        lines.append("")
        lines.append("Requests ranked per arm (service metrics): " + ", ".join(f"{a} {n}" for a, n in arms.items()))
        fallbacks = summary.get("retrieval_fallbacks") or {}
        lines.append("Searches answered with exact instead of the arm's approximate strategy: "
                     + (", ".join(f"{k} {n}" for k, n in fallbacks.items()) or "none"))
    return "\n".join(lines)


def write_index(out: Path, summary: dict[str, Any]) -> None:
    rows = "".join(
        f"<li><a href='{html.escape(name)}.html'>{html.escape(name)}</a>: {row['Request Count']} requests, "
        f"{row['Failure Count']} failures, p99 {row['99%']} ms</li>"
        for name, row in summary["scenarios"].items()
    )
    out.joinpath("index.html").write_text(
        f"<!doctype html><title>rankserve load test</title><h1>rankserve load test</h1>"
        f"<p>{html.escape(json.dumps(summary['config']))}</p><ul>{rows}</ul>"
    )


def run(args: argparse.Namespace) -> int:
    from feature_store.embedded import EmbeddedValkey
    from feature_store.store import EmbeddedConfig

    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; use {', '.join(SCENARIOS)}")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rankserve-loadtest-"))
    w = Workload(users=args.users, history=args.history, items=args.items)
    t0 = time.perf_counter()
    failures = 0
    summary: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "scenarios": {}}
    try:
        prepared = prepare_workload(root, w, args.data)
        population = out / "population.json"
        # hottest users first; a fixed shuffle so hotness is not tied to the id order
        import numpy as np

        users = [prepared.users[i] for i in np.random.default_rng(7).permutation(len(prepared.users))]
        write_population(population, users, prepared.items)
        setup = {"bundle_s": round(time.perf_counter() - t0, 1), "source": prepared.source}
        with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
            strategies = arm_strategies(args.arm_strategies)
            # a twin_v2 arm searches the behaviour clusters that ingest writes with the bundle's tables
            clustered = any(s.split(":")[0] == "twin_v2" for s in strategies)
            setup["ingest_s"] = round(ingest(valkey.url, prepared, clusters=clustered), 1)
            summary["setup"] = setup
            log.info("workload ready", extra=setup)
            from loadtest.bench_e2e import TUNED_ENV

            env = TUNED_ENV | dict(kv.split("=", 1) for kv in args.server_env)
            if strategies:  # mixed arms: the service splits the Zipf-skewed users by its sticky hash
                write_experiments(out / "experiments.yaml", f"{prepared.bundle_path.parent.name}/"
                                  f"{prepared.bundle_path.name}", strategies)
                env["RANKSERVE_EXPERIMENTS_FILE"] = str(out / "experiments.yaml")
            if args.arm_header:
                env["RANKSERVE_ADMIN_TOKEN"] = ADMIN_TOKEN
            summary["server_env"] = env
            with ServerProcess(prepared.model_dir, valkey.url, env=env, workers=args.workers,
                               log_path=out / "server.log") as server:
                for scenario in scenarios:
                    cmd = locust_command(scenario, server.base_url, server.grpc_target, population, out, args)
                    log.info("locust %s: %s", scenario, " ".join(cmd[2:]))
                    with (out / f"{scenario}.log").open("wb") as lf:
                        code = subprocess.run(cmd, cwd=REPO, stdout=lf, stderr=subprocess.STDOUT,
                                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False).returncode
                    row = read_aggregated(out / f"{scenario}_stats.csv")
                    row["locust_exit_code"] = code
                    summary["scenarios"][scenario] = row
                    failures += int(row["Failure Count"])
                summary.update(service_counts(server.base_url))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    table = summary_markdown(summary)
    (out / "summary.md").write_text(table + "\n")
    write_index(out, summary)
    sys.stdout.write(table + f"\n\nreports: {out}/index.html\n")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from service.observability.logging_setup import configure_logging

    configure_logging("INFO")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
