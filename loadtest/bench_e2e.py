"""End-to-end benchmark sections against `rankserve serve` processes on loopback.

* `section_concurrency`: REST and gRPC, closed loop at concurrency 1, 8, 32: p50 / p95 / p99,
  throughput, and the server's CPU time per request (utime + stime of its processes; on a shared
  machine the steadiest measure of the work a request costs);
* `section_throughput`: open-loop Poisson load stepped up until p99 passes the objective (50 ms):
  the highest offered rate that kept p99 within it;
* `section_memory`: RSS / PSS / USS of each worker with one and with two workers
  (`/proc/<pid>/smaps_rollup`), after every worker has served requests: what a second worker adds.

The load generator (`loadtest.loadgen`) runs in this process on the same cores as the server.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.loadgen import HttpPool, LoadResult, closed_loop, grpc_call, open_loop, rest_call
from loadtest.serving import ServerProcess, memory_rollup

# The serving environment the benchmark uses unless told otherwise (docs/PERFORMANCE.md): ONNX
# Runtime on one intra-op thread (a request's scoring does not wait on a second thread, and
# concurrent requests or a second worker use the other core), and OpenMP pools (numba's, faiss's)
# that sleep instead of spinning after a parallel region.
TUNED_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "RANKSERVE_SCORER_THREADS": "1"}


def stat_cpu_seconds(stat: Path) -> float:
    """utime + stime (seconds) from a `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (seconds)."""
    return sum(stat_cpu_seconds(Path(f"/proc/{pid}/stat")) for pid in pids)


def _grpc_stub(target: str) -> tuple[Any, Any, Any]:
    import grpc

    from service.transports.grpc.server import load_stubs

    pb2, pb2_grpc = load_stubs()
    channel = grpc.aio.insecure_channel(target)
    return channel, pb2_grpc.RankerStub(channel), pb2


def _messages(pb2: Any, reqs: Sequence[tuple[int, list[int]]], top_n: int, request_ts: int) -> list[Any]:
    return [pb2.RankRequest(user_id=u, candidates=c, top_n=top_n, request_time=request_ts) for u, c in reqs]


async def _measure(server: ServerProcess, call: Any, concurrency: int, requests: int) -> dict[str, Any]:
    await closed_loop(call, concurrency, 2 * concurrency)  # connections, pools, caches
    pids = server.pids()
    c0 = cpu_seconds(pids)
    result: LoadResult = await closed_loop(call, concurrency, requests)
    summary = result.summary()
    summary["server_cpu_ms_per_request"] = round((cpu_seconds(pids) - c0) * 1000 / max(1, requests), 2)
    summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return summary


def section_concurrency(server: ServerProcess, bodies: Sequence[bytes], reqs: Sequence[tuple[int, list[int]]],
                        top_n: int, request_ts: int, levels: Sequence[int], requests: int) -> dict[str, Any]:
    """REST and gRPC at each concurrency level (the two alternate, level by level)."""

    async def run() -> dict[str, Any]:
        pool = HttpPool("127.0.0.1", server.http_port)
        channel, stub, pb2 = _grpc_stub(server.grpc_target)
        rest = rest_call(pool, bodies)
        grpc_ = grpc_call(stub, _messages(pb2, reqs, top_n, request_ts))
        out: dict[str, Any] = {"rest": {}, "grpc": {}}
        try:
            for c in levels:
                n = max(requests, 4 * c)
                out["rest"][str(c)] = await _measure(server, rest, c, n)
                out["grpc"][str(c)] = await _measure(server, grpc_, c, n)
        finally:
            await pool.close()
            await channel.close()
        return out

    return asyncio.run(run())


def section_throughput(server: ServerProcess, bodies: Sequence[bytes], slo_ms: float = 50.0, start_rps: float = 4.0,
                       factor: float = 1.25, step_s: float = 15.0, max_steps: int = 20) -> dict[str, Any]:
    """Step the offered REST load (Poisson) up by `factor` until p99 exceeds `slo_ms` (or requests fail)."""

    async def run() -> dict[str, Any]:
        pool = HttpPool("127.0.0.1", server.http_port)
        call = rest_call(pool, bodies)
        steps: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        rate = start_rps
        try:
            await closed_loop(call, 2, 10)
            for _ in range(max_steps):
                pids = server.pids()
                c0 = cpu_seconds(pids)
                summary = (await open_loop(call, rate, step_s)).summary()
                summary["offered_rps"] = round(rate, 2)
                summary["server_cpu_share"] = round((cpu_seconds(pids) - c0) / step_s, 2)
                summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
                steps.append(summary)
                ok = summary["p99"] is not None and summary["p99"] <= slo_ms and not summary["failures"] \
                    and not summary["dropped"]
                if not ok:
                    break
                best = summary
                rate *= factor
        finally:
            await pool.close()
        return {
            "slo_p99_ms": slo_ms,
            "max_rps_within_slo": best["throughput_rps"] if best else 0.0,
            "at_offered_rps": best["offered_rps"] if best else None,
            "steps": steps,
        }

    return asyncio.run(run())


def section_memory(model_dir: Path, redis_url: str, bodies: Sequence[bytes], env: dict[str, str],
                   log_dir: Path | None = None, requests: int = 200) -> dict[str, Any]:
    """Per-worker RSS / PSS / USS (MB) with one and with two workers, after serving requests."""
    out: dict[str, Any] = {}
    for workers in (1, 2):
        log_path = log_dir / f"memory-{workers}w.log" if log_dir else None
        with ServerProcess(model_dir, redis_url, env=env, workers=workers, log_path=log_path) as server:

            async def load(port: int = server.http_port) -> None:
                pool = HttpPool("127.0.0.1", port)
                # many connections: the kernel spreads them over the workers' shared accept queue
                await closed_loop(rest_call(pool, bodies), 16, requests)
                await pool.close()

            asyncio.run(load())
            per = [{k.replace("_kb", "_mb"): round(v / 1024, 1) for k, v in memory_rollup(pid).items()}
                   for pid in server.pids()]
            out[f"{workers}_workers"] = {
                "per_worker_mb": per,
                "total_pss_mb": round(sum(p["pss_mb"] for p in per), 1),
                "total_rss_mb": round(sum(p["rss_mb"] for p in per), 1),
            }
    one, two = out["1_workers"], out["2_workers"]
    out["second_worker_adds_pss_mb"] = round(two["total_pss_mb"] - one["total_pss_mb"], 1)
    # conservative: the larger private set of the two (the kernel may have sent one of them fewer requests)
    out["worker_uss_mb"] = round(max(p["uss_mb"] for p in two["per_worker_mb"]), 1)
    out["note"] = ("USS is a worker's private memory: what one more worker adds, since the memory-mapped tables and "
                   "the libraries are shared pages. The PSS delta also moves a share of pages that other processes "
                   "(the benchmark itself maps the same bundle) already held, so it overstates the addition")
    return out
