"""Service URL expansion and rendezvous ranking (p2p_common.discovery)."""

from __future__ import annotations

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
