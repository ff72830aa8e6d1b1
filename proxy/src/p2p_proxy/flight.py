"""Single flight: concurrent callers asking for the same key share one run of the work.

The work runs as a child of a long-lived nursery (the service's), not of the caller that
started it, so a caller that goes away (an agent hanging up) does not cancel a fetch other
callers are waiting for. Every caller gets the result, or its own copy of the
:class:`~p2p_common.oci.OCIError` the work raised. An unexpected exception is logged and
turned into a 500 for the waiters; cancellation of the nursery (shutdown) becomes a 503.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from p2p_common.oci import ErrorCode, OCIError

__all__ = ["SingleFlight", "copy_error"]

log = logging.getLogger("p2p.proxy")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def copy_error(error: OCIError) -> OCIError:
    """A fresh exception with the same content (one instance must not be raised by many tasks)."""
    return OCIError(
        error.code, error.message, status=error.status, detail=error.detail, headers=error.headers
    )


@dataclass
class _Flight(Generic[T]):
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: OCIError | None = None


class SingleFlight(Generic[K, T]):
    """Runs ``work`` once per key at a time; see the module docstring."""

    def __init__(self, nursery: trio.Nursery, what: str) -> None:
        self._nursery = nursery
        self._what = what
        self._flights: dict[K, _Flight[T]] = {}
        self.started = 0
        """How many times work was actually run (for tests and metrics)."""

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    def start(self, key: K, work: Callable[[], Awaitable[T]]) -> None:
        """Make sure ``work()`` runs for ``key`` (now, or the run already going); don't wait."""
        self._flight(key, work)

    def _flight(self, key: K, work: Callable[[], Awaitable[T]]) -> _Flight[T]:
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            self.started += 1
            self._nursery.start_soon(self._lead, key, flight, work)
        return flight

    async def run(self, key: K, work: Callable[[], Awaitable[T]]) -> T:
        """The result of ``work()`` for ``key``: started now, or the run already going."""
        flight = self._flight(key, work)
        await flight.done.wait()
        if flight.error is not None:
            raise copy_error(flight.error)
        return flight.result  # type: ignore[return-value]  # set whenever error is None

    async def _lead(self, key: K, flight: _Flight[T], work: Callable[[], Awaitable[T]]) -> None:
        try:
            flight.result = await work()
        except OCIError as exc:
            flight.error = exc
        except trio.Cancelled:
            flight.error = OCIError(ErrorCode.UNKNOWN, "the proxy is shutting down", status=503)
            raise
        except Exception as exc:
            log.error("%s.crashed", self._what, exc_info=exc)
            flight.error = OCIError(
                ErrorCode.UNKNOWN, f"internal error in {self._what}", status=500
            )
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()
