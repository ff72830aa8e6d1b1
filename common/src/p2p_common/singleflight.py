"""Single flight: concurrent callers asking for the same key share one run of the work.

The first caller for a key starts ``work()``; callers with the same key that come while it
runs wait for the same run. The run is a task of a long-lived nursery (the service's), not of
the caller that started it: a caller that goes away (a client hanging up) cancels only its own
wait, never a run others are waiting for.

Every waiter gets the result, or raises its own exception for the failure: ``share(error)``
makes one per waiter (one exception object must not be raised by many tasks); the default
is a :class:`FlightError` caused by the work's exception. A run the nursery cancels (the
service is stopping) fails with :class:`FlightCancelledError`, so nobody waits forever.

A failed run is forgotten before its waiters wake: the next caller starts a new run instead of
getting the old error. :meth:`SingleFlight.forget` does that earlier, for work that knows it
has failed before it returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar, cast

import trio

from p2p_common.errors import P2PError

__all__ = ["Flight", "FlightCancelledError", "FlightError", "SingleFlight"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class FlightError(P2PError):
    """A waiter's own error for a failed run; ``__cause__`` is what the work raised."""


class FlightCancelledError(P2PError):
    """The run was cancelled before it ended (its nursery is closing)."""


def _wrapped(error: BaseException) -> BaseException:
    if isinstance(error, FlightCancelledError):
        return FlightCancelledError(str(error))
    shared = FlightError(f"{type(error).__name__}: {error}")
    shared.__cause__ = error
    return shared


class Flight(Generic[T]):
    """One run of the work, as its waiters see it."""

    __slots__ = ("_result", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        """Set when the run has ended (with a result or an error)."""
        self.error: BaseException | None = None
        """What the work raised (or a :class:`FlightCancelledError`), once done."""
        self._result: T | None = None


class SingleFlight(Generic[K, T]):
    """Runs ``work`` once per key at a time in ``nursery``; see the module docstring."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        share: Callable[[BaseException], BaseException] = _wrapped,
        on_join: Callable[[], None] | None = None,
    ) -> None:
        self._nursery = nursery
        self._share = share
        self._on_join = on_join
        """Called whenever a caller joins a run already going (a metric)."""
        self._flights: dict[K, Flight[T]] = {}
        self.started = 0
        """How many runs were started."""
        self.joined = 0
        """How many callers joined a run already going."""

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    def forget(self, key: K) -> None:
        """The run for ``key`` has failed, though it has not returned yet: callers from now on
        start a new run instead of joining it (those already waiting get its outcome)."""
        self._flights.pop(key, None)

    def start(self, key: K, work: Callable[[], Awaitable[T]]) -> Flight[T]:
        """Make sure ``work()`` runs for ``key`` (now, or the run already going); don't wait."""
        flight = self._flights.get(key)
        if flight is not None:
            self.joined += 1
            if self._on_join is not None:
                self._on_join()
            return flight
        flight = self._flights[key] = Flight()
        try:
            self._nursery.start_soon(self._lead, key, flight, work)
        except BaseException:
            del self._flights[key]
            raise
        self.started += 1
        return flight

    async def run(self, key: K, work: Callable[[], Awaitable[T]]) -> T:
        """The result of ``work()`` for ``key``: started now, or the run already going."""
        return await self.wait(self.start(key, work))

    async def wait(self, flight: Flight[T]) -> T:
        """The result of ``flight``, once it has ended; raises this waiter's own error."""
        await flight.done.wait()
        return self.outcome(flight)

    def outcome(self, flight: Flight[T]) -> T:
        """The result of an ended flight, or this caller's own error for its failure."""
        if not flight.done.is_set():
            raise RuntimeError("the flight has not ended yet")
        if flight.error is not None:
            raise self._share(flight.error)
        return cast("T", flight._result)  # set whenever error is None

    async def _lead(self, key: K, flight: Flight[T], work: Callable[[], Awaitable[T]]) -> None:
        try:
            flight._result = await work()
        except Exception as exc:
            flight.error = exc
        except BaseException:  # trio.Cancelled (or a group holding it): the nursery is closing
            flight.error = FlightCancelledError("cancelled: the service is stopping")
            raise
        finally:
            # Forgotten before the waiters wake: a caller after a failure starts a new run.
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()
