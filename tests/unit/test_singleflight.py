"""The single flight (p2p_common.singleflight): one run for concurrent callers, a failure
shared (one exception per waiter) and then forgotten, callers that leave, a cancelled run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from p2p_common.singleflight import FlightCancelledError, FlightError, SingleFlight


async def test_concurrent_callers_share_one_run(nursery: trio.Nursery) -> None:
    joins: list[None] = []
    flights: SingleFlight[str, int] = SingleFlight(nursery, on_join=lambda: joins.append(None))
    runs = 0
    release = trio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        this_run = runs
        await release.wait()
        return this_run * 10

    results: list[int] = []

    async def ask(key: str) -> None:
        results.append(await flights.run(key, work))

    async with trio.open_nursery() as callers:
        for _ in range(20):
            callers.start_soon(ask, "k")
        await trio.testing.wait_all_tasks_blocked()
        assert (runs, len(flights), flights.in_flight("k")) == (1, 1, True)
        callers.start_soon(ask, "other")  # another key: a run of its own
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert runs == 2
    assert sorted(results) == [10] * 20 + [20]
    assert (flights.started, flights.joined, len(joins)) == (2, 19, 19)
    assert not flights.in_flight("k")
    assert await flights.run("k", work) == 30  # a run that ended is not reused


async def test_a_failure_reaches_every_waiter_once_then_is_forgotten(
    nursery: trio.Nursery,
) -> None:
    flights: SingleFlight[str, int] = SingleFlight(nursery)
    release = trio.Event()
    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        await release.wait()
        if attempts == 1:
            raise ValueError("origin down")
        return 7

    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await flights.run("k", flaky)
        except FlightError as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers:
        for _ in range(5):
            callers.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert attempts == 1
    assert len(errors) == 5
    assert len({id(e) for e in errors}) == 5  # one instance per waiter
    causes = {id(e.__cause__) for e in errors}
    assert len(causes) == 1  # all caused by the work's own exception
    assert isinstance(errors[0].__cause__, ValueError)
    assert "origin down" in str(errors[0])
    # Forgotten before the waiters woke: the next caller runs the work again.
    assert not flights.in_flight("k")
    assert await flights.run("k", flaky) == 7
    assert attempts == 2


async def test_share_makes_each_waiter_its_own_exception(nursery: trio.Nursery) -> None:
    flights: SingleFlight[str, int] = SingleFlight(
        nursery, share=lambda error: KeyError(f"copy of {error}")
    )

    async def fail() -> int:
        raise LookupError("missing")

    with pytest.raises(KeyError, match="copy of missing"):
        await flights.run("k", fail)


async def test_a_caller_that_leaves_does_not_cancel_the_run(nursery: trio.Nursery) -> None:
    flights: SingleFlight[str, str] = SingleFlight(nursery)
    release = trio.Event()
    finished = trio.Event()

    async def work() -> str:
        await release.wait()
        finished.set()
        return "done"

    with trio.move_on_after(0.05):
        await flights.run("k", work)  # the caller that started it gives up
    assert flights.in_flight("k")
    waiter_result: list[str] = []

    async def wait_for_it() -> None:
        waiter_result.append(await flights.run("k", work))

    async with trio.open_nursery() as callers:
        callers.start_soon(wait_for_it)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert waiter_result == ["done"]
    assert finished.is_set()
    assert flights.started == 1


async def test_a_cancelled_run_fails_its_waiters_instead_of_leaving_them_waiting() -> None:
    outcomes: list[BaseException] = []

    async def work() -> int:
        await trio.sleep_forever()
        raise AssertionError("not reached")

    async with trio.open_nursery() as outer:
        service = trio.CancelScope()
        ready = trio.Event()
        holder: list[SingleFlight[str, int]] = []

        async def service_nursery() -> None:
            with service:
                async with trio.open_nursery() as inner:
                    holder.append(SingleFlight(inner))
                    ready.set()
                    await trio.sleep_forever()

        outer.start_soon(service_nursery)
        await ready.wait()
        flights = holder[0]

        async def ask() -> None:
            try:
                await flights.run("k", work)
            except FlightCancelledError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            service.cancel()  # the service stops: its nursery cancels the run
    assert len(outcomes) == 3
    assert len({id(e) for e in outcomes}) == 3
    assert not flights.in_flight("k")


async def test_forget_lets_the_next_caller_start_afresh(nursery: trio.Nursery) -> None:
    flights: SingleFlight[str, int] = SingleFlight(nursery)
    first_release, second_release = trio.Event(), trio.Event()
    results: list[int] = []

    async def first() -> int:
        flights.forget("k")  # knows it failed, before it returns
        await first_release.wait()
        return 1

    async def second() -> int:
        await second_release.wait()
        return 2

    async def ask(work: Callable[[], Awaitable[int]]) -> None:
        results.append(await flights.run("k", work))

    async with trio.open_nursery() as callers:
        callers.start_soon(ask, first)
        await trio.testing.wait_all_tasks_blocked()
        assert not flights.in_flight("k")
        callers.start_soon(ask, second)
        await trio.testing.wait_all_tasks_blocked()
        assert flights.started == 2
        second_release.set()
        await trio.testing.wait_all_tasks_blocked()
        first_release.set()
    assert results == [2, 1]


async def test_outcome_of_a_flight_that_has_not_ended_is_a_bug() -> None:
    async def never() -> int:
        await trio.sleep_forever()
        raise AssertionError("not reached")

    async with trio.open_nursery() as nursery:
        flights: SingleFlight[str, int] = SingleFlight(nursery)
        flight = flights.start("k", never)
        with pytest.raises(RuntimeError):
            flights.outcome(flight)
        nursery.cancel_scope.cancel()
