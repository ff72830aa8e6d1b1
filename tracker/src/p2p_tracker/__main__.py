"""Entry point: ``p2p-tracker --config FILE``.

Reads the settings once (file, then ``P2P_TRACKER_*`` environment), sets up logging and
runs :func:`p2p_tracker.service.serve`. SIGTERM or SIGINT stops gracefully (exit 0); a
second signal stops at once. A configuration error prints one line naming the key and
exits 2; failing to listen exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from p2p_common import logs
from p2p_common.settings import ConfigError
from p2p_tracker import __version__
from p2p_tracker.service import serve
from p2p_tracker.settings import TrackerSettings

log = logging.getLogger("p2p.tracker")


async def _run(settings: TrackerSettings) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stop.is_set():
                        logs.event(log, "tracker.signal", signal=name, action="stop now")
                        nursery.cancel_scope.cancel()
                        return
                    logs.event(log, "tracker.signal", signal=name, action="graceful stop")
                    stop.set()

            nursery.start_soon(watch)
            await serve(settings, shutdown_trigger=stop.wait)
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2p-tracker", description="p2p BitTorrent tracker")
    parser.add_argument("--config", help="YAML configuration file (the mounted ConfigMap)")
    parser.add_argument("--version", action="version", version=f"p2p-tracker {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = TrackerSettings.load(args.config)
    except ConfigError as exc:
        print(f"p2p-tracker: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    logs.event(log, "tracker.starting", version=__version__, **settings.dump())
    failure: BaseException | None = None
    try:
        trio.run(_run, settings)
    except* OSError as group:
        failure = group
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
    if failure is not None:
        print(f"p2p-tracker: listen: cannot serve on {settings.listen}: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
