"""The workers' listening sockets bind the addresses a single process binds (uvicorn's rules)."""

from __future__ import annotations

import socket

import pytest

from service.server import _port_socket


@pytest.mark.parametrize(("host", "family", "address"), [
    ("", socket.AF_INET, "0.0.0.0"),  # every interface, as RANKSERVE_HOST="" gives one process
    ("127.0.0.1", socket.AF_INET, "127.0.0.1"),
    ("localhost", socket.AF_INET, "127.0.0.1"),  # IPv4 even where localhost resolves to ::1 first
])
def test_worker_sockets_bind_as_a_single_process_does(host: str, family: socket.AddressFamily, address: str) -> None:
    sock = _port_socket(host, 0)
    try:
        assert sock.family == family
        assert sock.getsockname()[0] == address
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        # a second socket of the group binds the same port: how every worker listens on it
        other = _port_socket(host, sock.getsockname()[1])
        other.close()
    finally:
        sock.close()


def test_a_taken_port_is_refused_without_reuse_port() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            _port_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
