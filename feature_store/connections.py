"""Redis clients for the online store: the connection handshake, the fast command packer, pools.

Single node (`single_client`, TCP, TLS or a unix socket from the URL) and Cluster
(`cluster_client`); neither retries on its own: retries and deadlines are the store's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

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
except ImportError:  # hiredis is in the serving install; without it redis-py's packer is used
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
