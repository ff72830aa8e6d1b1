"""Single flight: concurrent callers asking for the same key share one run of the work.

The work runs as a child of a long-lived nursery (the service's), not of the caller that
started it, so a caller that goes away (an agent hanging up) does not cancel a fetch other
callers are waiting for. Every caller gets the result, or its own copy of the
:class:`~p2p_common.oci.OCIError` the work raised. An unexpected exception is logged and
turned into a 500 for the waiters; cancellation of the nursery (shutdown) becomes a 503.

A caller may bring an :class:`Admission` (its request's claim on origin work,
:class:`p2p_proxy.limits.Requester`): it is asked only when the caller would start the work,
never when the caller joins a run already going, and may refuse (the caller gets the refusal,
nothing starts). What it returns is called when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import trio

from p2p_common.oci import ErrorCode, OCIError

__all__ = ["Admission", "Flight", "SingleFlight", "copy_error"]

log = logging.getLogger("p2p.proxy")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def copy_error(error: OCIError) -> OCIError:
    """A fresh exception with the same content (one instance must not be raised by many tasks)."""
    return OCIError(
        error.code, error.message, status=error.status, detail=error.detail, headers=error.headers
    )


class Admission(Protocol):
    """Who decides whether work may start on a caller's behalf."""

    def admit(self) -> Callable[[], None]:
        """Let the work start (returns what to call once it ended), or raise the refusal
        (an :class:`~p2p_common.oci.OCIError`)."""
        ...


@dataclass
class Flight(Generic[T]):
    """One run of the work, as the callers see it."""

    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: OCIError | None = None


class SingleFlight(Generic[K, T]):
    """Runs ``work`` once per key at a time; see the module docstring."""

    def __init__(
        self, nursery: trio.Nursery, what: str, *, on_join: Callable[[], None] | None = None
    ) -> None:
        self._nursery = nursery
        self._what = what
        self._on_join = on_join
        """Called whenever a caller joins a run already going (a metric)."""
        self._flights: dict[K, Flight[T]] = {}
        self.started = 0
        """How many times work was actually run (for tests and metrics)."""
        self.joined = 0
        """How many callers joined a run already going."""

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    def forget(self, key: K) -> None:
        """The run for ``key`` has failed, though it has not returned yet: callers from now on
        start a new run instead of joining it (those already waiting get its result)."""
        self._flights.pop(key, None)

    def start(
        self, key: K, work: Callable[[], Awaitable[T]], *, admission: Admission | None = None
    ) -> Flight[T]:
        """Make sure ``work()`` runs for ``key`` (now, or the run already going); don't wait.
        Raises the admission's refusal when it would start the work."""
        flight = self._flights.get(key)
        if flight is not None:
            self.joined += 1
            if self._on_join is not None:
                self._on_join()
            return flight
        ended = admission.admit() if admission is not None else None
        flight = self._flights[key] = Flight()
        try:
            self._nursery.start_soon(self._lead, key, flight, work, ended)
        except BaseException:
            del self._flights[key]
            if ended is not None:
                ended()
            raise
        self.started += 1
        return flight

    async def run(
        self, key: K, work: Callable[[], Awaitable[T]], *, admission: Admission | None = None
    ) -> T:
        """The result of ``work()`` for ``key``: started now, or the run already going."""
        flight = self.start(key, work, admission=admission)
        await flight.done.wait()
        if flight.error is not None:
            raise copy_error(flight.error)
        return flight.result  # type: ignore[return-value]  # set whenever error is None

    async def _lead(
        self,
        key: K,
        flight: Flight[T],
        work: Callable[[], Awaitable[T]],
        ended: Callable[[], None] | None,
    ) -> None:
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
            if ended is not None:
                ended()
            flight.done.set()
