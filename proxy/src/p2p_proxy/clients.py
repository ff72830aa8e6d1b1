"""Per-client limits on origin work, pure (the time is passed in): may this client start more?

A client is the source address of a request. In a cluster every agent is its node's address
(agents run with hostNetwork); any pod can reach the proxy API too, with its pod address. Origin
work is what the proxy does at an origin on a client's behalf: a blob fetch, a manifest request.
A request that joins work another request already started (single flight) or is answered from
the cache starts nothing, and costs its client nothing.

:class:`ClientLimits` keeps, per client address:

- how many origin requests it started that are still in progress: at most ``concurrency``
  (``originRequestsPerAddress``) at once;
- a token bucket of requests that start origin work: ``rate`` a second (``originRatePerAddress``),
  up to ``burst`` at once (``originBurstPerAddress``). A bucket starts full and never runs into
  debt: a refused request takes no token, so a client that waits as told gets through.

Memory is bounded. In-progress counts exist only while the work runs (each one is an origin
request in progress, itself bounded). Buckets are kept in least-recently-used order, at most
``max_clients`` of them; a bucket that has filled up again is the same as none and is dropped,
and one dropped by the bound comes back full (only a client silent for longest gains from it).

(:class:`p2p_common.ratelimit.TokenBucket` measures bytes: its burst is at least 16 KiB, it
starts empty and runs into debt, which suits pacing a transfer, not refusing a request.)
"""

from __future__ import annotations

import collections
import ipaddress
import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CONCURRENCY_RETRY_AFTER",
    "MAX_CLIENTS",
    "ClientLimits",
    "Refusal",
    "client_key",
    "retry_after_header",
]

MAX_CLIENTS = 16384
"""Token buckets kept at most (about 150 bytes each): every node of a large cluster, plus pods."""
CONCURRENCY_RETRY_AFTER = 1.0
"""Seconds a client over its concurrency limit is told to wait (when its own work ends is
unknown; blob fetches run for seconds)."""
_EPSILON = 1e-9
"""Slack for float arithmetic: a client that waited exactly ``retry_after`` gets its token."""


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait of ``seconds``."""
    if math.isnan(seconds) or seconds <= 1:
        return "1"
    if math.isinf(seconds):
        return str(24 * 3600)
    return str(min(math.ceil(seconds), 24 * 3600))


def client_key(host: str) -> str:
    """The key of a client address: the address in its canonical spelling, an IPv4-mapped
    IPv6 address as its IPv4 address, without an IPv6 zone. Anything that is not an IP
    address is kept as it is (a server that reports something else)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.scope_id is not None:
            return str(ipaddress.IPv6Address(host.partition("%")[0]))
    return str(address)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client may not start origin work now, and when to try again."""

    reason: Literal["requests", "rate"]
    """``requests``: too many in progress; ``rate``: started too many too fast."""
    retry_after: float
    """Seconds to wait before asking again."""


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class ClientLimits:
    """Origin work per client address; see the module docstring. ``concurrency`` 0 and
    ``rate`` 0 each mean no limit of that kind."""

    def __init__(
        self, *, concurrency: int, rate: float, burst: int, max_clients: int = MAX_CLIENTS
    ) -> None:
        if concurrency < 0 or not rate >= 0 or math.isinf(rate):
            raise ValueError("concurrency and rate must be >= 0 and finite")
        if rate and burst < 1:
            raise ValueError("burst must be >= 1")
        if max_clients < 1:
            raise ValueError("max_clients must be >= 1")
        self.concurrency = concurrency
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_clients = max_clients
        self._running: dict[str, int] = {}
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def __len__(self) -> int:
        """Clients with a bucket (not full) or work in progress: what memory is held for."""
        return len(self._buckets.keys() | self._running.keys())

    def running(self, client: str) -> int:
        """Origin requests ``client`` started that are still in progress."""
        return self._running.get(client, 0)

    def tokens(self, client: str, now: float) -> float:
        """Requests ``client`` may start now as far as the rate goes (``burst`` if unlimited)."""
        bucket = self._buckets.get(client)
        return self.burst if bucket is None else self._refilled(bucket, now)

    def start(self, client: str, now: float, *, charge: bool = True) -> Refusal | None:
        """Let ``client`` start one origin request (None: go ahead, and call :meth:`finish`
        when it ends), or say why not. ``charge`` False starts it without taking a token (a
        further origin request of a request that already paid)."""
        if self.concurrency and self.running(client) >= self.concurrency:
            return Refusal("requests", CONCURRENCY_RETRY_AFTER)
        if charge and self.rate:
            wait = self._take(client, now)
            if wait > 0:
                return Refusal("rate", wait)
        self._running[client] = self.running(client) + 1
        return None

    def finish(self, client: str) -> None:
        """An origin request ``client`` started has ended."""
        count = self._running.get(client, 0)
        if count <= 1:
            self._running.pop(client, None)
        else:
            self._running[client] = count - 1

    # --- the buckets ----------------------------------------------------------------------

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        elapsed = max(0.0, now - bucket.stamp)
        return min(self.burst, bucket.tokens + elapsed * self.rate)

    def _take(self, client: str, now: float) -> float:
        """Take a token for ``client``: 0, or the seconds until there is one (none taken)."""
        bucket = self._buckets.get(client)
        tokens = self.burst if bucket is None else self._refilled(bucket, now)
        if tokens < 1 - _EPSILON:
            return (1 - tokens) / self.rate
        tokens = max(0.0, tokens - 1)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(tokens, now)
        else:
            bucket.tokens, bucket.stamp = tokens, max(bucket.stamp, now)
            self._buckets.move_to_end(client)
        self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        """Drop the least recently used buckets that are full again, and any beyond the bound."""
        while self._buckets:
            oldest, bucket = next(iter(self._buckets.items()))
            if len(self._buckets) <= self.max_clients and self._refilled(bucket, now) < self.burst:
                break
            del self._buckets[oldest]
