"""The Debian ``opentracker`` (whitelist build) as a real BitTorrent tracker on 127.0.0.1.

How it is run (see :func:`opentracker`)::

    cd WORKDIR/opentracker-root && /usr/bin/opentracker -f WORKDIR/opentracker.conf

with ``opentracker.conf``::

    listen.tcp 127.0.0.1:PORT
    tracker.rootdir WORKDIR/opentracker-root
    tracker.user nobody
    access.whitelist whitelist

Facts this relies on (checked on Debian 12, opentracker 0.0~git20210823):

- The Debian build is compiled with ``WANT_ACCESSLIST_WHITE``: an announce for an infohash that
  is not listed gets ``failure reason: Requested download is not authorized...``. The whitelist is
  one infohash per line, 40 hex digits. SIGHUP re-reads it (the reload is effectively immediate).
  ``event=stopped`` announces are answered even for unlisted infohashes.
- Started as root, it chroots to ``tracker.rootdir`` and drops to ``tracker.user``; started as
  another user it only ``chdir``s there. ``access.whitelist`` is therefore given relative
  (``whitelist``), which resolves to ``ROOTDIR/whitelist`` either way, and the process is started
  with ``ROOTDIR`` as its working directory. ROOTDIR must be searchable (0755) and the whitelist
  readable (0644) by ``nobody``.
- Without any ``listen.*`` line it binds 0.0.0.0:6969 TCP *and* UDP; with a ``listen.tcp`` line it
  binds only that (no UDP), so nothing listens beyond 127.0.0.1. ``udp=True`` adds
  ``listen.udp 127.0.0.1:PORT`` (the same port number): BEP 15 announces, whitelisted like HTTP
  ones (an unlisted infohash gets an 8-byte answer without peers), at
  :attr:`OpenTracker.udp_announce_url`.
- Answers are compact only (BEP 23); the announce interval is about 30 minutes (randomised around
  1800 s, min interval about half), so a client that announced before the seed will not see the seed
  until it re-announces: start seeds first and wait with :meth:`OpenTracker.wait_peers` or
  :func:`wait_for_peer`.
- Peers are keyed by source IP and announced port, so many peers on 127.0.0.1 are fine. A peer is
  handed back its own address in the peer list (clients drop that connection by peer id).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from signal import SIGHUP
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import bencodepy

from tests.realparts.procs import ManagedProcess, free_port, poll_until, require

__all__ = [
    "OpenTracker",
    "ScrapeStats",
    "announce",
    "opentracker",
    "tracker_peers",
    "wait_for_peer",
]

_PROBE_PEER_ID = b"-HARNESS-PROBE-00000"
_PROBE_PORT = 1
_HTTP_TIMEOUT = 5.0


@dataclass(frozen=True)
class ScrapeStats:
    """One infohash's counters from a scrape: seeders, leechers, completed downloads."""

    complete: int
    incomplete: int
    downloaded: int


def _http_get(host: str, port: int, path_and_query: str) -> bytes:
    """One HTTP GET on loopback, without any proxy; the body of a 200 answer."""
    conn = http.client.HTTPConnection(host, port, timeout=_HTTP_TIMEOUT)
    try:
        conn.request("GET", path_and_query)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"tracker {host}:{port} answered {response.status} to {path_and_query}")
    return body


def announce(
    announce_url: str,
    infohash: bytes,
    peer_id: bytes,
    port: int,
    *,
    left: int,
    event: str | None = None,
    numwant: int = 50,
) -> dict[bytes, Any]:
    """Send one raw BEP 3 announce (``compact=1``) to a tracker on loopback; the decoded reply.

    Works with any HTTP tracker (opentracker, the project's own). Refuses hosts outside
    127.0.0.0/8 so that a test can never announce off the host.
    """
    url = urlsplit(announce_url)
    host = url.hostname or ""
    if url.scheme != "http" or not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"not an http announce URL on loopback: {announce_url}")
    query = (
        f"info_hash={quote_from_bytes(infohash)}&peer_id={quote_from_bytes(peer_id)}"
        f"&port={port}&uploaded=0&downloaded=0&left={left}&compact=1&numwant={numwant}"
    )
    if event:
        query += f"&event={event}"
    separator = "&" if url.query else "?"
    path = (url.path or "/") + (f"?{url.query}" if url.query else "") + separator + query
    reply = bencodepy.decode(_http_get(host, url.port or 80, path))
    if not isinstance(reply, dict):
        raise RuntimeError(f"announce reply is not a dictionary: {reply!r}")
    return reply


def _peers(reply: dict[bytes, Any]) -> list[tuple[str, int]]:
    """The IPv4 peers of an announce reply, compact (BEP 23) or as dictionaries (BEP 3)."""
    raw = reply.get(b"peers", b"")
    if isinstance(raw, bytes):
        return [
            (socket.inet_ntoa(raw[i : i + 4]), int.from_bytes(raw[i + 4 : i + 6], "big"))
            for i in range(0, len(raw) - len(raw) % 6, 6)
        ]
    return [(p[b"ip"].decode(), int(p[b"port"])) for p in raw]


def tracker_peers(announce_url: str, infohash: bytes) -> list[tuple[str, int]]:
    """Who the tracker hands out for ``infohash`` (asked as a probe peer that leaves at once).

    The probe peer, 127.0.0.1:1, is in the swarm only between its two announces; a client that
    gets it meanwhile sees a refused connection. Raises if the tracker refuses the infohash.
    """
    reply = announce(announce_url, infohash, _PROBE_PEER_ID, _PROBE_PORT, left=1, numwant=200)
    if b"failure reason" in reply:
        raise RuntimeError(f"tracker refused {infohash.hex()}: {reply[b'failure reason']!r}")
    announce(announce_url, infohash, _PROBE_PEER_ID, _PROBE_PORT, left=1, event="stopped")
    return [peer for peer in _peers(reply) if peer[1] != _PROBE_PORT]


def wait_for_peer(
    announce_url: str, infohash: bytes, port: int, *, host: str = "127.0.0.1", timeout: float = 15.0
) -> None:
    """Wait until the tracker hands out ``host:port`` for ``infohash`` (the peer has announced).

    Tracker-agnostic: use it with the project's tracker as with opentracker, e.g. to start a
    leecher only once the seed is known (aria2 announces about a second after it is ready).
    """
    poll_until(
        lambda: (host, port) in tracker_peers(announce_url, infohash),
        timeout,
        f"{host}:{port} to be in the swarm of {infohash.hex()} at {announce_url}",
        max_interval=0.1,
    )


@dataclass
class OpenTracker:
    """A running opentracker. Build it with :func:`opentracker`."""

    port: int
    rootdir: Path
    process: ManagedProcess
    allowed: set[bytes] = field(default_factory=set)
    udp: bool = False

    @property
    def announce_url(self) -> str:
        """``http://127.0.0.1:PORT/announce``."""
        return f"http://127.0.0.1:{self.port}/announce"

    @property
    def udp_announce_url(self) -> str:
        """``udp://127.0.0.1:PORT`` (only when started with ``udp=True``)."""
        if not self.udp:
            raise RuntimeError("opentracker was started without UDP")
        return f"udp://127.0.0.1:{self.port}"

    @property
    def whitelist_path(self) -> Path:
        return self.rootdir / "whitelist"

    def _write_whitelist(self) -> None:
        tmp = self.whitelist_path.with_suffix(".tmp")
        tmp.write_text("".join(f"{h.hex()}\n" for h in sorted(self.allowed)))
        tmp.chmod(0o644)
        os.replace(tmp, self.whitelist_path)

    def allow(self, infohash: bytes, timeout: float = 5.0) -> None:
        """Whitelist a 20-byte v1 infohash, reload (SIGHUP) and wait until it is accepted."""
        if len(infohash) != 20:
            raise ValueError(f"an infohash is 20 bytes, got {len(infohash)}")
        self.allowed.add(infohash)
        self._write_whitelist()
        self.process.send_signal(SIGHUP)
        self._wait_accepted(infohash, timeout)

    def _wait_accepted(self, infohash: bytes, timeout: float) -> None:
        self.process.wait_until(
            lambda: self._probe(infohash), timeout, f"opentracker to accept {infohash.hex()}"
        )

    def _probe(self, infohash: bytes) -> bool:
        """True once opentracker accepts announces for ``infohash``."""
        try:
            tracker_peers(self.announce_url, infohash)
        except RuntimeError:
            return False
        return True

    def scrape(self, infohash: bytes) -> ScrapeStats:
        """Scrape one infohash; all zero when the tracker knows no peer for it."""
        query = f"/scrape?info_hash={quote_from_bytes(infohash)}"
        reply = bencodepy.decode(_http_get("127.0.0.1", self.port, query))
        entry = reply.get(b"files", {}).get(infohash) if isinstance(reply, dict) else None
        if not entry:
            return ScrapeStats(0, 0, 0)
        return ScrapeStats(
            complete=int(entry.get(b"complete", 0)),
            incomplete=int(entry.get(b"incomplete", 0)),
            downloaded=int(entry.get(b"downloaded", 0)),
        )

    def wait_peers(
        self, infohash: bytes, *, seeders: int = 1, leechers: int = 0, timeout: float = 15.0
    ) -> ScrapeStats:
        """Wait until the tracker knows at least ``seeders`` seeders and ``leechers`` leechers."""

        def enough() -> ScrapeStats | None:
            self.process.check_alive()
            stats = self.scrape(infohash)
            ok = stats.complete >= seeders and stats.incomplete >= leechers
            return stats if ok else None

        return poll_until(
            enough,
            timeout,
            f"{seeders} seeder(s) and {leechers} leecher(s) of {infohash.hex()} on opentracker",
            max_interval=0.1,
        )


@contextmanager
def opentracker(
    workdir: Path,
    infohashes: Iterable[bytes] = (),
    *,
    start_timeout: float = 10.0,
    udp: bool = False,
) -> Iterator[OpenTracker]:
    """Run opentracker on ``127.0.0.1:<free port>`` with ``infohashes`` whitelisted (and on
    the same UDP port with ``udp=True``).

    Its config, chroot and log live under ``workdir``. On exit the tracker is stopped (SIGTERM,
    then SIGKILL), also when the body raised.
    """
    binary = require("opentracker")
    workdir.mkdir(parents=True, exist_ok=True)
    rootdir = workdir / "opentracker-root"
    rootdir.mkdir(exist_ok=True)
    rootdir.chmod(0o755)  # searchable by `nobody` after the chroot
    port = free_port()
    config = workdir / "opentracker.conf"
    config.write_text(
        f"listen.tcp 127.0.0.1:{port}\n"
        + (f"listen.udp 127.0.0.1:{port}\n" if udp else "")
        + f"tracker.rootdir {rootdir}\n"
        "tracker.user nobody\n"
        "access.whitelist whitelist\n"
    )
    process = ManagedProcess(
        [binary, "-f", str(config)],
        workdir / "opentracker.log",
        name="opentracker",
        cwd=rootdir,
    )
    tracker = OpenTracker(
        port=port, rootdir=rootdir, process=process, allowed=set(infohashes), udp=udp
    )
    for infohash in tracker.allowed:
        if len(infohash) != 20:
            raise ValueError(f"an infohash is 20 bytes, got {len(infohash)}")
    tracker._write_whitelist()
    with process:
        process.wait_port(port, timeout=start_timeout)
        for infohash in tracker.allowed:
            tracker._wait_accepted(infohash, start_timeout)
        yield tracker
