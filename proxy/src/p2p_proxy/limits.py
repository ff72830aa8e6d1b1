"""Limits on the origin work clients can make the proxy do (docs/proxy-api.md, "Limits").

The proxy API is reachable from every pod. Without limits any pod could make the proxy fetch
and seed arbitrary large blobs (evicting the hot ones from its cache) and spend its origin
rate limit. Three limits, all on work that goes to an origin (cache hits and requests that join
work already running are free):

- per client address, origin requests it started that are in progress
  (``originRequestsPerAddress``) and new ones a second (``originRatePerAddress``, with a burst
  of ``originBurstPerAddress``): beyond them ``429 TOOMANYREQUESTS`` with ``Retry-After``
  (:mod:`p2p_proxy.clients` keeps the counts);
- for the whole proxy, distinct blob fetches running at once (``maxOriginFetches``): a new one
  waits for a slot, at most ``originQueueTimeout`` seconds, then fails with ``503`` and
  ``Retry-After`` for everyone waiting on it (the agent then asks the next proxy).

Beside the limits, the order of large fetches: :meth:`OriginLimits.fetch_line` holds a large
blob's fetch until its turn at its origin (``largeFetchesPerOrigin`` at once, in the order
asked: :mod:`p2p_proxy.fetchline`); it waits for as long as the fetches ahead progress and is
never refused for it.

Addresses in ``uncappedAddresses`` (loopback by default) have no per-client limits.

:class:`OriginLimits` is built once per proxy; the handler gets a :class:`Requester` for each
request and hands it down to the single flights (:class:`p2p_proxy.flight.Admission`), which
ask it only when they start work.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager

import trio

from p2p_common.oci import ErrorCode, OCIError
from p2p_proxy.clients import ClientLimits, Refusal, client_key, retry_after_header
from p2p_proxy.fetchline import FetchLine, in_line, no_progress
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.settings import ProxySettings

__all__ = ["BUSY_RETRY_AFTER", "OriginLimits", "Requester"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

BUSY_RETRY_AFTER = 5.0
"""Seconds a request refused because ``maxOriginFetches`` stayed full is told to wait."""
UNKNOWN_CLIENT = "unknown"
"""The key of requests whose source address the server did not report (all share it)."""


class OriginLimits:
    """The proxy's limits on origin work; see the module docstring."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        *,
        requests_per_address: int = 0,
        rate_per_address: float = 0.0,
        burst_per_address: int = 1,
        uncapped: Sequence[Network] = (),
        max_fetches: int = 0,
        queue_timeout: float = 0.0,
        line_width: int = 0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.metrics = metrics
        self.clients = ClientLimits(
            concurrency=requests_per_address, rate=rate_per_address, burst=burst_per_address
        )
        self.uncapped = tuple(uncapped)
        self.max_fetches = max_fetches
        self.queue_timeout = queue_timeout
        self._clock = clock
        self._slots = trio.Semaphore(max_fetches) if max_fetches else None
        self.fetches_running = 0
        self.fetches_waiting = 0
        self.line_width = line_width
        self._lines: dict[str, FetchLine] = {}
        self._line_changed = trio.Event()
        self.fetches_in_line = 0

    @classmethod
    def from_settings(cls, settings: ProxySettings, metrics: ProxyMetrics) -> OriginLimits:
        return cls(
            metrics,
            requests_per_address=settings.origin_requests_per_address,
            rate_per_address=settings.origin_rate_per_address,
            burst_per_address=settings.origin_burst_per_address,
            uncapped=settings.uncapped_addresses,
            max_fetches=settings.max_origin_fetches,
            queue_timeout=settings.origin_queue_timeout,
            line_width=settings.large_fetches_per_origin,
        )

    def requester(self, client: tuple[str, int] | None) -> Requester:
        """The claim of one request from ``client`` (host, port) on origin work."""
        if client is None:
            return Requester(self, UNKNOWN_CLIENT)
        key = client_key(client[0])
        try:
            address = ipaddress.ip_address(key)
        except ValueError:
            return Requester(self, key)
        if any(address in network for network in self.uncapped):
            return Requester(self, None)
        return Requester(self, key)

    @asynccontextmanager
    async def fetch_slot(self) -> AsyncIterator[None]:
        """Hold one of the ``maxOriginFetches`` slots of blob fetches for the block; waits at
        most ``originQueueTimeout`` seconds for it, else raises a 503."""
        if self._slots is None:
            yield
            return
        acquired = False
        try:
            self._slots.acquire_nowait()
            acquired = True
        except trio.WouldBlock:
            self._waiting(+1)
            try:
                with trio.move_on_after(self.queue_timeout):
                    await self._slots.acquire()
                    acquired = True
            finally:
                self._waiting(-1)
        if not acquired:
            self.metrics.origin_refusals.labels(reason="busy").inc()
            raise OCIError(
                ErrorCode.UNKNOWN,
                f"the proxy is busy: {self.max_fetches} origin fetches are running "
                "(maxOriginFetches); try again or ask another proxy",
                status=503,
                headers={"Retry-After": retry_after_header(BUSY_RETRY_AFTER)},
            )
        self._running(+1)
        try:
            yield
        finally:
            self._running(-1)
            self._slots.release()

    @asynccontextmanager
    async def fetch_line(
        self, origin: str, key: Hashable, size: int | None
    ) -> AsyncIterator[Callable[[int], None]]:
        """Wait for the turn of the fetch ``key`` of a ``size``-byte blob at ``origin``, then
        hold its place for the block, which reports the bytes received in all to the callable
        it gets. Small blobs and blobs of unknown size go at once."""
        if size is None or not in_line(size, self.line_width):
            yield no_progress
            return
        line = self._lines.get(origin)
        if line is None:
            line = self._lines[origin] = FetchLine(self.line_width)
        try:
            if not line.ask(key, size, self._clock()):
                self._in_line(+1)
                try:
                    while not line.may_start(key, self._clock()):
                        wake = line.next_change(self._clock())
                        with trio.move_on_at(math.inf if wake is None else wake):
                            await self._line_changed.wait()
                finally:
                    self._in_line(-1)

            def progress(received: int) -> None:
                if line.progress(key, received, self._clock()):
                    self._wake_line()

            yield progress
        finally:
            line.leave(key)
            if not line and self._lines.get(origin) is line:
                del self._lines[origin]
            self._wake_line()

    def _wake_line(self) -> None:
        self._line_changed.set()
        self._line_changed = trio.Event()

    def _in_line(self, delta: int) -> None:
        self.fetches_in_line += delta
        self.metrics.origin_fetches_in_line.inc(delta)

    def _waiting(self, delta: int) -> None:
        self.fetches_waiting += delta
        self.metrics.origin_fetches_waiting.inc(delta)

    def _running(self, delta: int) -> None:
        self.fetches_running += delta
        self.metrics.origin_fetches_running.inc(delta)

    def start(self, key: str, *, charge: bool) -> None:
        """Count one origin request started by client ``key`` (see
        :meth:`ClientLimits.start`), or raise its 429."""
        refusal = self.clients.start(key, self._clock(), charge=charge)
        if refusal is not None:
            self.metrics.origin_refusals.labels(reason=refusal.reason).inc()
            raise _refused(refusal)


def _refused(refusal: Refusal) -> OCIError:
    if refusal.reason == "requests":
        message = "too many origin requests in progress for this client (originRequestsPerAddress)"
    else:
        message = "this client starts origin requests too fast (originRatePerAddress)"
    return OCIError(
        ErrorCode.TOOMANYREQUESTS,
        message,
        headers={"Retry-After": retry_after_header(refusal.retry_after)},
    )


class Requester:
    """One request's claim on origin work (a :class:`p2p_proxy.flight.Admission`).

    The first origin request started on its behalf takes a token of its client's rate; every
    one counts against its client's requests in progress until it ends. ``key`` None: a
    client without per-client limits.
    """

    def __init__(self, limits: OriginLimits, key: str | None) -> None:
        self.limits = limits
        self.key = key
        self._charged = False

    def admit(self) -> Callable[[], None]:
        key = self.key
        if key is None:
            return _nothing
        self.limits.start(key, charge=not self._charged)
        self._charged = True
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.limits.clients.finish(key)

        return end


def _nothing() -> None:
    pass
