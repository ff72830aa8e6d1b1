"""The p2p-tracker shell: hypercorn (trio worker) around :class:`~p2p_tracker.core.Tracker`.

Thin on purpose: the ASGI callable passes method, path, raw query bytes, the TCP source
address and the monotonic time to :meth:`Tracker.handle` and sends back what it returns.
A second task sweeps expired peers periodically.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from p2p_common.asgi import lifespan, use_closing_tcp_server
from p2p_common.logs import event
from p2p_common.settings import split_host_port
from p2p_tracker.core import Tracker
from p2p_tracker.settings import TrackerSettings

__all__ = ["TrackerApp", "hypercorn_config", "serve", "sweep_interval"]

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
"""Most peers one expiry step removes before letting requests through (a few ms)."""
GRACEFUL_TIMEOUT = 3.0
"""Seconds in-flight requests get to finish after a graceful stop begins."""


class TrackerApp:
    """The ASGI application."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            client = scope.get("client")
            method = scope["method"]
            reply = self.tracker.handle(
                method,
                scope["path"],
                scope["query_string"],
                client[0] if client else None,
                trio.current_time(),
                accept=_accept(scope),
            )
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
            await send(
                {"type": "http.response.body", "body": b"" if method == "HEAD" else reply.body}
            )
        elif kind == "lifespan":
            await lifespan(receive, send)


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


def sweep_interval(settings: TrackerSettings) -> float:
    """How often expired peers are swept: a quarter of ``peerExpiry``, between 1 and 30 s."""
    return float(max(1, min(30, settings.peer_expiry // 4)))


async def _sweep(tracker: Tracker, every: float) -> None:
    while True:
        await trio.sleep(every)
        now = trio.current_time()
        total = 0
        while True:
            removed = tracker.expire(now, limit=EXPIRE_BATCH)
            total += removed
            if removed < EXPIRE_BATCH:
                break
            await trio.lowlevel.checkpoint()  # let announces through between batches
        if total:
            event(log, "tracker.expired", logging.DEBUG, peers=total)


async def serve(
    settings: TrackerSettings,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run the tracker until cancelled or until ``shutdown_trigger`` returns.

    Reports the bound TCP port through ``task_status`` (so ``listen`` may use port 0).
    When ``shutdown_trigger`` returns, ``/readyz`` turns 503, the listener closes and
    in-flight requests get :data:`GRACEFUL_TIMEOUT` seconds; then :func:`serve` returns.
    Cancellation stops at once (a tracker holds no work worth waiting for).
    """
    tracker = Tracker(settings)
    app = TrackerApp(tracker)
    config = hypercorn_config(settings)
    use_closing_tcp_server()  # a connection its client closed while idle is closed at once

    async def trigger() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        tracker.ready = False
        event(log, "tracker.stopping")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sweep, tracker, sweep_interval(settings))
        async with trio.open_nursery() as server:
            binds: list[str] = await server.start(
                lambda task_status: hypercorn_serve(
                    cast(Any, app), config, shutdown_trigger=trigger, task_status=task_status
                )
            )
            host, port = split_host_port(binds[0].partition("://")[2])
            tracker.ready = True
            event(log, "tracker.listening", address=host, port=port)
            task_status.started(port)
        nursery.cancel_scope.cancel()
    event(log, "tracker.stopped")
