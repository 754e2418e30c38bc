"""Locust scenarios: REST (`RestUser`) and gRPC (`GrpcUser`) with recsys-shaped traffic.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 --run-time 60s \\
        --host http://127.0.0.1:8000 --rs-grpc-target 127.0.0.1:50051 \\
        --rs-population population.json --rs-max-requests 5000 \\
        --csv reports/run --html reports/run.html RestUser GrpcUser

`loadtest/run.py` (`make loadtest`) builds the standard workload, starts the service and runs
this file; the options below can also be given as environment variables (`RS_POPULATION`, ...).
Traffic (`loadtest/traffic.py`): Zipf-skewed users from the population file, 100-1,000
candidates per request. Arms: with an experiments file the service itself splits users into
arms by a sticky hash, so Zipf-skewed users already give mixed arms; `--rs-arms` with
`--rs-arm-header x-rankserve-arm` and `--rs-admin-token` forces weighted arms per request instead.

A run is bounded by Locust's `--run-time` and by `--rs-max-requests` (whichever comes first);
the exit code is non-zero when any request failed (Locust's `--exit-code-on-error`).
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from types import ModuleType
from typing import Any

import orjson
from locust import FastHttpUser, User, events, task
from locust.env import Environment

from loadtest.traffic import TrafficConfig, TrafficModel, parse_arms, read_population

log = logging.getLogger("loadtest.locust")

RANK_PATH = "/v1/rank"
_JSON = {"content-type": "application/json"}


def _add_options(parser: Any) -> None:
    group = parser.add_argument_group("rankserve traffic")
    group.add_argument("--rs-population", env_var="RS_POPULATION", default="",
                       help="JSON with the user ids (hottest first) and item ids (loadtest.traffic.write_population)")
    group.add_argument("--rs-grpc-target", env_var="RS_GRPC_TARGET", default="127.0.0.1:50051",
                       help="host:port of the gRPC server (GrpcUser)")
    group.add_argument("--rs-min-candidates", env_var="RS_MIN_CANDIDATES", type=int, default=100)
    group.add_argument("--rs-max-candidates", env_var="RS_MAX_CANDIDATES", type=int, default=1000)
    group.add_argument("--rs-top-n", env_var="RS_TOP_N", type=int, default=100)
    group.add_argument("--rs-user-zipf", env_var="RS_USER_ZIPF", type=float, default=1.1,
                       help="Zipf exponent of user popularity (0: uniform)")
    group.add_argument("--rs-arms", env_var="RS_ARMS", default="",
                       help="weighted arms, e.g. control:0.9,treatment:0.1 (needs --rs-arm-header)")
    group.add_argument("--rs-arm-header", env_var="RS_ARM_HEADER", default="",
                       help="HTTP header / gRPC metadata key that forces an arm (the service's is x-rankserve-arm); "
                            "empty: arms are not sent and the service assigns them by user hash")
    group.add_argument("--rs-admin-token", env_var="RS_ADMIN_TOKEN", default="",
                       help="bearer token sent with forced arms (the service allows the override to admins only)")
    group.add_argument("--rs-request-time", env_var="RS_REQUEST_TIME", type=int, default=0,
                       help="fixed request_time (unix s) so the same history is used on every run; 0: server's now")
    group.add_argument("--rs-max-requests", env_var="RS_MAX_REQUESTS", type=int, default=0,
                       help="stop after this many requests (0: only --run-time bounds the run)")
    group.add_argument("--rs-timeout", env_var="RS_TIMEOUT", type=float, default=10.0, help="per-request timeout (s)")
    group.add_argument("--rs-think-ms", env_var="RS_THINK_MS", type=float, default=0.0,
                       help="mean pause between a user's requests (0: closed loop, back to back)")


_requests_seen = 0


def _count_requests(**_kwargs: Any) -> None:
    """Stop the run once --rs-max-requests requests have completed (successes and failures)."""
    global _requests_seen
    _requests_seen += 1
    env = _environment
    if env is None or env.parsed_options is None or env.runner is None:
        return
    limit = int(env.parsed_options.rs_max_requests)
    if limit and _requests_seen == limit:
        log.info("request bound reached (%d); stopping", limit)
        import gevent

        gevent.spawn(env.runner.quit)


_environment: Environment | None = None


def _on_init(environment: Environment, **_kwargs: Any) -> None:
    global _environment
    _environment = environment


def _flush_csv(environment: Environment, **_kwargs: Any) -> None:
    """Let Locust's CSV writer take one more snapshot before it is closed.

    The writer rewrites the CSV files every CSV_STATS_INTERVAL_SEC (1 s) and does not write again
    at shutdown, so without this pause the files miss up to the last second of the run (all of a
    short one).
    """
    import gevent
    from locust.stats import CSV_STATS_INTERVAL_SEC

    if environment.parsed_options is not None and environment.parsed_options.csv_prefix:
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


# plain calls, not decorators: Locust's decorators are untyped
events.init_command_line_parser.add_listener(_add_options)  # type: ignore[no-untyped-call]
events.request.add_listener(_count_requests)  # type: ignore[no-untyped-call]
events.init.add_listener(_on_init)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_flush_csv)  # type: ignore[no-untyped-call]


def _traffic(env: Environment, seed: int) -> TrafficModel:
    opts = env.parsed_options
    if opts is None or not opts.rs_population:
        raise RuntimeError("--rs-population (RS_POPULATION) is required: a JSON of user and item ids")
    users, items = read_population(opts.rs_population)
    arms = parse_arms(opts.rs_arms) if opts.rs_arm_header else []  # the hook: arms only with a header
    return TrafficModel(TrafficConfig(
        users=users, items=items, user_zipf=opts.rs_user_zipf, min_candidates=opts.rs_min_candidates,
        max_candidates=opts.rs_max_candidates, top_n=opts.rs_top_n, arms=arms,
        request_time=opts.rs_request_time or None, seed=seed,
    ))


def _think_s(env: Environment) -> float:
    opts = env.parsed_options
    return float(opts.rs_think_ms) / 1000.0 if opts is not None else 0.0


class _Thinking:
    """wait_time: none (closed loop) or uniform in [0.5, 1.5] x --rs-think-ms."""

    environment: Environment
    _rng = random.Random(0)

    def wait_time(self) -> float:
        think = _think_s(self.environment)
        return self._rng.uniform(0.5 * think, 1.5 * think) if think else 0.0


_user_seq = 0


def _next_seed() -> int:
    """Distinct, reproducible RNG streams per simulated user."""
    global _user_seq
    _user_seq += 1
    return 1000 + _user_seq


class RestUser(_Thinking, FastHttpUser):
    """POST /v1/rank with geventhttpclient (FastHttpUser: far less client CPU than requests)."""

    def on_start(self) -> None:
        self.traffic = _traffic(self.environment, _next_seed())
        opts = self.environment.parsed_options
        self.arm_header = opts.rs_arm_header if opts is not None else ""
        self.auth = f"Bearer {opts.rs_admin_token}" if opts is not None and opts.rs_admin_token else ""
        self.timeout = float(opts.rs_timeout) if opts is not None else 10.0

    @task
    def rank(self) -> None:
        call = self.traffic.next_call()
        headers = dict(_JSON)
        if self.arm_header and call.arm:
            headers[self.arm_header] = call.arm
            if self.auth:
                headers["authorization"] = self.auth
        with self.client.post(RANK_PATH, data=orjson.dumps(call.json_body()).decode(), headers=headers,
                              name=RANK_PATH, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                body = orjson.loads(resp.content or b"")
            except orjson.JSONDecodeError:
                resp.failure("response is not JSON")
                return
            expected = min(call.top_n, len(call.candidates))
            if len(body.get("items", ())) != expected:
                resp.failure(f"expected {expected} items, got {len(body.get('items', ()))}")
            elif body.get("degraded"):
                resp.failure("degraded response (feature store unavailable)")


def _grpc_modules() -> tuple[ModuleType, ModuleType, ModuleType]:
    """grpc (made gevent-cooperative before any channel exists) and the generated stubs."""
    import grpc
    from grpc.experimental import gevent as grpc_gevent

    grpc_gevent.init_gevent()  # without it a blocking call would stall every greenlet of the process
    try:
        pb2 = importlib.import_module("service.transports.grpc.proto.ranker_pb2")
        pb2_grpc = importlib.import_module("service.transports.grpc.proto.ranker_pb2_grpc")
    except ImportError:  # a fresh checkout: generate the stubs as the server does
        from service.transports.grpc.proto import codegen

        codegen.generate()
        importlib.invalidate_caches()
        pb2 = importlib.import_module("service.transports.grpc.proto.ranker_pb2")
        pb2_grpc = importlib.import_module("service.transports.grpc.proto.ranker_pb2_grpc")
    return grpc, pb2, pb2_grpc


class GrpcUser(_Thinking, User):
    """rankserve.v1.Ranker/Rank over one channel per simulated user; reported as request type "grpc"."""

    def on_start(self) -> None:
        self._grpc, self._pb2, pb2_grpc = _grpc_modules()
        opts = self.environment.parsed_options
        self.traffic = _traffic(self.environment, _next_seed())
        self.arm_key = (opts.rs_arm_header if opts is not None else "").lower()  # gRPC metadata keys are lowercase
        self.auth = f"Bearer {opts.rs_admin_token}" if opts is not None and opts.rs_admin_token else ""
        self.timeout = float(opts.rs_timeout) if opts is not None else 10.0
        self.channel = self._grpc.insecure_channel(opts.rs_grpc_target if opts is not None else "127.0.0.1:50051")
        self.stub = pb2_grpc.RankerStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def rank(self) -> None:
        call = self.traffic.next_call()
        msg = self._pb2.RankRequest(user_id=call.user_id, candidates=call.candidates, top_n=call.top_n)
        if call.request_time is not None:
            msg.request_time = call.request_time
        metadata: list[tuple[str, str]] | None = None
        if self.arm_key and call.arm:
            metadata = [(self.arm_key, call.arm)] + ([("authorization", self.auth)] if self.auth else [])
        exc: Exception | None = None
        length = 0
        t0 = time.perf_counter()
        try:
            resp = self.stub.Rank(msg, timeout=self.timeout, metadata=metadata)
            length = resp.ByteSize()
            expected = min(call.top_n, len(call.candidates))
            if len(resp.items) != expected:
                exc = RuntimeError(f"expected {expected} items, got {len(resp.items)}")
            elif resp.degraded:
                exc = RuntimeError("degraded response (feature store unavailable)")
        except self._grpc.RpcError as err:
            exc = RuntimeError(f"{err.code().name}: {err.details()}")
        self.environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type="grpc", name="Rank", response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=length, exception=exc, context={},
        )
