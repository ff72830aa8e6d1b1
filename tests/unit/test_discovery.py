"""Service URL expansion and rendezvous ranking (p2p_common.discovery)."""

from __future__ import annotations

import socket

import httpx
import trio

from p2p_common import rendezvous
from p2p_common.discovery import Resolver


async def test_ip_literals_stay_as_they_are() -> None:
    resolver = Resolver()
    for url in ("http://127.0.0.1:5005", "http://[::1]:5005/x", "http://10.0.0.7:6969/announce"):
        assert await resolver.expand(url) == [url]


async def test_a_host_name_expands_to_one_url_per_address() -> None:
    urls = await Resolver().expand("http://localhost:6969/announce")
    assert "http://127.0.0.1:6969/announce" in urls
    assert all(u.endswith(":6969/announce") for u in urls)
    assert len(urls) == len(set(urls))


async def test_an_unresolvable_name_is_kept_and_the_last_answer_reused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    resolver = Resolver(ttl=10)
    bogus = "http://no-such-host.invalid:5005"
    assert await resolver.expand(bogus) == [bogus]
    good = await resolver.expand("http://localhost:1")
    await trio.sleep(20)  # past the TTL: looked up again, same answer
    assert await resolver.expand("http://localhost:1") == good


async def test_ranking_is_rendezvous_over_every_instance() -> None:
    resolver = Resolver()
    urls = ["http://127.0.0.1:1", "http://127.0.0.2:1", "http://127.0.0.3:1"]
    for key in (b"a", b"b", b"sha256:xyz"):
        ranked = await resolver.ranked(key, urls)
        assert ranked == rendezvous.rank(key, urls)
        assert sorted(ranked) == sorted(urls)


class DualStackDNS(trio.abc.HostnameResolver):
    """A headless Service in a dual-stack cluster: AAAA and A records for one name."""

    async def getaddrinfo(  # type: ignore[override]
        self, host: bytes | str | None, port: bytes | str | int | None, *args: object, **kw: object
    ) -> list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[object, ...]]]:
        assert host in ("p2p-proxy-headless", b"p2p-proxy-headless")
        number = int(port) if port is not None else 0
        stream = socket.SOCK_STREAM
        return [
            (socket.AF_INET6, stream, 6, "", ("fd00::a", number, 0, 0)),
            (socket.AF_INET6, stream, 6, "", ("fd00::b", number, 0, 0)),
            (socket.AF_INET, stream, 6, "", ("10.0.0.10", number)),
        ]

    async def getnameinfo(self, sockaddr: tuple[object, ...], flags: int) -> tuple[str, str]:
        raise NotImplementedError


async def test_aaaa_records_become_bracketed_instances_that_keep_the_name() -> None:
    trio.socket.set_custom_hostname_resolver(DualStackDNS())
    try:
        resolver = Resolver()
        urls = await resolver.expand("https://p2p-proxy-headless:5005")
    finally:
        trio.socket.set_custom_hostname_resolver(None)
    assert urls == [
        "https://[fd00::a]:5005",
        "https://[fd00::b]:5005",
        "https://10.0.0.10:5005",
    ]
    # TLS verifies the Service's name whichever address the agent connects to.
    assert {resolver.host_name(u) for u in urls} == {"p2p-proxy-headless"}
    for url in urls:
        assert httpx.URL(url).host in ("fd00::a", "fd00::b", "10.0.0.10")
