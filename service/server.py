"""`rankserve serve`: REST (uvicorn) and gRPC (grpcio aio) in one process, on one event loop.

Both transports share one `ServingCore` (store, registry, ranking service). A single process
starts listening before the model is loaded, so `/livez` answers during a long load while
`/readyz` and gRPC health stay NOT ready until the model is loaded and warmed up. A worker of
several (below) takes connections only once its first load was tried: its siblings may already
report the pod ready, and it would answer its share of the traffic with 503.

SIGTERM / SIGINT: readiness turns false, both transports stop accepting at once, in-flight
requests get `drain_timeout_s` to finish, then the core closes (poller, micro-batching pool, store) and the
process exits 0.

Workers (`--workers N`, N > 1): a small supervisor reserves the HTTP port and starts N worker
processes (spawned, not forked: grpcio and thread pools do not survive fork), each running this
same REST + gRPC server with its own core. Every worker binds both ports with SO_REUSEPORT once
its first model load was tried, and the kernel spreads new connections over the workers by their
addresses. A worker ranks on its event loop, one request after the other (service/core.py), so
a worker carries its connections on one core: with one shared accept queue the first worker to
wake took a whole burst of connections (38 of 40 in tests/e2e/test_workers.py) while the other
idled. A per-port lock file keeps a second supervisor off the port, which SO_REUSEPORT would let
it share. The parent holds no model: it would cost a core's memory and CPU and serve only one
transport. Bundle tables are memory-mapped, so the workers share one copy in the page cache. If
a worker dies, the supervisor stops the others and exits 1, leaving restarts to the orchestrator.

The supervisor also creates, per start, an empty directory with two parts the workers share:
`metrics/` (PROMETHEUS_MULTIPROC_DIR: each worker writes its metrics there and /metrics merges
them, so every worker answers with the pod's totals) and `control/` (an admin reload one worker
takes is repeated by the others, service/control.py). It is removed when the supervisor exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
import yaml
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.observability.logging_setup import configure_logging
from service.settings import Settings, unknown_variables

if TYPE_CHECKING:
    from service.lifecycle import ServingCore

log = logging.getLogger("rankserve.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options override the matching RANKSERVE_* environment variables (see service/settings.py)."""
    parser.add_argument("--host", help="interface of both transports (RANKSERVE_HOST, default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, help="REST port (RANKSERVE_HTTP_PORT, default 8000)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port, 0 disables gRPC (RANKSERVE_GRPC_PORT, default 50051)")
    parser.add_argument("--model-dir", type=Path, help="bundle root (RANKSERVE_MODEL_DIR, default bundles)")
    parser.add_argument("--model-name", help="bundle name to serve (RANKSERVE_MODEL_NAME, default: the only one)")
    parser.add_argument("--redis-url", help="redis:// URL of the feature store (REDIS_URL; default: embedded Valkey)")
    parser.add_argument("--workers", type=int, help="worker processes (RANKSERVE_WORKERS, default 1)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: getattr(args, key)
        for key in ("host", "http_port", "grpc_port", "model_dir", "model_name", "workers")
        if getattr(args, key, None) is not None
    }
    if getattr(args, "redis_url", None):  # as REDIS_URL would: validated, and read with the cluster nodes
        overrides["feature_store"] = {"url": args.redis_url}
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    # one log line, not a traceback: a value that does not validate (inputs hidden: they may hold
    # passwords), a variable that is not JSON, a config file that is not YAML or not there
    except (ValidationError, SettingsError, yaml.YAMLError, OSError) as exc:
        log.error("invalid settings: %s", exc)
        return 2
    # RANKSERVE_LOG_LEVEL / RANKSERVE_JSON_LOGS (or the config file); an explicit --log-level wins
    configure_logging(getattr(args, "log_level", None) or settings.log_level, settings.json_logs)
    unknown = unknown_variables()
    if unknown:
        log.warning("ignoring environment variables that name no setting (a typo?): %s", ", ".join(unknown))
    if settings.workers > 1:
        return supervise(settings)
    return asyncio.run(serve(settings))


# -- one serving process ---------------------------------------------------------------------------


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: `serve()` below owns SIGTERM/SIGINT for both
    transports (uvicorn's handlers would re-raise the signal after shutdown: no exit code 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_config=None,  # keep the JSON logging configured by the CLI
        access_log=False,  # one log line per request costs more than the request on 2 cores
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        server_header=False,
    )


async def serve(
    settings: Settings, reuse_port: bool = False, control_dir: Path | None = None,
) -> int:
    """Run REST and gRPC on this event loop until SIGTERM/SIGINT; returns the exit code.

    `control_dir`: shared with the other workers of the pod, for admin reloads (service/control.py).
    """
    # imported here: the supervisor of several workers never runs `serve`, and must not carry the
    # serving stack's memory (ONNX Runtime, numba, faiss) for nothing
    from feature_store.errors import FeatureStoreError
    from service.control import ControlDir
    from service.lifecycle import ServingCore
    from service.retrieval.base import RetrieverUnavailable
    from service.transports.grpc.server import GrpcServer, start_grpc_server
    from service.transports.rest.app import create_app

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        core = await ServingCore.create(settings, control=ControlDir(control_dir) if control_dir is not None else None)
    except (FeatureStoreError, ValueError, RetrieverUnavailable) as exc:  # bad store URL, strategy, no GPU: exit 1
        log.error("cannot start: %s", exc, extra={"store_mode": settings.feature_store.resolved_mode()})
        return 1
    grpc_server: GrpcServer | None = None
    code = 0
    stop_task = asyncio.create_task(stop.wait(), name="stop-signal")
    freeze_task = asyncio.create_task(_freeze_heap_after_first_load(core), name="gc-freeze")
    try:
        config = _uvicorn_config(settings, create_app(core=core))
        await core.start()
        # reuse_port is set for the workers of a supervisor only: they share the ports
        if reuse_port and not await _first_load_or_stop(core, stop_task):
            return 0
        try:
            sock = _nodelay(_port_socket(settings.host, settings.http_port) if reuse_port
                            else config.bind_socket())
            if settings.grpc_port:
                grpc_server = await start_grpc_server(core, settings.host, settings.grpc_port, reuse_port=reuse_port)
        except (OSError, SystemExit) as exc:  # uvicorn's bind_socket exits on a port in use
            log.error("cannot listen: %s", exc or "HTTP port unavailable",
                      extra={"http_port": settings.http_port, "grpc_port": settings.grpc_port})
            return 1
        http = _HttpServer(config)
        http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http")
        done, _ = await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if http_task in done:
            log.error("HTTP server exited unexpectedly", extra={"error": repr(http_task.exception())})
            code = 1
        else:
            log.info("shutting down: draining in-flight requests", extra={"drain_timeout_s": settings.drain_timeout_s})
        core.begin_drain()
        http.should_exit = True
        started = time.monotonic()
        grpc_stop = [grpc_server.stop(settings.drain_timeout_s)] if grpc_server else []
        await asyncio.gather(http_task, *grpc_stop, return_exceptions=True)
        log.info("transports stopped", extra={"seconds": round(time.monotonic() - started, 3)})
    finally:
        stop_task.cancel()
        freeze_task.cancel()
        await core.aclose()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return code


async def _freeze_heap_after_first_load(core: ServingCore) -> None:
    """Move every object alive once the first model load was tried out of the garbage collector's reach.

    The modules, the model and the caches live as long as the process, yet each full collection
    walks all of them; a request's short-lived objects set collections off every few hundred
    allocations. Frozen (`gc.freeze`), they are never walked again: about 0.6 ms of server CPU a
    request on the standard workload (BENCHMARKS.md). Objects created later are collected as usual.
    """
    await core.first_load_attempted.wait()
    gc.collect()
    gc.freeze()
    log.info("heap frozen for the garbage collector", extra={"objects": gc.get_freeze_count()})


async def _first_load_or_stop(core: ServingCore, stop_task: asyncio.Task[Any]) -> bool:
    """Wait until `core` has tried its first model load; False if a stop signal came first.

    For one of several workers sharing the ports: a worker still loading would answer its share
    of the traffic with 503 while its siblings' /readyz already says the pod is ready. Until it
    listens, the kernel hands new connections to the others (and refuses them while none listens).
    """
    loaded = asyncio.create_task(core.first_load_attempted.wait(), name="first-load")
    await asyncio.wait({loaded, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if loaded.done():
        return True
    loaded.cancel()
    log.info("stopped before the first model load finished")
    return False


def _nodelay(sock: socket.socket) -> socket.socket:
    """Set TCP_NODELAY on the listening socket; Linux copies it to every accepted connection.

    uvicorn binds with proto 0, and asyncio sets TCP_NODELAY itself only on sockets whose proto is
    IPPROTO_TCP: without this, Nagle holds the second write of each response until the client's
    delayed ACK on every keep-alive request, a ten-fold latency (docs/PERFORMANCE.md).
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- several worker processes ----------------------------------------------------------------------


def _worker_main(settings: Settings, log_level: str, control_dir: Path) -> None:
    configure_logging(log_level, settings.json_logs)
    sys.exit(asyncio.run(serve(settings, reuse_port=True, control_dir=control_dir)))


def _port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (not listening), with SO_REUSEPORT.

    Bound as uvicorn binds a single process's socket (IPv6 for a host with a colon, else IPv4;
    "" is every interface), so one worker and several listen on the same addresses. The
    supervisor's copy only reserves the port (and picks it when `port` is 0): a socket that does
    not listen takes no connections, so the kernel spreads them over the workers' own.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _lock_port(port: int) -> int:
    """Hold an exclusive lock on a per-port file for this supervisor's lifetime; its descriptor.

    Workers join the port's SO_REUSEPORT group, which any process of the same user may join too:
    a second `--workers` server started on the same port would bind without an error and take a
    share of the connections. The lock makes that second start fail instead. (A single-process
    server binds without SO_REUSEPORT, so the kernel refuses it the port by itself.)
    """
    path = Path(tempfile.gettempdir()) / f"rankserve-port-{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OSError(exc.errno, f"port {port} is served by another rankserve (pid {holder}; lock {path})") from exc
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _shared_dir() -> tuple[Path, Path, Path]:
    """(root, metrics, control): a fresh, empty directory per start (under TMPDIR, /tmp by default)."""
    root = Path(tempfile.mkdtemp(prefix="rankserve-workers-"))
    metrics, control = root / "metrics", root / "control"
    metrics.mkdir()
    control.mkdir()
    return root, metrics, control


def supervise(settings: Settings) -> int:
    """Start `settings.workers` serving processes sharing the ports; stop them all on SIGTERM."""
    try:
        reserved = _port_socket(settings.host, settings.http_port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.http_port, exc)
        return 1
    settings = settings.model_copy(update={"http_port": reserved.getsockname()[1]})  # port 0: the one picked
    try:
        port_lock = _lock_port(settings.http_port)
    except OSError as exc:
        reserved.close()
        log.error("cannot listen on %s:%s: %s", settings.host, settings.http_port, exc.strerror)
        return 1
    from prometheus_client.multiprocess import mark_process_dead

    root, metrics_dir, control_dir = _shared_dir()
    # read by prometheus_client when a worker imports it (spawned workers inherit the environment);
    # files of an earlier run would add its counts to this one's, hence a new directory every start
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLevelName(logging.getLogger().level)
    workers = [
        ctx.Process(target=_worker_main, args=(settings, level, control_dir), name=f"rankserve-worker-{i}")
        for i in range(settings.workers)
    ]
    stopping: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stopping.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    for proc in workers:
        proc.start()
    log.info("workers started", extra={"pids": [p.pid for p in workers], "http_port": settings.http_port,
                                       "grpc_port": settings.grpc_port, "shared_dir": str(root)})
    code = 0
    try:
        while not stopping:
            dead = [p for p in workers if not p.is_alive()]
            if dead:
                log.error("worker exited; stopping the others",
                          extra={"pid": dead[0].pid, "exitcode": dead[0].exitcode})
                # its live gauges (queue depth, model loaded) leave the merge; its counters stay
                for proc in dead:
                    mark_process_dead(proc.pid, str(metrics_dir))  # type: ignore[no-untyped-call]  # untyped upstream
                code = 1
                break
            time.sleep(0.2)
        for proc in workers:
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: each worker drains on its own
        deadline = time.monotonic() + settings.drain_timeout_s + 30  # drain, then close the store
        for proc in workers:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker did not stop in time; killing it", extra={"pid": proc.pid})
                proc.kill()
                proc.join()
                code = 1
            elif proc.exitcode not in (0, None) and stopping:
                code = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()
        os.close(port_lock)
        shutil.rmtree(root, ignore_errors=True)
    return code
