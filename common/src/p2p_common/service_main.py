"""The shared command line of the three services: ``p2p-<service> --config FILE``.

Reads the settings once (file, then ``P2P_<SERVICE>_*`` environment), sets up logging and
runs the service's ``serve``. The first SIGTERM or SIGINT asks for a graceful stop
(``serve``'s ``shutdown_trigger`` returns); a second one stops at once. Exit codes: 0 after
a stop, 2 for a configuration error (one line naming the key), 1 when a port cannot be
bound or the service cannot start.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from p2p_common import logs
from p2p_common.settings import ConfigError, ServiceSettings

S = TypeVar("S", bound=ServiceSettings)

GC_THRESHOLDS = (20_000, 50, 100)
"""The cyclic garbage collector's generation thresholds (Python's are 700, 10, 10). Every
block, event and cancel scope is a short-lived object; with the default thresholds the
collector ran thousands of times a second in a busy agent and took a fifth of its CPU
(py-spy, 16-node rollout, docs/benchmarks.md). Objects freed by reference counting never
reach it; the few cycles wait a little longer."""


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one (every seeded blob holds a file
    and every peer a socket; the default 1,024 is a few hundred cached blobs). Returns the
    (before, after) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft, soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def tune_gc() -> None:
    """Collect once, freeze what start-up made (modules, settings, schemas: never garbage),
    and raise the thresholds (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


Serve = Callable[[S, Path | None, Callable[[], Awaitable[object]]], Awaitable[None]]
"""How to run a service: ``(settings, config_file, shutdown_trigger)``."""


async def _run(name: str, serve: Serve[S], settings: S, config_file: Path | None) -> None:
    log = logging.getLogger(f"p2p.{name}")
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    signal_name = signal.Signals(signum).name
                    if stop.is_set():
                        logs.event(log, f"{name}.signal", signal=signal_name, action="stop now")
                        nursery.cancel_scope.cancel()
                        return
                    logs.event(log, f"{name}.signal", signal=signal_name, action="graceful stop")
                    stop.set()

            nursery.start_soon(watch)
            await serve(settings, config_file, stop.wait)
            nursery.cancel_scope.cancel()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    failure: BaseException = group
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    return failure


def run_service(
    name: str,
    *,
    description: str,
    version: str,
    settings_class: type[S],
    serve: Serve[S],
    argv: list[str] | None = None,
) -> int:
    """Parse the command line and run the service until it stops; returns the exit code."""
    prog = f"p2p-{name}"
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML configuration file (the mounted ConfigMap)")
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    args = parser.parse_args(argv)
    try:
        settings = settings_class.load(args.config)
    except ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    log = logging.getLogger(f"p2p.{name}")
    logs.event(log, f"{name}.starting", version=version, **settings.dump())
    config_file = Path(args.config) if args.config else None
    before, after = raise_open_files_limit()
    if after != before:
        logs.event(log, f"{name}.open_files", limit=after, was=before)
    tune_gc()
    config_error: BaseException | None = None
    start_error: BaseException | None = None
    try:
        trio.run(_run, name, serve, settings, config_file)
    except* ConfigError as group:
        config_error = _first(group)
    except* OSError as group:
        start_error = _first(group)
    if config_error is not None:
        print(f"{prog}: configuration error: {config_error}", file=sys.stderr)
        return 2
    if start_error is not None:
        print(f"{prog}: cannot listen or start: {start_error}", file=sys.stderr)
        return 1
    return 0
