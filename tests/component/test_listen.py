"""Listeners on IPv4, IPv6 and both (p2p_common.listen), on this machine's loopbacks."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from p2p_common.listen import has_ipv6, listen_addresses, tcp_sockets

pytestmark = pytest.mark.skipif(not has_ipv6(), reason="the kernel has no IPv6")


@contextmanager
def listening(address: str) -> Iterator[list[socket.socket]]:
    sockets = tcp_sockets(address)
    try:
        for sock in sockets:
            sock.listen(8)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def connects(family: int, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        try:
            client.connect((host, port))
        except OSError:
            return False
        return True


def test_every_address_is_one_dual_stack_socket() -> None:
    assert listen_addresses(":0") == [(socket.AF_INET6, "::")]
    with listening(":0") as (sock,):
        port = sock.getsockname()[1]
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert connects(socket.AF_INET, "127.0.0.1", port)
        assert connects(socket.AF_INET6, "::1", port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, peer = sock.accept()
        assert peer[0] == "::ffff:127.0.0.1"  # what p2p_common.settings.unmapped undoes
        accepted.close()
        client.close()


def test_brackets_around_the_ipv6_wildcard_mean_the_same() -> None:
    with listening("[::]:0") as (sock,):
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert connects(socket.AF_INET, "127.0.0.1", sock.getsockname()[1])


def test_an_ipv4_wildcard_or_an_ipv6_address_is_that_family_only() -> None:
    with listening("0.0.0.0:0") as (sock,):
        assert sock.family == socket.AF_INET
        assert not connects(socket.AF_INET6, "::1", sock.getsockname()[1])
    with listening("[::1]:0") as (sock,):
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert connects(socket.AF_INET6, "::1", sock.getsockname()[1])
        assert not connects(socket.AF_INET, "127.0.0.1", sock.getsockname()[1])


def test_a_name_is_each_of_its_addresses_on_one_port() -> None:
    families = {family for family, _ in listen_addresses("localhost:0")}
    with listening("localhost:0") as sockets:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1
        assert {sock.family for sock in sockets} == families
        (port,) = ports
        if socket.AF_INET6 in families:
            assert connects(socket.AF_INET6, "::1", port)
        assert connects(socket.AF_INET, "127.0.0.1", port)


def test_a_port_in_use_names_the_address() -> None:
    with listening("127.0.0.1:0") as (sock,):
        taken = f"127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(OSError, match=taken):
            tcp_sockets(taken)
