"""`rankserve bench --sections side_features`: what side features cost a served request.

The standard workload served by two `rankserve serve` processes side by side:

* `base`: the standard bundle (no side features), requests without a context;
* `side`: the same vocabularies and model sizes plus 3 item features (brand and seller
  categorical, price numeric with log1p), 2 user features (city categorical, age numeric) and 2
  context features (device categorical, hour numeric). The user table and the item catalogue
  (every item has a row) are ingested with the same users and events into a second embedded
  Valkey, and every request carries a `context` object.

The two are measured in alternating rounds (A/B, B/A, A/B, ...: machine noise hits both alike):
each round sends `requests` requests at closed-loop concurrency `concurrency` to one server,
then to the other, and records the latencies and the CPU time (utime + stime) the serving
process and its Valkey spent. Reported per variant: p50 / p95 / p99, server CPU per request over
all rounds, and the ratio side / base of the server CPU per request (the pooled ratio and the
median of the per-round ratios). The acceptance target is a ratio of at most 1.15.

With `inprocess_requests`, both bundles are also loaded into in-process `ServingCore`s and
ranked alternately with `debug`, for the per-stage split (fetch, retrieve = assembling the
scorer inputs, score, fuse, encode), which says where a difference comes from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from loadtest.bench_e2e import _grpc_stub, cpu_seconds
from loadtest.loadgen import Call, HttpPool, closed_loop, grpc_call, latency_summary, rest_call
from loadtest.serving import PreparedWorkload, ServerProcess, wait_until_ready

if TYPE_CHECKING:
    from feature_store.spec import SideFeatures
    from loadtest.bench import Workload
    from models.data.events import SideTable

TARGET_RATIO = 1.15  # the feature's acceptance criterion: server CPU per request at most 15% above
VARIANTS = ("base", "side")
TRANSPORTS = ("rest", "grpc")
DEVICES = ("ios", "android", "web", "tablet")
N_BRANDS, N_SELLERS, N_CITIES = 5_000, 50_000, 300


# ---------------------------------------------------------------------------------------------
# setup


def _names(prefix: str, n: int) -> npt.NDArray[np.object_]:
    return np.array([f"{prefix}-{k}" for k in range(n)], dtype=object)


def _skewed(rng: np.random.Generator, n_values: int, size: int) -> npt.NDArray[np.int64]:
    """Codes 0..n_values-1 with a long tail (a few frequent brands, many rare ones)."""
    return np.asarray((rng.zipf(1.2, size) - 1) % n_values, dtype=np.int64)


def side_tables(prepared: PreparedWorkload, seed: int = 0) -> tuple[SideFeatures, SideTable, SideTable]:
    """Fitted side features and the user table and item catalogue of the prepared workload's ids.

    Every ingested user and every catalogue item has a row. Encoders are fitted as training
    would, on the tables themselves (context: on a sample of requests' values): brand's 5,000
    values fit its vocabulary, seller's 50,000 overflow it (10,000 kept, the rest in 1,024 hash
    buckets), so both lookup paths of the categorical encoder are exercised.
    """
    from feature_store.spec import (
        CategoricalDecl,
        CategoricalEncoder,
        FeatureGroup,
        NumericDecl,
        NumericEncoder,
        SideFeatures,
    )
    from models.data.events import SideTable

    rng = np.random.default_rng(seed + 17)
    item_ids = np.asarray(prepared.catalogue[0], dtype=np.int64)
    user_ids = np.asarray(prepared.users, dtype=np.int64)
    n_items, n_users = item_ids.shape[0], user_ids.shape[0]
    brands, sellers, cities = _names("brand", N_BRANDS), _names("seller", N_SELLERS), _names("city", N_CITIES)
    brand, seller = _skewed(rng, N_BRANDS, n_items), _skewed(rng, N_SELLERS, n_items)
    price = np.asarray(rng.lognormal(3.0, 1.2, n_items), dtype=np.float64)
    city = _skewed(rng, N_CITIES, n_users)
    age = np.clip(rng.normal(35.0, 12.0, n_users), 16, 90)

    def categorical(decl: CategoricalDecl, names: npt.NDArray[np.object_], codes: npt.NDArray[np.int64]
                    ) -> CategoricalEncoder:
        counts = np.bincount(codes, minlength=names.shape[0])
        present = np.flatnonzero(counts)
        return CategoricalEncoder.fit_counts(decl, names[present].tolist(), counts[present].tolist())

    def numeric(decl: NumericDecl, values: npt.NDArray[np.float64]) -> NumericEncoder:
        return NumericEncoder.fit(decl, values)

    ctx_device = rng.choice(len(DEVICES), 10_000)
    side = SideFeatures(
        user=FeatureGroup((categorical(CategoricalDecl(name="city"), cities, city),),
                          (numeric(NumericDecl(name="age"), age),)),
        item=FeatureGroup(
            (categorical(CategoricalDecl(name="brand"), brands, brand),
             categorical(CategoricalDecl(name="seller", max_vocabulary=10_000, hash_buckets=1_024), sellers, seller)),
            (numeric(NumericDecl(name="price", log1p=True), price),),
        ),
        context=FeatureGroup(
            (categorical(CategoricalDecl(name="device"), np.array(DEVICES, dtype=object), ctx_device),),
            (numeric(NumericDecl(name="hour"), rng.integers(0, 24, 10_000).astype(np.float64)),),
        ),
    )
    users = SideTable(user_ids, {"city": cities[city], "age": age})
    items = SideTable(item_ids, {"brand": brands[brand], "seller": sellers[seller], "price": price})
    return side, users, items


def prepare_side_workload(root: Path, w: Workload, base: PreparedWorkload) -> PreparedWorkload:
    """The side-feature twin of `base`: same vocabularies, events and catalogue; its own bundle
    under `root` (spec = base's plus the side features, every weight of base's scorer whose shape
    agrees: retrieval costs depend on the data, so both must retrieve the same behaviours) and the
    tables to ingest with it."""
    from feature_store.schema import FeatureSchema
    from loadtest.bench import build_bundle

    side, users, items = side_tables(base, w.seed)
    spec = dataclasses.replace(base.schema.spec, name=f"{base.schema.spec.name}-side", side=side)
    schema = FeatureSchema(spec, base.schema.users, base.schema.items, base.schema.categories)
    bundle_path = build_bundle(root, w, schema, like=base.bundle_path)
    return dataclasses.replace(base, model_dir=root / "models", bundle_path=bundle_path,
                               schema=FeatureSchema.load(bundle_path / "schema"), user_table=users,
                               item_table=items)


def contexts(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Request contexts: a device and an hour of day (a few with a device outside the vocabulary)."""
    rng = np.random.default_rng(seed + 23)
    devices = [*DEVICES, "smart-tv"]
    return [{"device": devices[int(d)], "hour": int(h)}
            for d, h in zip(rng.choice(len(devices), n, p=[0.4, 0.35, 0.15, 0.08, 0.02]), rng.integers(0, 24, n),
                            strict=True)]


# ---------------------------------------------------------------------------------------------
# measurement


@dataclasses.dataclass
class _Tally:
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    cpu_s: float = 0.0
    store_cpu_s: float = 0.0
    requests: int = 0
    failures: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    round_cpu_ms: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            **latency_summary(self.latencies_ms),
            "failures": self.failures,
            "errors": self.errors[:3],
            "server_cpu_ms_per_request": round(self.cpu_s * 1000 / max(1, self.requests), 3),
            "store_cpu_ms_per_request": round(self.store_cpu_s * 1000 / max(1, self.requests), 3),
            "server_cpu_ms_per_request_by_round": [round(x, 2) for x in self.round_cpu_ms],
        }


def _store_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        return cpu_seconds([pid])
    except OSError:
        return 0.0


class _Bounded:
    """A call with a per-request timeout. After one timeout the call is broken (a cancelled
    keep-alive request leaves its connection mid-response): later calls fail at once and the
    measurement stops (`interleaved_rounds` raises)."""

    def __init__(self, call: Call, timeout_s: float) -> None:
        self.call, self.timeout_s, self.broken = call, timeout_s, False

    async def __call__(self, i: int) -> None:
        if self.broken:
            raise RuntimeError("an earlier request timed out")
        try:
            await asyncio.wait_for(self.call(i), self.timeout_s)
        except TimeoutError:
            self.broken = True
            raise


def _check(name: str, server: ServerProcess, call: Call) -> None:
    if server.proc is not None and server.proc.poll() is not None:
        raise RuntimeError(f"{name}: rankserve serve exited with {server.proc.returncode}; see {server.log_path}")
    if isinstance(call, _Bounded) and call.broken:
        raise RuntimeError(f"{name}: a request took longer than {call.timeout_s}s; see {server.log_path}")


async def interleaved_rounds(
    variants: dict[str, tuple[ServerProcess, Call, int | None]], rounds: int, requests: int, concurrency: int,
    warmup: int, deadline: float,
) -> tuple[dict[str, _Tally], list[float]]:
    """`rounds` rounds, each one closed-loop run per variant in rotating order; the tallies and the
    1-minute load average after each round. Stops early (fewer rounds) past `deadline` (monotonic)."""
    names = list(variants)
    for name in names:  # connections, pools, caches, the first ONNX runs
        server, call, _ = variants[name]
        await closed_loop(call, concurrency, max(warmup, 2 * concurrency))
        _check(name, server, call)
    tallies = {name: _Tally() for name in names}
    loads: list[float] = []
    for r in range(rounds):
        if r and time.monotonic() > deadline:
            break
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            server, call, store_pid = variants[name]
            pids = server.pids()
            c0, s0 = cpu_seconds(pids), _store_cpu(store_pid)
            result = await closed_loop(call, concurrency, requests)
            _check(name, server, call)
            cpu, store = cpu_seconds(pids) - c0, _store_cpu(store_pid) - s0
            t = tallies[name]
            t.latencies_ms += result.latencies_ms
            t.cpu_s += cpu
            t.store_cpu_s += store
            t.requests += requests
            t.failures += result.failures
            t.errors += result.errors
            t.round_cpu_ms.append(cpu * 1000 / requests)
        loads.append(round(os.getloadavg()[0], 2))
    return tallies, loads


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(tallies: dict[str, _Tally]) -> dict[str, Any]:
    """Per-variant summaries and the side / base ratios."""
    base, side = tallies["base"], tallies["side"]
    out: dict[str, Any] = {name: t.summary() for name, t in tallies.items()}
    cpu_ratio = _ratio(out["side"]["server_cpu_ms_per_request"], out["base"]["server_cpu_ms_per_request"])
    per_round = [s / b for s, b in zip(side.round_cpu_ms, base.round_cpu_ms, strict=False) if b > 0]
    out["ratio"] = {
        "server_cpu": cpu_ratio,
        "server_cpu_median_of_rounds": round(float(np.median(per_round)), 3) if per_round else None,
        "server_cpu_rounds": [round(x, 3) for x in per_round],
        "p50": _ratio(out["side"]["p50"], out["base"]["p50"]),
        "p99": _ratio(out["side"]["p99"], out["base"]["p99"]),
        "server_plus_store_cpu": _ratio(
            out["side"]["server_cpu_ms_per_request"] + out["side"]["store_cpu_ms_per_request"],
            out["base"]["server_cpu_ms_per_request"] + out["base"]["store_cpu_ms_per_request"]),
    }
    out["target_ratio"] = TARGET_RATIO
    out["within_target"] = cpu_ratio is not None and cpu_ratio <= TARGET_RATIO
    return out


async def inprocess_stages(settings: dict[str, Any], bodies: dict[str, list[dict[str, Any]]], requests: int,
                           warmup: int, top_n: int) -> dict[str, Any]:
    """Both bundles in in-process cores, ranked alternately with `debug`: p50 of each stage's wall
    time (ms; on a loaded machine the stages wait for the CPU too) and the process CPU per request
    (`cpu`, mean ms: the event loop's and the assembling thread's)."""
    from service.lifecycle import ServingCore
    from service.types import RankRequest

    cores = {name: await ServingCore.create(s) for name, s in settings.items()}
    try:
        for core in cores.values():
            await core.start()
            await wait_until_ready(core)
        stages: dict[str, dict[str, list[float]]] = {name: {} for name in cores}
        cpu = {name: 0.0 for name in cores}
        names = list(cores)
        for i in range(warmup + requests):
            for name in names[i % 2:] + names[: i % 2]:
                b = bodies[name][i % len(bodies[name])]
                c0 = time.process_time()
                resp = await cores[name].service.rank(RankRequest(
                    b["user_id"], b["candidates"], top_n=top_n, request_time=b["request_time"],
                    context=b.get("context"), debug=True))
                if i >= warmup:
                    cpu[name] += time.process_time() - c0
                if resp.degraded:
                    raise RuntimeError(f"{name}: in-process request was degraded: the store did not answer")
                if i >= warmup:
                    for stage, ms in resp.timings_ms.items():
                        stages[name].setdefault(stage, []).append(ms)
        out: dict[str, Any] = {name: {s: round(float(np.median(v)), 3) for s, v in st.items()}
                               | {"cpu": round(cpu[name] * 1000 / requests, 3)} for name, st in stages.items()}
        out["ratio_p50"] = {s: _ratio(out["side"].get(s), out["base"].get(s)) for s in out["base"]}
        return out
    finally:
        for core in cores.values():
            await core.aclose()


def section_side_features(
    root: Path, w: Workload, base: PreparedWorkload, base_url: str, reqs: Sequence[tuple[int, list[int]]],
    env: dict[str, str], *, rounds: int = 6, requests: int = 100, concurrency: int = 1,
    transports: Sequence[str] = ("rest",), inprocess_requests: int = 0, scorer_threads: int = 1,
    base_store_pid: int | None = None, budget_s: float = 1200.0, request_timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Base vs side-feature bundle, interleaved (see the module doc); `root`: a fresh directory.

    `base_url` is the store the base workload was ingested into; the side variant gets its own
    embedded Valkey. Both servers (and that Valkey) are stopped on return, whatever happens.
    `budget_s` bounds the measured rounds (split among the transports; each runs one round at
    least); a request slower than
    `request_timeout_s` or a server that exits ends the section with an error. SIGTERM is turned
    into SystemExit meanwhile, so the servers (own process groups) are stopped then too.
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _section(root, w, base, base_url, reqs, env, rounds, requests, concurrency, transports,
                        inprocess_requests, scorer_threads, base_store_pid, budget_s, request_timeout_s)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _section(
    root: Path, w: Workload, base: PreparedWorkload, base_url: str, reqs: Sequence[tuple[int, list[int]]],
    env: dict[str, str], rounds: int, requests: int, concurrency: int, transports: Sequence[str],
    inprocess_requests: int, scorer_threads: int, base_store_pid: int | None, budget_s: float,
    request_timeout_s: float,
) -> dict[str, Any]:
    from feature_store.embedded import EmbeddedValkey
    from feature_store.store import EmbeddedConfig, FeatureStoreConfig
    from loadtest.serving import ingest
    from service.settings import Settings

    if min(rounds, requests, concurrency) < 1:
        raise ValueError(f"rounds, requests and concurrency must be >= 1, got {rounds}, {requests}, {concurrency}")
    unknown = set(transports) - set(TRANSPORTS)
    if unknown or not transports:
        raise ValueError(f"unknown transports {sorted(unknown)}; use {', '.join(TRANSPORTS)}")
    t0 = time.perf_counter()
    side = prepare_side_workload(root / "side", w, base)
    out: dict[str, Any] = {
        "side_features": {
            "item": {"categorical": ["brand", "seller"], "numeric": ["price"]},
            "user": {"categorical": ["city"], "numeric": ["age"]},
            "context": {"categorical": ["device"], "numeric": ["hour"]},
            "scorer_inputs_added": [n for n in side.schema.spec.scorer_inputs if n.startswith("side_")],
        },
        "rounds_requested": rounds, "requests_per_round": requests, "concurrency": concurrency,
        "setup_s": {"side_bundle": round(time.perf_counter() - t0, 1)},
    }
    ctxs = contexts(len(reqs), w.seed)
    bodies = {
        "base": [{"user_id": u, "candidates": c, "top_n": w.top_n, "request_time": w.request_time} for u, c in reqs],
        "side": [{"user_id": u, "candidates": c, "top_n": w.top_n, "request_time": w.request_time, "context": x}
                 for (u, c), x in zip(reqs, ctxs, strict=True)],
    }
    with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as valkey:
        out["setup_s"]["side_ingest"] = round(ingest(valkey.url, side), 1)
        urls = {"base": base_url, "side": valkey.url}
        store_pids = {"base": base_store_pid, "side": valkey.pid}
        prepared = {"base": base, "side": side}
        if inprocess_requests:
            settings = {name: Settings(model_dir=prepared[name].model_dir,
                                       feature_store=FeatureStoreConfig(url=urls[name]),
                                       scorer_threads=scorer_threads, poll_interval_s=0,
                                       max_candidates=max(1000, w.candidates)) for name in VARIANTS}
            out["in_process_stages_p50_ms"] = asyncio.run(
                inprocess_stages(settings, bodies, inprocess_requests, w.warmup, w.top_n))
        log_dir = root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with ServerProcess(base.model_dir, base_url, env=env, log_path=log_dir / "base.log") as a, \
                ServerProcess(side.model_dir, valkey.url, env=env, log_path=log_dir / "side.log") as b:
            servers = {"base": a, "side": b}

            async def run(transport: str) -> tuple[dict[str, _Tally], list[float]]:
                pools: list[HttpPool] = []
                channels: list[Any] = []
                variants: dict[str, tuple[ServerProcess, Call, int | None]] = {}
                try:
                    for name in VARIANTS:
                        server = servers[name]
                        if transport == "rest":
                            pool = HttpPool("127.0.0.1", server.http_port)
                            pools.append(pool)
                            call: Call = rest_call(pool, [orjson.dumps(body) for body in bodies[name]])
                        else:
                            channel, stub, pb2 = _grpc_stub(server.grpc_target)
                            channels.append(channel)
                            call = grpc_call(stub, [pb2.RankRequest(**body) for body in bodies[name]])
                        variants[name] = (server, _Bounded(call, request_timeout_s), store_pids[name])
                    deadline = time.monotonic() + budget_s / len(transports)
                    return await interleaved_rounds(variants, rounds, requests, concurrency, w.warmup, deadline)
                finally:
                    for pool in pools:
                        await pool.close()
                    for channel in channels:
                        await channel.close()

            for transport in transports:
                tallies, loads = asyncio.run(run(transport))
                out[transport] = compare(tallies) | {"rounds": len(loads), "loadavg_1m_by_round": loads}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markdown_rows(report: dict[str, Any]) -> list[str]:
    """Rows of `loadtest.bench.markdown`'s table."""
    lines = []
    for transport in TRANSPORTS:
        r = report.get(transport)
        if not r:
            continue
        for name in VARIANTS:
            m = r[name]
            lines.append(f"| side features: {transport} {name} c={report['concurrency']} | {m['p50']} | {m['p99']} | "
                         f"server CPU {m['server_cpu_ms_per_request']} ms/req, store CPU "
                         f"{m['store_cpu_ms_per_request']} ms/req, n {m['n']}, {m['failures']} failures |")
        q = r["ratio"]
        verdict = "within" if r["within_target"] else "ABOVE"
        lines.append(f"| side features: {transport} side / base | {q['p50']}x | {q['p99']}x | server CPU "
                     f"{q['server_cpu']}x (median of {r['rounds']} rounds {q['server_cpu_median_of_rounds']}x), "
                     f"{verdict} the {r['target_ratio']}x target; load {min(r['loadavg_1m_by_round'])}-"
                     f"{max(r['loadavg_1m_by_round'])} |")
    st = report.get("in_process_stages_p50_ms")
    if st:
        parts = ", ".join(f"{s} {st['base'][s]} -> {st['side'].get(s)}" for s in st["base"])
        lines.append(f"| side features: in-process stages p50 ms (base -> side; cpu: mean CPU) | | | {parts} |")
    return lines
