"""Entry point: ``p2p-proxy --config FILE``.

Reads the settings once (file, then ``P2P_PROXY_*`` environment), sets up logging and runs
:func:`p2p_proxy.service.serve`. SIGTERM or SIGINT stops gracefully: the API stops
accepting, in-flight requests get ``shutdownTimeout`` seconds, the engine announces
``stopped``, exit 0; a second signal stops at once. A configuration error prints one line
naming the key and exits 2; failing to listen exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from p2p_common import logs
from p2p_common.settings import ConfigError
from p2p_proxy import __version__
from p2p_proxy.service import serve
from p2p_proxy.settings import ProxySettings

log = logging.getLogger("p2p.proxy")


async def _run(settings: ProxySettings) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stop.is_set():
                        logs.event(log, "proxy.signal", signal=name, action="stop now")
                        nursery.cancel_scope.cancel()
                        return
                    logs.event(log, "proxy.signal", signal=name, action="graceful stop")
                    stop.set()

            nursery.start_soon(watch)
            await serve(settings, shutdown_trigger=stop.wait)
            nursery.cancel_scope.cancel()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    failure: BaseException = group
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    return failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2p-proxy", description="p2p raw seed and origin proxy")
    parser.add_argument("--config", help="YAML configuration file (the mounted ConfigMap)")
    parser.add_argument("--version", action="version", version=f"p2p-proxy {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = ProxySettings.load(args.config)
    except ConfigError as exc:
        print(f"p2p-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    logs.event(log, "proxy.starting", version=__version__, **settings.dump())
    config_error: BaseException | None = None
    start_error: BaseException | None = None
    try:
        trio.run(_run, settings)
    except* ConfigError as group:
        config_error = _first(group)
    except* OSError as group:
        start_error = _first(group)
    if config_error is not None:
        print(f"p2p-proxy: configuration error: {config_error}", file=sys.stderr)
        return 2
    if start_error is not None:
        print(f"p2p-proxy: cannot listen or start: {start_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
