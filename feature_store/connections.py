"""Redis clients for the online store: the connection handshake, the fast command packer, pools.

Single node (`single_client`, TCP, TLS or a unix socket from the URL) and Cluster
(`cluster_client`); neither retries on its own: retries and deadlines are the store's.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from redis import exceptions as rex
from redis._parsers.base import BaseParser
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from feature_store.errors import FeatureStoreConfigError
from feature_store.store import FeatureStoreConfig

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    _hiredis_pack = hiredis.pack_command
except ImportError:  # hiredis is in the serving install; without it redis-py's packer and reader are used
    _hiredis_pack = None


class _HiredisPackMixin:
    """Pack commands with hiredis' C packer, as redis-py's *sync* client already does.

    redis-py's asyncio connections pack in Python, re-joining a growing buffer per argument, a
    large share of a fetch of 500 items (docs/PERFORMANCE.md). The bytes are the same
    (tests/integration/test_feature_store_config.py checks it); anything hiredis refuses falls
    back to redis-py's packer, which raises redis-py's own errors.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if _hiredis_pack is not None and args and isinstance(args[0], str) and " " not in args[0]:
            try:
                return [_hiredis_pack(args)]
            except TypeError:
                pass
        return cast(list[bytes], super().pack_command(*args))  # type: ignore[misc]


class FastConnection(_HiredisPackMixin, Connection):
    pass


class FastSSLConnection(_HiredisPackMixin, SSLConnection):
    pass


class FastUnixDomainSocketConnection(_HiredisPackMixin, UnixDomainSocketConnection):
    pass


_FAST_CONNECTIONS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: FastConnection,
    SSLConnection: FastSSLConnection,
    UnixDomainSocketConnection: FastUnixDomainSocketConnection,
}


# The connection handshake: RESP2 and no CLIENT SETINFO. redis-py 8 defaults to RESP3, which
# costs a HELLO round trip on every new connection plus a CLIENT MAINT_NOTIFICATIONS one (refused
# by Valkey and open-source Redis), then sends CLIENT SETINFO: three round trips before the first
# command. The store's commands (GET, GETRANGE, MGET, SET, SCAN, EVALSHA, ...) reply the same in
# RESP2. It matters after a slow spell: each call cut off by its deadline discards its
# connection, so the next calls connect anew, and with a long handshake they miss the budget
# again even once the store is fast (tests/fault/test_redis_faults.py; numbers in
# docs/PERFORMANCE.md). A password still costs its AUTH round trip.
_HANDSHAKE: dict[str, Any] = {"protocol": 2, "lib_name": None, "lib_version": None}


def _no_retry() -> Retry:
    # redis-py's default is 10 retries with up to 1 s backoff each; retries are ours alone.
    return Retry(NoBackoff(), 0)


def _cluster_kwargs_from_url(url: str | None) -> dict[str, Any]:
    """Username, password and TLS for every cluster node, taken from a redis(s):// URL."""
    if not url:
        return {}
    parts = urlsplit(url)
    out: dict[str, Any] = {}
    if parts.username:
        out["username"] = unquote(parts.username)
    if parts.password:
        out["password"] = unquote(parts.password)
    if parts.scheme == "rediss":
        out["ssl"] = True
    return out


def single_client(config: FeatureStoreConfig, url: str | None) -> Redis:
    """A client of one node at `url` with a non-blocking pool of `config.pool_size` connections."""
    if not url:
        raise FeatureStoreConfigError("single-node mode needs a url")
    # A plain (non-blocking) pool: when all `pool_size` connections are busy, the call fails
    # with MaxConnectionsError, a connection error that `_run` retries with backoff within the
    # deadline. The blocking pool's condition variable and timer would cost on every call.
    pool = ConnectionPool.from_url(
        url,
        max_connections=config.pool_size,
        socket_connect_timeout=config.connect_timeout_s,
        socket_timeout=config.read_timeout_s,
        socket_keepalive=True,
        retry=_no_retry(),
        **_HANDSHAKE,
    )
    # The URL picks TCP, TLS or a unix socket; swap in the same kind with the fast packer.
    pool.connection_class = _FAST_CONNECTIONS.get(pool.connection_class, pool.connection_class)
    return Redis(connection_pool=pool)


def cluster_client(config: FeatureStoreConfig) -> RedisCluster:
    """A Cluster client from `config.cluster_nodes` (credentials and TLS from `config.url`) or `config.url`."""
    common: dict[str, Any] = {
        "max_connections": config.pool_size,
        "socket_connect_timeout": config.connect_timeout_s,
        "socket_timeout": config.read_timeout_s,
        "socket_keepalive": True,
        "retry": _no_retry(),
        # Serve the slots that are up while others are down (explicit misses, not total failure).
        "require_full_coverage": False,
        **_HANDSHAKE,
    }
    if config.cluster_nodes:
        nodes = [ClusterNode(h, int(p)) for h, _, p in (n.rpartition(":") for n in config.cluster_nodes)]
        return RedisCluster(startup_nodes=nodes, **common, **_cluster_kwargs_from_url(config.url))
    if config.url:
        return RedisCluster.from_url(config.url, **common)
    raise FeatureStoreConfigError("cluster mode needs cluster_nodes or url")


def node_client(config: FeatureStoreConfig, host: str, port: int) -> Redis:
    """A plain client of one Cluster node (the Cluster's credentials, TLS and timeouts), for fast reads."""
    options = _cluster_kwargs_from_url(config.url)
    ssl = bool(options.pop("ssl", False))
    pool = ConnectionPool(
        connection_class=FastSSLConnection if ssl else FastConnection,
        host=host,
        port=port,
        max_connections=config.pool_size,
        socket_connect_timeout=config.connect_timeout_s,
        # No per-read socket timeout: redis-py arms a timer for every reply it reads, which
        # for 500 one-key replies is most of the fetch. The call deadline in `_run`
        # (request_timeout_s) still bounds a hung node.
        socket_timeout=None,
        socket_keepalive=True,
        retry=_no_retry(),
        **_HANDSHAKE,
        **options,
    )
    return Redis(connection_pool=pool)


class _ReplyProtocol(asyncio.Protocol):
    """One connection of `LeanReads`: a pipeline of commands out, its replies parsed by hiredis
    straight from the socket's chunks (redis-py's asyncio client copies them through a
    StreamReader and reads reply by reply). One call at a time."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self._waiter: asyncio.Future[list[Any]] | None = None
        self._want = 0
        self._replies: list[Any] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            self._replies.append(reply)
        waiter = self._waiter
        if len(self._replies) > self._want or waiter is None:  # a reply nobody asked for: out of step
            self._fail(rex.InvalidResponse("unexpected reply from the server"))
        elif len(self._replies) == self._want and not waiter.done():
            waiter.set_result(self._replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rex.ConnectionError(f"connection closed by the server{f': {exc}' if exc else ''}"))

    def _fail(self, exc: Exception) -> None:
        self.lost = self.lost or exc
        if self.transport is not None:
            self.transport.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def call(self, packed: bytes, n_replies: int) -> list[Any]:
        if self.lost is not None:
            raise self.lost
        assert self.transport is not None
        self._replies, self._want = [], n_replies
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(packed)
        try:
            return await self._waiter
        finally:
            self._waiter = None


class LeanReads:
    """Pipelined reads on a single node through `_ReplyProtocol` connections, for the fetch.

    The same server, credentials, database and timeouts as the redis-py client built from the
    same URL (TCP or a unix socket; a TLS URL reads through redis-py, see `lean_reads_for`).
    Replies come back as redis-py's pipeline gives them for GET, GETRANGE, STRLEN and MGET;
    an error reply raises redis-py's exception for it (BusyLoadingError for LOADING, ...).
    A call cut off by a timeout or a cancellation closes its connection (its replies would
    arrive later, out of step); at most `max_connections` are open, beyond that a call raises
    MaxConnectionsError, which the store retries like any connection error.
    """

    def __init__(self, connection: dict[str, Any], *, connect_timeout_s: float, read_timeout_s: float,
                 max_connections: int) -> None:
        self._connection = connection
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        self._idle: list[_ReplyProtocol] = []
        self._open = 0
        self._closed = False

    @property
    def address(self) -> str:
        c = self._connection
        return str(c["path"]) if "path" in c else f"{c.get('host', 'localhost')}:{c.get('port', 6379)}"

    async def _connect(self) -> _ReplyProtocol:
        loop = asyncio.get_running_loop()
        c = self._connection
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if "path" in c:
                    _, proto = await loop.create_unix_connection(_ReplyProtocol, c["path"])
                else:
                    _, proto = await loop.create_connection(_ReplyProtocol, c.get("host", "localhost"),
                                                            int(c.get("port", 6379)))
                    sock = proto.transport.get_extra_info("socket") if proto.transport is not None else None
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                setup: list[tuple[Any, ...]] = []
                if c.get("password"):
                    setup.append(("AUTH", *([c["username"]] if c.get("username") else []), c["password"]))
                if c.get("db"):
                    setup.append(("SELECT", int(c["db"])))
                if setup:
                    try:
                        _raise_errors(await proto.call(b"".join(map(hiredis.pack_command, setup)), len(setup)))
                    except BaseException:  # refused credentials, a timeout: not a connection to keep
                        if proto.transport is not None:
                            proto.transport.close()
                        raise
        except TimeoutError as exc:  # the words the store's `never_sent` looks for: nothing was sent
            raise rex.TimeoutError(f"Timeout connecting to server {self.address}") from exc
        except OSError as exc:
            raise rex.ConnectionError(f"Error {exc.errno} connecting to {self.address}. {exc.strerror}") from exc
        return proto

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of `commands`, sent as one pipeline on one connection."""
        if self._closed:
            raise rex.ConnectionError("the store is closed")
        packed = b"".join(map(hiredis.pack_command, commands))
        conn = None
        while self._idle and conn is None:
            conn = self._idle.pop()
            if conn.lost is not None:  # closed while idle (a restarted server)
                self._open -= 1
                conn = None
        if conn is None:
            if self._open >= self._max_connections:
                raise rex.MaxConnectionsError(f"all {self._max_connections} connections to {self.address} are busy")
            self._open += 1
            try:
                conn = await self._connect()
            except BaseException:
                self._open -= 1
                raise
        replies: list[Any] | None = None
        try:
            async with asyncio.timeout(self._read_timeout_s):
                replies = await conn.call(packed, len(commands))
        except TimeoutError as exc:
            raise rex.TimeoutError(f"Timeout reading from {self.address}") from exc
        finally:
            if replies is not None and conn.lost is None and not self._closed:
                self._idle.append(conn)
            else:
                self._open -= 1
                if conn.transport is not None:
                    conn.transport.close()
        _raise_errors(replies)
        return replies

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


def _raise_errors(replies: list[Any]) -> None:
    """Raise redis-py's exception for the first error reply, as its pipeline does."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise cast(Exception, BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]


def lean_reads_for(client: Redis, config: FeatureStoreConfig) -> LeanReads | None:
    """`LeanReads` to the node `client` talks to, with its credentials; None for a TLS URL
    (those reads stay with redis-py, whose TLS settings come from the URL) or without hiredis."""
    pool = client.connection_pool
    if _hiredis_pack is None or pool.connection_class not in (FastConnection, FastUnixDomainSocketConnection):
        return None
    keep = ("host", "port", "path", "db", "username", "password")
    return LeanReads({k: v for k, v in pool.connection_kwargs.items() if k in keep and v is not None},
                     connect_timeout_s=config.connect_timeout_s, read_timeout_s=config.read_timeout_s,
                     max_connections=config.pool_size)
