"""The proxy's single flight: :class:`p2p_common.singleflight.SingleFlight` with registry
errors and admission.

The work runs in the service's nursery, so a caller that goes away (an agent hanging up) does
not cancel a fetch other callers are waiting for. Every caller gets the result, or its own copy
of the :class:`~p2p_common.oci.OCIError` the work raised. An unexpected exception is logged
and turned into a 500 for the waiters; cancellation of the nursery (shutdown) becomes a 503.

A caller may bring an :class:`Admission` (its request's claim on origin work,
:class:`p2p_proxy.limits.Requester`): it is asked only when the caller would start the work,
never when the caller joins a run already going, and may refuse (the caller gets the refusal,
nothing starts). What it returns is called when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Protocol, TypeVar

import trio

from p2p_common import singleflight
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.singleflight import Flight

__all__ = ["Admission", "Flight", "SingleFlight", "registry_error"]

log = logging.getLogger("p2p.proxy")

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def registry_error(error: BaseException) -> OCIError:
    """A waiter's own registry error for what a run raised: a copy of its
    :class:`~p2p_common.oci.OCIError`, 503 if it was cancelled, else 500."""
    if isinstance(error, OCIError):
        return error.copy()
    if isinstance(error, singleflight.FlightCancelledError):
        return OCIError(ErrorCode.UNKNOWN, "the proxy is shutting down", status=503)
    return OCIError(ErrorCode.UNKNOWN, "internal error", status=500)


class Admission(Protocol):
    """Who decides whether work may start on a caller's behalf."""

    def admit(self) -> Callable[[], None]:
        """Let the work start (returns what to call once it ended), or raise the refusal
        (an :class:`~p2p_common.oci.OCIError`)."""
        ...


class SingleFlight(singleflight.SingleFlight[K, T]):
    """Runs ``work`` once per key at a time; see the module docstring."""

    def __init__(
        self, nursery: trio.Nursery, what: str, *, on_join: Callable[[], None] | None = None
    ) -> None:
        super().__init__(nursery, share=registry_error, on_join=on_join)
        self._what = what

    def start(
        self, key: K, work: Callable[[], Awaitable[T]], *, admission: Admission | None = None
    ) -> Flight[T]:
        """Make sure ``work()`` runs for ``key`` (now, or the run already going); don't wait.
        Raises the admission's refusal when it would start the work."""
        if admission is None or self.in_flight(key):
            return super().start(key, self._guarded(work, None))
        ended = admission.admit()
        try:
            return super().start(key, self._guarded(work, ended))
        except BaseException:
            ended()
            raise

    async def run(
        self, key: K, work: Callable[[], Awaitable[T]], *, admission: Admission | None = None
    ) -> T:
        """The result of ``work()`` for ``key``: started now, or the run already going."""
        return await self.wait(self.start(key, work, admission=admission))

    def _guarded(
        self, work: Callable[[], Awaitable[T]], ended: Callable[[], None] | None
    ) -> Callable[[], Awaitable[T]]:
        """``work`` that raises only registry errors (a bug is logged, then a 500) and ends
        its admission's claim when it ends."""

        async def guarded() -> T:
            try:
                return await work()
            except OCIError:
                raise
            except Exception as exc:
                log.error("%s.crashed", self._what, exc_info=exc)
                raise OCIError(
                    ErrorCode.UNKNOWN, f"internal error in {self._what}", status=500
                ) from None
            finally:
                if ended is not None:
                    ended()

        return guarded
