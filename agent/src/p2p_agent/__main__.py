"""Entry point: ``p2p-agent --config FILE`` (see :mod:`p2p_common.service_main`),
``p2p-agent status`` (see :mod:`p2p_agent.status_cli`), ``p2p-agent cache ls | rm |
prune`` (see :mod:`p2p_agent.cache_cli`) and ``p2p-agent prefetch IMAGE...`` (see
:mod:`p2p_agent.prefetch_cli`).

A graceful stop closes the registry API to new requests, lets pulls in progress finish
(bounded) and announces ``stopped`` for every torrent. The config file is watched for new
``downloadRate``/``uploadRate`` and cache policy values.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from p2p_agent import __version__
from p2p_agent.service import serve
from p2p_agent.settings import AgentSettings
from p2p_common.service_main import run_service


async def _serve(
    settings: AgentSettings, config: Path | None, stop: Callable[[], Awaitable[object]]
) -> None:
    await serve(settings, config_file=config, shutdown_trigger=stop)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["status"]:
        from p2p_agent.status_cli import main as status_main  # noqa: PLC0415 - only here: rich

        return status_main(args[1:])
    if args[:1] == ["cache"]:
        from p2p_agent.cache_cli import main as cache_main  # noqa: PLC0415 - only here: rich

        return cache_main(args[1:])
    if args[:1] == ["prefetch"]:
        from p2p_agent.prefetch_cli import main as prefetch_main  # noqa: PLC0415 - a tool

        return prefetch_main(args[1:])
    return run_service(
        "agent",
        description="p2p node agent",
        version=__version__,
        settings_class=AgentSettings,
        serve=_serve,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
