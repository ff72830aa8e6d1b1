"""host:port with IPv6 brackets, listen addresses (``:port``) and IPv4-mapped addresses: the
pure parsers every listener and URL goes through (p2p_common.settings)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from p2p_common.settings import join_host_port, split_host_port, split_listen, unmapped

ports = st.integers(0, 65535)
names = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True)


@given(st.ip_addresses(), ports)
def test_an_address_and_port_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    joined = join_host_port(str(address), port)
    assert joined.startswith("[") is (address.version == 6)
    assert split_host_port(joined) == (str(address), port)
    assert split_listen(joined) == (str(address), port)
    assert join_host_port(f"[{address}]", port) == joined if address.version == 6 else True


@given(names, ports)
def test_names_need_no_brackets(name: str, port: int) -> None:
    assert join_host_port(name, port) == f"{name}:{port}"
    assert split_listen(f"{name}:{port}") == (name, port)


@given(ports)
def test_a_listen_address_without_a_host_is_every_address(port: int) -> None:
    assert split_listen(f":{port}") == ("", port)
    assert split_listen(f"[::]:{port}") == ("::", port)
    with pytest.raises(ValueError):
        split_host_port(f":{port}")  # where to connect: a host is required


@pytest.mark.parametrize("value", [":", ":x", ":65536", ":-1", "::", "[::1]", ""])
def test_malformed_listen_addresses(value: str) -> None:
    with pytest.raises(ValueError):
        split_listen(value)


@given(st.text(max_size=40))
@example(":\u0663")
def test_split_listen_gives_a_pair_or_a_value_error(text: str) -> None:
    try:
        host, port = split_listen(text)
    except ValueError:
        return
    assert 0 <= port <= 65535
    assert host or text.startswith(":")


@given(st.ip_addresses(v=4))
def test_mapped_addresses_are_their_ipv4_address(address: ipaddress.IPv4Address) -> None:
    mapped = str(ipaddress.IPv6Address(f"::ffff:{address}"))
    assert unmapped(mapped) == str(address)
    assert unmapped(f"::FFFF:{address}") == str(address)
    assert unmapped(str(address)) == str(address)


@given(st.ip_addresses(v=6))
def test_other_ipv6_addresses_stay(address: ipaddress.IPv6Address) -> None:
    if address.ipv4_mapped is None:
        assert unmapped(str(address)) == str(address)
