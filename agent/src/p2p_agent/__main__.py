"""Entry point: ``p2p-agent --config FILE``.

Reads the settings once (file, then ``P2P_AGENT_*`` environment), sets up logging and
runs :func:`p2p_agent.service.serve`. SIGTERM or SIGINT stops gracefully: the registry
API stops accepting, in-flight pulls finish (bounded), torrents announce ``stopped``,
exit 0; a second signal stops at once. A configuration error prints one line naming
the key and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from p2p_agent import __version__
from p2p_agent.service import serve
from p2p_agent.settings import AgentSettings
from p2p_common import logs
from p2p_common.settings import ConfigError

log = logging.getLogger("p2p.agent")


async def _run(settings: AgentSettings, config_file: Path | None) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stop.is_set():
                        logs.event(log, "agent.signal", signal=name, action="stop now")
                        nursery.cancel_scope.cancel()
                        return
                    logs.event(log, "agent.signal", signal=name, action="graceful stop")
                    stop.set()

            nursery.start_soon(watch)
            await serve(settings, config_file=config_file, shutdown_trigger=stop.wait)
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2p-agent", description="p2p node agent")
    parser.add_argument("--config", help="YAML configuration file (the mounted ConfigMap)")
    parser.add_argument("--version", action="version", version=f"p2p-agent {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = AgentSettings.load(args.config)
    except ConfigError as exc:
        print(f"p2p-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_format)
    logs.event(log, "agent.starting", version=__version__, **settings.dump())
    failure: BaseException | None = None
    try:
        trio.run(_run, settings, Path(args.config) if args.config else None)
    except* OSError as group:
        failure = group
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
    if failure is not None:
        print(f"p2p-agent: cannot start: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
