"""Where shadow comparisons go, one record per (request, shadow), and how to read them back.

* `JsonlSink` (default): `DIR/shadow.jsonl`, rotated by size to `shadow.jsonl.1` .. `.N-1`, at
  most `max_files` files in all. Each record is one `write()` on an O_APPEND descriptor, so
  worker processes sharing the directory never interleave lines; a process notices when
  another one rotated the file (inode changed) and reopens it.
* `RedisStreamSink`: `XADD key MAXLEN ~ maxlen * record <json>`.

Writers are synchronous: they run on the shadow lane's own thread, never on the event loop.
Readers (`read_records`) feed `rankserve shadow-report` and `rankserve replay`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

log = logging.getLogger("rankserve.shadow")

SINK_FILE = "shadow.jsonl"


class Sink(Protocol):
    def write(self, record: Mapping[str, Any]) -> None:
        """Persist one record; raise on failure (the caller counts it)."""
        ...

    def close(self) -> None: ...


def encode(record: Mapping[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


class NullSink:
    def write(self, record: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class JsonlSink:
    """Size-rotated JSON lines with a bounded number of files."""

    def __init__(self, directory: Path, max_bytes: int, max_files: int) -> None:
        if max_bytes < 1 or max_files < 1:
            raise ValueError("max_bytes and max_files must be >= 1")
        self.directory = directory
        self.path = directory / SINK_FILE
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._lock = threading.Lock()  # several shadow lanes write from their own threads
        self._fh: IO[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def _open(self) -> IO[bytes]:
        if self._fh is not None:
            try:
                if os.fstat(self._fh.fileno()).st_ino == os.stat(self.path).st_ino:
                    return self._fh
            except FileNotFoundError:
                pass  # rotated away by another process
            self._fh.close()
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115  (kept open across writes)
        return self._fh

    def _rotate(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.max_files == 1:  # no history kept: start the file over
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{SINK_FILE}.{self.max_files - 1}").unlink()
        for i in range(self.max_files - 2, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.directory / f"{SINK_FILE}.{i}", self.directory / f"{SINK_FILE}.{i + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, self.directory / f"{SINK_FILE}.1")

    def write(self, record: Mapping[str, Any]) -> None:
        line = encode(record)
        with self._lock:
            fh = self._open()
            size = os.fstat(fh.fileno()).st_size
            if size and size + len(line) > self.max_bytes:
                self._rotate()
                fh = self._open()
            fh.write(line)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class RedisStreamSink:
    """XADD to a Redis Stream, capped with MAXLEN ~ (trimmed in whole nodes: cheap)."""

    def __init__(self, url: str, key: str, maxlen: int, timeout_s: float = 0.5) -> None:
        import redis

        self.key = key
        self.maxlen = maxlen
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def write(self, record: Mapping[str, Any]) -> None:
        self._client.xadd(self.key, {"record": encode(record)}, maxlen=self.maxlen, approximate=True)

    def close(self) -> None:
        self._client.close()


# -- reading ---------------------------------------------------------------------------------------


def sink_files(directory: Path) -> list[Path]:
    """The sink's files, oldest first (`shadow.jsonl.N` .. `.1`, then `shadow.jsonl`)."""
    rotated = []
    for p in directory.glob(f"{SINK_FILE}.*"):
        suffix = p.name[len(SINK_FILE) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    files = [p for _, p in sorted(rotated, reverse=True)]
    if (directory / SINK_FILE).exists():
        files.append(directory / SINK_FILE)
    return files


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None  # a line cut short by a crash or a concurrent rotation
    return doc if isinstance(doc, dict) else None


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a sink directory (every file, oldest first) or of one JSONL file."""
    files = sink_files(path) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise FileNotFoundError(f"no {SINK_FILE}* files in {path}")
    skipped = 0
    for file in files:
        with file.open("rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                doc = _parse(line)
                if doc is None:
                    skipped += 1
                    continue
                yield doc
    if skipped:
        log.warning("skipped unreadable lines", extra={"path": str(path), "lines": skipped})


def read_stream(url: str, key: str, page: int = 1000, timeout_s: float = 10.0) -> Iterator[dict[str, Any]]:
    """Records of a Redis Stream sink, oldest first (XRANGE pages). A Redis that does not answer
    within `timeout_s` (connect, or one page) raises `FeatureStoreUnavailable` naming the stream."""
    import redis

    from feature_store.errors import FeatureStoreUnavailable

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        start = "-"
        while True:
            try:
                entries = client.xrange(key, min=start, max="+", count=page) or []
            except redis.RedisError as exc:  # the URL may hold a password: name the stream, not the URL
                raise FeatureStoreUnavailable(f"reading the stream {key!r}: {exc}") from None
            for _id, fields in entries:
                raw = (fields or {}).get(b"record")
                doc = _parse(raw) if isinstance(raw, bytes) else None
                if doc is not None:
                    yield doc
            if len(entries) < page:
                return
            last = entries[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    finally:
        client.close()
