"""Entry point: ``p2p-tracker --config FILE`` (see :mod:`p2p_common.service_main`)."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from p2p_common.service_main import run_service
from p2p_tracker import __version__
from p2p_tracker.service import serve
from p2p_tracker.settings import TrackerSettings


async def _serve(
    settings: TrackerSettings, _config: Path | None, stop: Callable[[], Awaitable[object]]
) -> None:
    await serve(settings, shutdown_trigger=stop)


def main(argv: list[str] | None = None) -> int:
    return run_service(
        "tracker",
        description="p2p BitTorrent tracker",
        version=__version__,
        settings_class=TrackerSettings,
        serve=_serve,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
