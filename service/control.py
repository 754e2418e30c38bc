"""Admin reloads that reach every worker of a pod.

Under `rankserve serve --workers N` each worker process has its own serving core, and an admin
call (`POST /v1/admin/reload`, `POST /v1/admin/experiments/reload`) lands on one of them. That
worker reloads itself, answers, and records the request here: one small JSON file per kind of
reload in a control directory the supervisor creates empty at every start. Every worker polls
the directory (`ServingCore`, every `CONTROL_INTERVAL_S`) and repeats a request it has not seen.
A single process has no control directory and nothing to tell.

Files are replaced atomically (write, then rename), so a reader sees an old or a new request,
never half of one. Only the newest request of each kind is kept: a worker that missed two model
reloads repeats the last one, which is the state the admin asked for.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("rankserve.control")

ReloadKind = Literal["model", "experiments"]
KINDS: tuple[ReloadKind, ...] = ("model", "experiments")
CONTROL_INTERVAL_S = 0.5  # how soon the other workers follow an admin reload


@dataclass(frozen=True)
class ReloadRequest:
    """One admin reload: its id, the version asked for (model reloads; None: the newest) and who took it."""

    kind: ReloadKind
    id: str
    version: int | None
    origin_pid: int


class ControlDir:
    """The shared directory of reload requests (one `<kind>.json` each)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def publish(self, kind: ReloadKind, version: int | None = None) -> ReloadRequest:
        """Record a reload the calling worker has just done, for the others to repeat."""
        request = ReloadRequest(kind, uuid.uuid4().hex, version, os.getpid())
        target = self.path / f"{kind}.json"
        staging = self.path / f".{kind}.{request.id}.tmp"
        staging.write_text(json.dumps(asdict(request)))
        os.replace(staging, target)
        return request

    def read(self, kind: ReloadKind) -> ReloadRequest | None:
        """The newest request of `kind`, None when there is none (or it cannot be read: logged)."""
        try:
            doc = json.loads((self.path / f"{kind}.json").read_text())
            version = None if doc["version"] is None else int(doc["version"])
            return ReloadRequest(kind, str(doc["id"]), version, int(doc["origin_pid"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable reload request; ignoring it", extra={"kind": kind, "error": str(exc)})
            return None
