"""Entry point: ``p2p-proxy --config FILE`` (see :mod:`p2p_common.service_main`),
``p2p-proxy preheat IMAGE`` (see :mod:`p2p_proxy.preheat_cli`) and ``p2p-proxy status`` (see
:mod:`p2p_proxy.status_cli`).

A graceful stop lets in-flight requests finish for ``shutdownTimeout`` seconds and announces
``stopped`` for every seeded torrent.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from p2p_common.service_main import run_service
from p2p_proxy import __version__
from p2p_proxy.preheat_cli import main as preheat_main
from p2p_proxy.service import serve
from p2p_proxy.settings import ProxySettings


async def _serve(
    settings: ProxySettings, _config: Path | None, stop: Callable[[], Awaitable[object]]
) -> None:
    await serve(settings, shutdown_trigger=stop)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["preheat"]:
        return preheat_main(args[1:])
    if args[:1] == ["status"]:
        from p2p_proxy.status_cli import main as status_main  # noqa: PLC0415 - only here: rich

        return status_main(args[1:])
    return run_service(
        "proxy",
        description="p2p raw seed and origin proxy",
        version=__version__,
        settings_class=ProxySettings,
        serve=_serve,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
