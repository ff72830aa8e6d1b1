"""The p2p-tracker shell: hypercorn (trio worker) and a UDP socket around
:class:`~p2p_tracker.core.Tracker`.

Thin on purpose: the ASGI callable passes method, path, raw query bytes, the TCP source
address and the monotonic time to :meth:`Tracker.handle` and sends back what it returns;
the UDP task (``udpListen``, BEP 15) passes each datagram, its source address and the time
to :meth:`Tracker.datagram` and sends back its answer, if any. A third task sweeps expired
peers periodically.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from p2p_common import udp_tracker_proto
from p2p_common.asgi import lifespan, use_closing_tcp_server
from p2p_common.batch_proto import BATCH_PATH, MAX_BATCH_BODY
from p2p_common.listen import hypercorn_binds, listen_addresses
from p2p_common.logs import event
from p2p_common.settings import split_listen
from p2p_common.tracker_proto import encode_failure
from p2p_tracker.core import Reply, Tracker
from p2p_tracker.settings import TrackerSettings

__all__ = ["TrackerApp", "hypercorn_config", "serve", "serve_udp", "sweep_interval"]

log = logging.getLogger("p2p.tracker")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_HEADER_BYTES = 16 * 1024
"""Request line plus headers (so the URL too) are cut off by hypercorn beyond this."""
READ_TIMEOUT = 10
"""Seconds a connection may stay silent in the middle of a request."""
KEEP_ALIVE_TIMEOUT = 10
"""Seconds an idle keep-alive connection is kept."""
EXPIRE_BATCH = 5000
"""Most peers one expiry step removes (or batched seeds it looks at) before letting requests
through (a few ms)."""
GRACEFUL_TIMEOUT = 3.0
"""Seconds in-flight requests get to finish after a graceful stop begins."""
UDP_BATCH = 64
"""Most datagrams answered per wake-up of the UDP task before other tasks get a turn."""
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
"""Socket receive buffer asked for (the kernel caps it at ``net.core.rmem_max``): room for
a burst of announces while the event loop is busy elsewhere; beyond it the kernel drops
datagrams and clients retransmit."""


class TrackerApp:
    """The ASGI application."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            client = scope.get("client")
            method = scope["method"]
            path = scope["path"]
            body = b""
            if method == "POST" and path == BATCH_PATH:
                try:
                    read = await _read_body(scope, receive, MAX_BATCH_BODY)
                except _ClientGoneError:
                    return  # nothing of a cut request is used
                if read is None:
                    await _send(send, _TOO_LARGE, method)
                    return
                body = read
            reply = self.tracker.handle(
                method,
                path,
                scope["query_string"],
                client[0] if client else None,
                trio.current_time(),
                accept=_accept(scope),
                body=body,
            )
            await _send(send, reply, method)
        elif kind == "lifespan":
            await lifespan(receive, send)


_TOO_LARGE = Reply(413, encode_failure(f"request body larger than {MAX_BATCH_BODY} bytes"))


class _ClientGoneError(Exception):
    """The client went away before the whole request body arrived."""


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, or None when it is (or says it will be) longer than ``limit``."""
    for name, value in scope.get("headers", []):
        if name == b"content-length" and (not value.isdigit() or int(value) > limit):
            return None
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _ClientGoneError
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def _send(send: Send, reply: Reply, method: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": [
                (b"content-type", reply.content_type),
                (b"content-length", b"%d" % len(reply.body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else reply.body})


def _accept(scope: Scope) -> str:
    """The request's ``Accept`` header lines, joined."""
    return ", ".join(v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"accept")


def hypercorn_config(settings: TrackerSettings) -> Config:
    """Hypercorn settings for the tracker: one plain-HTTP bind, no access log, tight bounds."""
    config = Config()
    config.bind = [settings.listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.backlog = 1024
    config.include_server_header = False
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.read_timeout = READ_TIMEOUT
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.graceful_timeout = GRACEFUL_TIMEOUT
    return config


def udp_socket(family: int, sockaddr: Any) -> socket.socket:
    """A bound, non-blocking UDP socket (an IPv6 one on ``::`` takes IPv4 clients too)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            wildcard = sockaddr[0] == "::"
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if wildcard else 1)
        with contextlib.suppress(OSError):  # some sandboxes refuse it; the default works
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_udp(
    tracker: Tracker,
    address: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer BEP 15 datagrams on ``address`` until cancelled; reports the bound port.

    One datagram in, at most one answer out, straight from :meth:`Tracker.datagram`. The
    task waits with trio until the socket is readable, then drains up to
    :data:`UDP_BATCH` datagrams with plain non-blocking calls (a trio socket call per
    datagram would cost two scheduler round trips each), so HTTP requests and the expiry
    sweep still get their turns under a flood. An answer the kernel will not take at once
    (full send buffer) is dropped and counted: a UDP client retransmits. A bug hit by one
    datagram is logged and costs that datagram only (as a 500 does over HTTP).
    """
    host, port = split_listen(address)
    try:
        family, bind_host = listen_addresses(address, socket.SOCK_DGRAM)[0]
        sock = udp_socket(family, (bind_host, port))
    except OSError as exc:
        raise OSError(exc.errno, f"udpListen {address}: {exc.strerror}") from None
    with sock:
        port = sock.getsockname()[1]
        event(log, "tracker.listening_udp", address=host, port=port)
        task_status.started(port)
        recvfrom, sendto = sock.recvfrom, sock.sendto
        datagram = tracker.datagram
        send_failed = tracker.udp_send_failed
        size = udp_tracker_proto.MAX_DATAGRAM
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(UDP_BATCH):
                try:
                    data, source = recvfrom(size)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. an ICMP error queued on the socket
                    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                        raise
                    continue
                try:
                    answer = datagram(data, source[0], now)
                except Exception:  # our bug: lose this datagram, not the tracker
                    log.exception("tracker.udp_error")
                    continue
                if answer is not None:
                    try:
                        sendto(answer, source)
                    except OSError:  # full buffer, unreachable: the client retransmits
                        send_failed.inc()


def sweep_interval(settings: TrackerSettings) -> float:
    """How often expired peers are swept: a quarter of ``peerExpiry`` (or of ``seedExpiry``
    when shorter), between 1 and 30 s."""
    return float(max(1, min(30, min(settings.peer_expiry, settings.seed_expiry) // 4)))


async def _sweep(tracker: Tracker, every: float) -> None:
    while True:
        await trio.sleep(every)
        now = trio.current_time()
        total = 0
        while True:
            total += tracker.expire(now, limit=EXPIRE_BATCH)
            if not tracker.expiry_due(now):
                break
            await trio.lowlevel.checkpoint()  # let announces through between steps
        if total:
            event(log, "tracker.expired", logging.DEBUG, peers=total)


async def serve(
    settings: TrackerSettings,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    udp_port: Callable[[int], object] | None = None,
) -> None:
    """Run the tracker until cancelled or until ``shutdown_trigger`` returns.

    Reports the bound TCP port through ``task_status`` (so ``listen`` may use port 0), and
    the bound UDP port (``udpListen``, when set) to ``udp_port`` before that. When
    ``shutdown_trigger`` returns, ``/readyz`` turns 503, the listeners close (the UDP socket
    at once) and in-flight HTTP requests get :data:`GRACEFUL_TIMEOUT` seconds; then
    :func:`serve` returns. Cancellation stops at once (a tracker holds no work worth
    waiting for).
    """
    tracker = Tracker(settings)
    udp_scope = trio.CancelScope()
    app = TrackerApp(tracker)
    config = hypercorn_config(settings)
    config.bind = hypercorn_binds(settings.listen)  # IPv4, IPv6, dual-stack: p2p_common.listen
    use_closing_tcp_server()  # a connection its client closed while idle is closed at once

    async def trigger() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        tracker.ready = False
        udp_scope.cancel()
        event(log, "tracker.stopping")

    async def run_udp(task_status: trio.TaskStatus[int]) -> None:
        with udp_scope:
            await serve_udp(tracker, settings.udp_listen, task_status=task_status)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sweep, tracker, sweep_interval(settings))
        if settings.udp_listen:
            bound = await nursery.start(run_udp)
            if udp_port is not None:
                udp_port(bound)
        async with trio.open_nursery() as server:
            binds: list[str] = await server.start(
                lambda task_status: hypercorn_serve(
                    cast(Any, app), config, shutdown_trigger=trigger, task_status=task_status
                )
            )
            host, port = split_listen(binds[0].partition("://")[2])
            tracker.ready = True
            event(log, "tracker.listening", address=host, port=port)
            task_status.started(port)
        nursery.cancel_scope.cancel()
    event(log, "tracker.stopped")
