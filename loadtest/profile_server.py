"""Where a serving process spends its CPU under load: py-spy on `rankserve serve`, stacks bucketed.

    python -m loadtest.profile_server [--concurrency 8] [--seconds 20] [--out profile.txt] [--no-native]

Builds the standard workload (as `rankserve bench` does), starts one server with the tuned
environment, drives closed-loop REST load, and records the server with `py-spy record --native
--format raw` (py-spy must be installed: `pip install py-spy`). Samples in waits (epoll, locks,
condition variables) are dropped; the rest are assigned to the first matching bucket (ONNX Runtime
scoring, retrieval kernels, assembly, fetch, HTTP/JSON, ...) and printed as shares of busy samples.
With RANKSERVE_SCORER_THREADS=1 ONNX Runtime runs on the calling thread, so py-spy sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# native frames of a waiting thread, and with --no-native the Python frame that waits in them
IDLE = ("epoll_wait", "EpollSelector.select", "PyThread_acquire_lock_timed", "pthread_cond_wait",
        "pthread_cond_timedwait", "_queue_SimpleQueue_get", "Condition.wait", "select_epoll_poll",
        "sem_timedwait", "futex", "Queue.get", "nanosleep", "clock_nanosleep", "do_futex_wait", "__GI___poll",
        "accept4")
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("score (ONNX Runtime)", ("onnxruntime", "OnnxScorer.predict")),
    # before retrieval: the history's distinct rows are found with a kernel retrieval uses too
    ("assemble: history rows and table gathers", ("_history_rows",)),
    ("retrieve: exact kernel and distinct keys", ("topk_ip", "unique_rows", "expand_topk", "group_members",
                                                  "pack_keys", "ExactRetriever", "DistinctKeys", "grouped.py",
                                                  "search_distinct")),
    ("assemble: cross features", ("cross_features",)),
    ("assemble: target-attention pooling", ("_attention_pool",)),
    ("assemble: history rows and table gathers", ("scorer_inputs", "assemble.py")),
    ("fetch and decode (redis)", ("redis", "feature_store", "hiredis")),
    # before HTTP: the core's own code on the event loop runs inside the FastAPI endpoint's frames
    ("core: validate, fuse, top-N, response", ("service/core.py", "scoring.py", "experiments.py", "types.py")),
    ("HTTP and JSON (uvicorn, FastAPI, pydantic, orjson)", ("uvicorn", "starlette", "fastapi", "pydantic",
                                                            "httptools", "orjson", "service/transports/rest")),
    ("gRPC", ("grpc",)),
    ("asyncio event loop", ("asyncio", "base_events", "events.py")),
]


def summarize(raw: Path) -> dict[str, float]:
    """Shares (%) of busy samples per bucket from a py-spy raw (collapsed stacks) file."""
    busy = 0
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not n_text.isdigit():
            continue
        frames = stack.split(";")
        if any(x in f for f in frames[-3:] for x in IDLE):
            continue
        n = int(n_text)
        busy += n
        name = next((b for b, keys in BUCKETS if any(k in f for f in frames for k in keys)), "other")
        counts[name] += n
    return {name: round(100.0 * n / max(busy, 1), 1) for name, n in counts.most_common()} | {"busy_samples": busy}


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`, from /proc."""
    from loadtest.bench_e2e import stat_cpu_seconds

    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            out[int(tid)] = stat_cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat"))
    return out


def per_thread_ms(before: dict[int, float], after: dict[int, float], pid: int, requests: int) -> dict[str, float]:
    """CPU ms per request: the event-loop (main) thread, which ranks; the busiest other thread (the
    exact kernel's second OpenMP thread, or micro-batching's pool); the rest."""
    spent = {tid: (after[tid] - before.get(tid, 0.0)) * 1000 / requests for tid in after}
    loop_ms = spent.pop(pid, 0.0)
    busiest = max(spent.values(), default=0.0)
    return {"event-loop thread": round(loop_ms, 2), "busiest other thread": round(busiest, 2),
            "other threads": round(sum(spent.values()) - busiest, 2)}


def main(argv: list[str] | None = None) -> int:
    from feature_store.embedded import EmbeddedValkey
    from feature_store.store import EmbeddedConfig
    from loadtest.bench import Workload, candidate_sets
    from loadtest.bench_e2e import TUNED_ENV
    from loadtest.loadgen import HttpPool, closed_loop, rest_call
    from loadtest.serving import ServerProcess, ingest, prepare_workload

    p = argparse.ArgumentParser(prog="python -m loadtest.profile_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("profile.txt"), help="py-spy raw output")
    p.add_argument("--thread-requests", type=int, default=500,
                   help="requests of the per-thread CPU phase after the profile (0: none)")
    p.add_argument("--no-native", action="store_true",
                   help="Python frames only: py-spy then samples the ranking's kernels reliably (with native "
                        "frames it misses most of that thread's samples while numba or ONNX Runtime run)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="serve a bundle whose ONNX scorer is quantized (`rankserve export --quantize`)")
    args = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    import orjson

    root = Path(tempfile.mkdtemp(prefix="rankserve-profile-"))
    threads: dict[str, float] = {}
    try:
        w = Workload(users=args.users)
        prepared = prepare_workload(root, w, "auto", quantize=args.quantize)
        request_ts = int(prepared.events.timestamp.max()) + 3600
        bodies = [orjson.dumps({"user_id": u, "candidates": c, "top_n": 100, "request_time": request_ts})
                  for u, c in candidate_sets(w, prepared.events, 64)]
        with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
            ingest(valkey.url, prepared)
            with ServerProcess(prepared.model_dir, valkey.url, env=dict(TUNED_ENV),
                               log_path=root / "server.log") as server:

                async def drive() -> None:
                    pool = HttpPool("127.0.0.1", server.http_port)
                    call = rest_call(pool, bodies)
                    await closed_loop(call, args.concurrency, 4 * args.concurrency)
                    spy = await asyncio.create_subprocess_exec(
                        py_spy, "record", "-p", str(server.pids()[0]), "-o", str(args.out), "-d", str(args.seconds),
                        # --nonblocking: a paused server lets fetches time out (degraded answers, new
                        # connections) that an unprofiled one never sees; --threads names each stack's thread
                        "-r", str(args.rate), "-f", "raw", "--threads", "--nonblocking",
                        *(() if args.no_native else ("--native",)),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    load = asyncio.create_task(closed_loop(call, args.concurrency, 1_000_000))
                    await spy.wait()
                    load.cancel()
                    if args.thread_requests:  # without py-spy attached: its sampling costs the server CPU
                        pid = server.pids()[0]
                        before = thread_cpu_seconds(pid)
                        await closed_loop(call, args.concurrency, args.thread_requests)
                        threads.update(per_thread_ms(before, thread_cpu_seconds(pid), pid, args.thread_requests))
                    await pool.close()

                asyncio.run(drive())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    shares = summarize(args.out)
    sys.stdout.write(f"py-spy raw stacks: {args.out}\n")
    for name, share in shares.items():
        sys.stdout.write(f"{share:>8} {name}\n" if name != "busy_samples" else f"busy samples: {share}\n")
    if threads:
        sys.stdout.write(f"server CPU ms per request at concurrency {args.concurrency}, per thread "
                         f"({args.thread_requests} requests): "
                         + ", ".join(f"{name} {ms}" for name, ms in threads.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
