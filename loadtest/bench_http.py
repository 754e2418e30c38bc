"""What the HTTP framework costs per `/v1/rank` request, against a bare ASGI route, side by side.

    python -m loadtest.bench_http [--requests 1000] [--rounds 4] [--levels 1,8]
                                  [--tree NAME=DIR ...] [--out result.json]

The same rank handler is served behind:

* `app`: the REST app the server runs (`service.transports.rest.app.create_app`, with its
  middlewares, dependencies, validation, error handlers), under uvicorn configured as
  `rankserve serve` configures it (`service.server._uvicorn_config`, TCP_NODELAY, httptools);
* `bare`: a raw ASGI callable under the same uvicorn: read the body, `orjson.loads`, take or make
  the request id, the same core call, the same response dict (`rank_response_body`),
  `orjson.dumps`, send. No validation, no routing, no middleware: the floor for this server;
* `NAME` (with `--tree NAME=DIR`, repeatable): the `app` of another checkout of the project (e.g.
  the code before a change), served the same way.

**The ranking core is a stand-in** (`StubService`): the real one costs ~10 ms of model and store
work per request and would drown a difference of tenths of a millisecond. The stand-in is cheap
and deterministic and returns a response of the real shape: the first `top_n` candidates, each
with a fused score and 3 task probabilities (float32 values widened to float, as the core makes
them), the model, arm and request id. Its cost is the same behind every server.

Each server is its own process; they are driven alternately (the order rotates every round) by
a keep-alive HTTP/1.1 client (`loadtest.loadgen.HttpPool`, ~30 µs of client CPU a request) in
closed loop at each concurrency level. Reported per server and level: p50 / p99 latency over all
rounds and the server's CPU (utime + stime from /proc, all threads) per request, the median of
the per-round values, and the difference to `bare`.

The in-process part (no socket, no uvicorn) calls each ASGI app directly, and times the pieces
of request decoding and response encoding: FastAPI's body handling (stdlib `json` then pydantic
on the dict) vs pydantic on the raw bytes vs orjson alone, and the response class vs
`orjson.dumps` of the dict. It runs in a subprocess per tree, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve()
TREE = HERE.parent.parent
TASKS = ("click", "cart", "buy")
STANDARD = {"candidates": 500, "top_n": 100, "items": 1_000_000}
STANDIN_NOTE = ("ranking core replaced by a cheap deterministic stand-in returning the real response shape "
                "(top_n items x 3 task scores + ids); the real core costs ~10 ms and is the same behind every "
                "transport")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def standard_bodies(n: int = 16, seed: int = 0) -> list[bytes]:
    """`n` standard rank bodies: an integer user, 500 integer candidates out of 1M items, top_n 100."""
    rng = random.Random(seed)
    return [
        orjson.dumps({"user_id": rng.randrange(1_000_000),
                      "candidates": [rng.randrange(STANDARD["items"]) for _ in range(STANDARD["candidates"])],
                      "top_n": STANDARD["top_n"]})
        for _ in range(n)
    ]


# -- the stand-in core (server side) -----------------------------------------------------------------


def stub_core() -> Any:
    """An object with what the REST transport uses of `ServingCore` for /v1/rank."""
    import numpy as np

    from service.observability.metrics import Metrics
    from service.settings import Settings
    from service.types import RankedItem, RankRequest, RankResponse

    rng = np.random.default_rng(0)
    n = 1000
    # float32 probabilities widened to float, as the core makes them (full-length decimal forms)
    probs = [[float(v) for v in row] for row in rng.random((n, len(TASKS)), dtype=np.float32)]
    fused = [float(np.float32(sum(row))) for row in probs]

    class StubService:
        """The first `top_n` candidates with fixed scores; the item lists are memoized per candidate list
        (a few µs a request), so the transport's cost is not hidden behind building 100 response objects."""

        def __init__(self) -> None:
            self._items: dict[tuple[Any, ...], list[RankedItem]] = {}

        async def rank(self, req: RankRequest) -> RankResponse:
            ids = tuple(req.candidates[: req.top_n or 100])
            items = self._items.get(ids)
            if items is None:
                items = [RankedItem(item_id=cid, score=fused[i], task_scores=dict(zip(TASKS, probs[i], strict=True)))
                         for i, cid in enumerate(ids)]
                self._items[ids] = items
            return RankResponse(items=items, model="bench/1", arm="default", degraded=False,
                                request_id=req.request_id)

    class StubCore:
        def __init__(self) -> None:
            self.settings = Settings(host="127.0.0.1")
            self.metrics = Metrics()
            self.service = StubService()

    return StubCore()


def bare_app(core: Any) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The floor: a raw ASGI route doing only what the rank contract's happy path needs."""
    from service.transports.request_ids import request_id_from
    from service.transports.rest.schemas import rank_response_body
    from service.types import RankRequest

    rid_header = b"x-request-id"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == rid_header), None)
        rid = request_id_from(given)
        data = orjson.loads(body)
        resp = await core.service.rank(RankRequest(user_id=data["user_id"], candidates=data["candidates"],
                                                   top_n=data.get("top_n"), request_id=rid))
        out = orjson.dumps(rank_response_body(resp, rid), option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(out)).encode()), (b"content-type", b"application/json"),
            (rid_header, rid.encode())]})
        await send({"type": "http.response.body", "body": out})

    return app


def make_app(kind: str, core: Any) -> Any:
    if kind == "bare":
        return bare_app(core)
    from service.transports.rest.app import create_app

    return create_app(core=core)


async def _serve(kind: str, port: int) -> None:
    from service.server import _HttpServer, _nodelay, _uvicorn_config

    core = stub_core()
    settings = core.settings.model_copy(update={"http_port": port})
    config = _uvicorn_config(settings, make_app(kind, core))  # as `rankserve serve` configures uvicorn
    sock = _nodelay(config.bind_socket())
    await _HttpServer(config).serve(sockets=[sock])


# -- in-process: ASGI apps called directly, and the pieces of decoding and encoding --------------------


def _cpu_us_per_call(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """Median over `repeats` of the process CPU time per call (µs)."""
    per: list[float] = []
    for _ in range(repeats):
        t0 = time.process_time_ns()
        for _ in range(calls):
            fn()
        per.append((time.process_time_ns() - t0) / calls / 1000.0)
    return round(statistics.median(per), 1)


def inprocess(calls: int, repeats: int) -> dict[str, float]:
    """CPU µs per call of each ASGI app (no socket) and of the decode / encode pieces."""
    from service.transports.request_ids import new_request_id
    from service.transports.rest.errors import OrjsonResponse
    from service.transports.rest.schemas import RankRequest, rank_response_body

    core = stub_core()
    bodies = standard_bodies()
    body = bodies[0]
    loop = asyncio.new_event_loop()
    apps = {"app": make_app("app", core), "bare": make_app("bare", core)}
    apps["app"].state.core = core  # what its lifespan does

    def asgi_call(app: Any) -> Callable[[], Any]:
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        def call() -> None:
            sent.clear()
            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": "/v1/rank", "raw_path": b"/v1/rank",
                     "root_path": "", "query_string": b"", "headers": list(headers),
                     "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
            loop.run_until_complete(app(scope, receive, send))
            if sent[0]["status"] != 200:
                raise RuntimeError(f"in-process call answered {sent[0]['status']}: {sent[1]['body'][:200]!r}")

        return call

    rid = new_request_id()
    data = orjson.loads(body)
    resp = loop.run_until_complete(core.service.rank(RankRequest.model_validate(data).to_core(rid)))
    out: dict[str, float] = {}
    pieces: dict[str, Callable[[], Any]] = {
        "asgi_app": asgi_call(apps["app"]),
        "asgi_bare": asgi_call(apps["bare"]),
        "decode: json.loads + RankRequest.model_validate (FastAPI's way)":
            lambda: RankRequest.model_validate(json.loads(body)),
        "decode: RankRequest.model_validate_json(bytes)": lambda: RankRequest.model_validate_json(body),
        "decode: orjson.loads + RankRequest.model_validate": lambda: RankRequest.model_validate(orjson.loads(body)),
        "decode: orjson.loads only": lambda: orjson.loads(body),
        "encode: rank_response_body + OrjsonResponse(...)": lambda: OrjsonResponse(rank_response_body(resp, rid)),
        "encode: rank_response_body + orjson.dumps": lambda: orjson.dumps(rank_response_body(resp, rid)),
        "stand-in core call": lambda: loop.run_until_complete(
            core.service.rank(RankRequest.model_validate(data).to_core(rid))),
    }
    for fn in pieces.values():
        fn()  # warm up
    for _ in range(2):  # two interleaved passes; keep the lower (less disturbed) value
        for name, fn in pieces.items():
            v = _cpu_us_per_call(fn, calls, repeats)
            out[name] = min(out.get(name, v), v)
    loop.close()
    return out


# -- the driver ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bootstrap(tree: Path, argv: list[str]) -> list[str]:
    """A command running this file's code with `tree`'s packages (`service` etc.) first on the path."""
    code = (f"import runpy, sys; sys.path.insert(0, {str(tree)!r}); sys.argv = {[str(HERE), *argv]!r}; "
            f"runpy.run_path({str(HERE)!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


class Server:
    def __init__(self, name: str, kind: str, tree: Path) -> None:
        self.name, self.kind, self.tree = name, kind, tree
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(tree)}
        env.pop("RANKSERVE_OTEL_ENDPOINT", None)
        self.proc = subprocess.Popen(_bootstrap(tree, ["--serve", kind, "--port", str(self.port)]), cwd=tree,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not listen within {timeout} s")

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _check_same_answers(servers: list[Server], body: bytes) -> dict[str, Any]:
    """Every server answers the same body with the same JSON (request id fixed by the header)."""
    from loadtest.loadgen import HttpPool

    answers = {}
    for s in servers:
        pool = HttpPool("127.0.0.1", s.port)
        status, payload = await pool.post("/v1/rank", body, {"x-request-id": "bench-check"})
        await pool.close()
        if status != 200:
            raise RuntimeError(f"{s.name} answered {status}: {payload[:300]!r}")
        answers[s.name] = orjson.loads(payload)
    first = next(iter(answers.values()))
    same = all(a == first for a in answers.values())
    if not same:
        raise RuntimeError(f"the servers answer differently: { {k: str(v)[:200] for k, v in answers.items()} }")
    return {"identical_json": same, "items": len(first["items"]), "bytes": len(orjson.dumps(first))}


async def _drive(servers: list[Server], bodies: list[bytes], levels: list[int], rounds: int, requests: int,
                 warmup: int) -> dict[str, Any]:
    from loadtest.loadgen import HttpPool, closed_loop, latency_summary, rest_call

    pools = {s.name: HttpPool("127.0.0.1", s.port) for s in servers}
    lat: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    fails: dict[tuple[str, int], int] = {}
    for r in range(rounds):
        order = servers[r % len(servers):] + servers[: r % len(servers)]  # rotate: no server always first
        for level in levels:
            for s in order:
                call = rest_call(pools[s.name], bodies)
                await closed_loop(call, level, warmup)
                c0 = s.cpu_s()
                res = await closed_loop(call, level, requests)
                c1 = s.cpu_s()
                lat.setdefault((s.name, level), []).extend(res.latencies_ms)
                cpu.setdefault((s.name, level), []).append((c1 - c0) * 1000.0 / max(1, len(res.latencies_ms)))
                fails[(s.name, level)] = fails.get((s.name, level), 0) + res.failures
    for p in pools.values():
        await p.close()
    rows = []
    for level in levels:
        bare_cpu = statistics.median(cpu[("bare", level)])
        for s in servers:
            key = (s.name, level)
            summary = latency_summary(lat[key])
            med = statistics.median(cpu[key])
            rows.append({"server": s.name, "concurrency": level, "p50_ms": summary["p50"], "p99_ms": summary["p99"],
                         "cpu_ms_per_request": round(med, 3),
                         "cpu_ms_per_round": [round(v, 3) for v in cpu[key]],
                         "cpu_over_bare_ms": round(med - bare_cpu, 3), "requests": summary["n"],
                         "failures": fails[key]})
    return {"rows": rows}


def _inprocess_rounds(trees: dict[str, Path], calls: int, repeats: int, rounds: int) -> dict[str, dict[str, float]]:
    """`inprocess` in a subprocess per tree, trees alternating; per piece the lowest value over rounds."""
    out: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, tree in trees.items():
            proc = subprocess.run(_bootstrap(tree, ["--inprocess", "--calls", str(calls), "--repeats", str(repeats)]),
                                  cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                                  text=True, check=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            mine = out.setdefault(name, {})
            for k, v in got.items():
                mine[k] = min(mine.get(k, v), v)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"HTTP framework cost per /v1/rank request ({result['requests_per_round']} requests per server, level "
        f"and round, {result['rounds']} rounds, servers alternating; load average {result['loadavg_before']} "
        f"before, {result['loadavg_after']} after). Note: {STANDIN_NOTE}.",
        "",
        "| server | concurrency | p50 ms | p99 ms | server CPU ms / request | vs bare ms | per-round CPU ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["http"]["rows"]:
        lines.append(f"| {row['server']} | {row['concurrency']} | {row['p50_ms']} | {row['p99_ms']} | "
                     f"{row['cpu_ms_per_request']:.3f} | {row['cpu_over_bare_ms']:+.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in row['cpu_ms_per_round'])} |")
    if result.get("inprocess"):
        names = list(result["inprocess"])
        lines += ["", "In-process, no socket (CPU µs per call, lowest of the rounds):", "",
                  "| piece | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        keys = list(next(iter(result["inprocess"].values())))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(str(result["inprocess"][n].get(k, "")) for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_http", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="measured requests per server, level and round")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--levels", default="1,8")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                   help="another checkout whose REST app is served as NAME (repeatable)")
    p.add_argument("--inprocess-calls", type=int, default=300, help="0 skips the in-process part")
    p.add_argument("--out", type=Path, help="write the JSON result here too")
    # internal: the server and in-process modes of the subprocesses
    p.add_argument("--serve", choices=("app", "bare"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--inprocess", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=300, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.serve:
        asyncio.run(_serve(args.serve, args.port))
        return 0
    if args.inprocess:
        print(json.dumps(inprocess(args.calls, args.repeats)))
        return 0

    levels = [int(x) for x in args.levels.split(",")]
    others = {name: Path(path).resolve() for name, _, path in (t.partition("=") for t in args.tree)}
    specs = [("bare", "bare", TREE), ("app", "app", TREE), *((name, "app", tree) for name, tree in others.items())]
    servers = [Server(name, kind, tree) for name, kind, tree in specs]
    result: dict[str, Any] = {"note": STANDIN_NOTE, "standard_request": STANDARD, "rounds": args.rounds,
                              "requests_per_round": args.requests, "levels": levels,
                              "loadavg_before": round(os.getloadavg()[0], 2)}
    try:
        for s in servers:
            s.wait()
        bodies = standard_bodies()
        result["check"] = asyncio.run(_check_same_answers(servers, bodies[0]))
        result["http"] = asyncio.run(_drive(servers, bodies, levels, args.rounds, args.requests, args.warmup))
    finally:
        for s in servers:
            s.stop()
    result["loadavg_after"] = round(os.getloadavg()[0], 2)
    if args.inprocess_calls:
        trees = {"app": TREE} | others
        result["inprocess"] = _inprocess_rounds(trees, args.inprocess_calls, 5, 2)
    print(markdown(result))
    print()
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
