"""Set up the standard workload and run `rankserve serve` for load tests and benchmarks.

* `prepare_workload`: a bundle with the standard table sizes (random weights: latency does not
  depend on them) plus the users to ingest, either from a synthetic set (`rankserve synth`) or
  generated as `loadtest.bench` does;
* `ingest`: write those users and the whole catalogue into a store (an embedded Valkey);
* `ServerProcess`: a `rankserve serve` subprocess on free loopback ports, ready-checked, and
  stopped with SIGTERM (its whole process group, workers included) on exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # loadtest.bench imports this module's users: import it lazily
    from loadtest.bench import Workload
    from service.lifecycle import ServingCore

log = logging.getLogger("loadtest.serving")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SYNTH = REPO / "data-cache" / "synth"
FEATURE_VERSION = "loadtest"


@dataclass
class PreparedWorkload:
    """A bundle under `model_dir` and the events (with catalogue) to ingest for it."""

    model_dir: Path
    bundle_path: Path
    schema: Any  # FeatureSchema
    events: Any  # EventLog
    catalogue: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]
    users: list[int]  # ingested user ids
    items: range | list[int]  # candidate pool for the traffic model
    source: str
    user_table: Any = None  # SideTable of the user side features to ingest (a side-feature schema)
    item_table: Any = None  # SideTable of the item side features to ingest (a side-feature schema)


def prepare_workload(root: Path, w: Workload, data: str = "auto", quantize: str | None = None) -> PreparedWorkload:
    """Build the bundle and the users to ingest.

    data: "auto" (the synthetic set in data-cache/synth when present, else generated),
    "generated", or "synthetic:DIR" (w.users users of it, a deterministic subset).
    """
    from feature_store.schema import SchemaSpec
    from loadtest.bench import bench_events, build_bundle

    if data == "auto":
        data = f"synthetic:{DEFAULT_SYNTH}" if (DEFAULT_SYNTH / "meta.json").exists() else "generated"
    if data.startswith("synthetic:"):
        from ingest.bulk import schema_from_log
        from models.data.synth import load_synthetic

        directory = Path(data.partition(":")[2])
        events = load_synthetic(directory, max_users=w.users)
        cat_items = np.load(directory / "catalogue_item.npy").astype(np.int64)
        cat_cats = np.load(directory / "catalogue_category.npy").astype(np.int64)
        catalogue = (cat_items, cat_cats)
        # the history length of the standard workload: keep each user's newest w.history events
        events = _newest(events, w.history)
        schema = schema_from_log(events, SchemaSpec(name="loadtest", max_sequence_length=w.history), catalogue)
        lo, hi = int(cat_items.min()), int(cat_items.max())
        items: range | list[int] = (
            range(lo, hi + 1) if hi - lo + 1 == cat_items.shape[0] else [int(i) for i in cat_items]
        )
    elif data == "generated":
        events, item_category = bench_events(w)
        catalogue = (np.arange(w.items, dtype=np.int64), item_category.astype(np.int64))
        schema = None
        items = range(w.items)
    else:
        raise ValueError(f"unknown data {data!r}: use auto, generated or synthetic:DIR")
    bundle_path = build_bundle(root, w, schema, quantize=quantize)
    from feature_store.schema import FeatureSchema

    schema = FeatureSchema.load(bundle_path / "schema")
    users, _ = events.user_offsets()
    source = data.replace(f"{REPO}/", "")  # repo-relative in reports
    return PreparedWorkload(root / "models", bundle_path, schema, events, catalogue,
                            [int(u) for u in users], items, source)


def _newest(events: Any, n: int) -> Any:
    """Each user's newest n events (the log is sorted by user, then time)."""
    from models.data.events import EventLog

    _, offsets = events.user_offsets()
    ends = offsets[1:]
    starts = np.maximum(offsets[:-1], ends - n)
    if np.array_equal(starts, offsets[:-1]):
        return events
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])
    return EventLog(events.user_id[rows], events.item_id[rows], events.category_id[rows], events.action[rows],
                    events.timestamp[rows])


def ingest(url: str, prepared: PreparedWorkload, version: str = FEATURE_VERSION, clusters: bool = False) -> float:
    """Write the prepared users and the whole catalogue into the store at `url`; returns seconds.

    `clusters`: also each user's behaviour clusters (twin_v2), made with the workload's bundle.
    The user table and item catalogue of a side-feature workload go into the same version.
    """
    from feature_store.redis_store import create_store
    from feature_store.store import FeatureStoreConfig
    from ingest.bulk import clusterer_from_bundle, ingest_log

    t0 = time.perf_counter()
    clusterer = clusterer_from_bundle(prepared.bundle_path) if clusters else None

    async def run() -> None:
        async with create_store(FeatureStoreConfig(url=url)) as store:
            await ingest_log(store, prepared.events, prepared.schema, version, activate=True,
                             catalogue=prepared.catalogue, source=prepared.source, clusterer=clusterer,
                             users=prepared.user_table, items=prepared.item_table)

    asyncio.run(run())
    return time.perf_counter() - t0


@dataclass
class ServerProcess:
    """`rankserve serve` on free loopback ports; a context manager that waits for /readyz."""

    model_dir: Path
    redis_url: str
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    log_path: Path | None = None
    ready_timeout_s: float = 300.0
    http_port: int = 0
    grpc_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> ServerProcess:
        from feature_store.embedded import free_port

        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANKSERVE_", "REDIS_"))}
        env.update({"RANKSERVE_POLL_INTERVAL_S": "0", "RANKSERVE_MAX_CANDIDATES": "1000",
                    "RANKSERVE_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--model-dir", str(self.model_dir), "--redis-url", self.redis_url, "--workers", str(self.workers)]
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        # own process group: stop() signals the supervisor and its workers together
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self) -> None:
        """Until every worker answers: a worker listens once its model loaded, and a load generator's
        keep-alive connections opened before the last worker listens all stay on the others."""
        import httpx

        deadline = time.monotonic() + self.ready_timeout_s
        answered: set[int] = set()
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rankserve serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                # a new connection each time: the kernel hands it to one of the listening workers
                if httpx.get(self.base_url + "/readyz", timeout=2.0).status_code == 200:
                    answered.add(int(httpx.get(self.base_url + "/v1/models", timeout=2.0).json()["pid"]))
                    if len(answered) >= self.workers:
                        return
                    continue
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"rankserve serve not ready after {self.ready_timeout_s}s ({len(answered)} of "
                           f"{self.workers} workers answered); see {self.log_path}")

    def pids(self) -> list[int]:
        """The serving processes: the server itself, or with workers > 1 the worker children."""
        if self.proc is None:
            return []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            kids = [int(p) for p in children.read_text().split()]
        except OSError:
            kids = []
        # spawned workers: the supervisor's children that are python processes (not resource trackers)
        workers = [p for p in kids if "rankserve-worker" in _cmdline(p) or "spawn_main" in _cmdline(p)]
        return workers if self.workers > 1 and workers else [self.proc.pid]

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def memory_rollup(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) of a process in kB, from /proc/<pid>/smaps_rollup."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name.strip()] = int(parts[0])
    return {
        "rss_kb": fields.get("Rss", 0),
        "pss_kb": fields.get("Pss", 0),
        "uss_kb": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        "shared_kb": fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0),
        "anon_kb": fields.get("Anonymous", 0),
    }


async def wait_until_ready(core: ServingCore, timeout_s: float = 300.0) -> None:
    """Poll an in-process core's readiness (JIT warm-up, model load) until ready; RuntimeError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (await core.check_readiness()).ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"an in-process core did not become ready within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
