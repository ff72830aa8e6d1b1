"""What ``p2p-agent status`` and ``p2p-proxy status`` share: reading a service's ``/status``,
printing it once (JSON or tables) or live, and the small formatting helpers of their tables.

This module imports rich: import it only from a status command (the services import their
status commands lazily, so a service that never shows a terminal view never loads rich).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from p2p_common.settings import ConfigError

__all__ = [
    "ago",
    "bar",
    "fetch",
    "none_row",
    "rate",
    "short",
    "show",
    "size",
    "table",
    "trackers_table",
]

Render = Callable[[dict[str, Any]], RenderableType]


def size(n: float | None) -> str:
    """Bytes in decimal units: ``1.5 MB``."""
    if n is None:
        return "-"
    units = ["B", "kB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.1f} {units[i]}" if i else f"{int(n)} B"


def rate(n: float | None) -> str:
    """A rate limit: ``unlimited`` for 0."""
    return f"{size(n)}/s" if n else "unlimited"


def ago(at: float | None, now: float) -> str:
    """How long ago Unix time ``at`` was (``never`` for none)."""
    if not at:
        return "never"
    seconds = max(0.0, now - at)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def short(digest: str) -> str:
    """The first 12 hex digits of a sha256 digest."""
    return digest.removeprefix("sha256:")[:12]


def bar(percent: float | None) -> RenderableType:
    if percent is None:
        return Text("-")
    return Group(ProgressBar(total=100, completed=percent, width=20), Text(f"{percent:5.1f}%"))


def table(title: str, columns: dict[str, JustifyMethod]) -> Table:
    """A full-width table; ``columns`` maps each header to its justification."""
    found = Table(title=title, title_justify="left", expand=True)
    for name, justify in columns.items():
        found.add_column(name, justify=justify)
    return found


def none_row(found: Table, text: str) -> None:
    """One dim row saying the table is empty."""
    found.add_row(Text(text, style="dim"), *([""] * (len(found.columns) - 1)))


def trackers_table(trackers: dict[str, Any], now: float, *, nothing: str) -> Table:
    """The ``trackers`` of a status document (agent or proxy): one row per instance announced
    to; when there is none yet, the listed URLs (or ``nothing``)."""
    found = table("trackers", {"instance": "left", "state": "left", "last answer": "left"})
    for tracker in trackers["instances"]:
        name = tracker["url"]
        if tracker["listed"] != tracker["url"]:
            name += f" ({tracker['listed']})"
        if tracker["ok"]:
            state = Text("answering", style="green")
            detail = f"{tracker['last_peers']} peers, {ago(tracker['last_answer_at'], now)}"
        else:
            state = Text("failing", style="red")
            detail = f"{tracker['last_error']}, {ago(tracker['last_failure_at'], now)}"
        detail += f"; {tracker['answers']} answers, {tracker['failures']} failures"
        found.add_row(name, state, detail)
    if not trackers["instances"]:
        listed = ", ".join(trackers["listed"]) or nothing
        none_row(found, f"not announced to yet ({listed})")
    return found


def fetch(client: httpx.Client, url: str) -> dict[str, Any]:
    """``GET {url}/status``, parsed."""
    response = client.get(f"{url}/status")
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


def show(
    prog: str,
    url: str,
    render: Render,
    *,
    as_json: bool = False,
    once: bool = False,
    interval: float = 1.0,
    verify: Any = True,
) -> int:
    """Print the status at ``url`` as JSON (``as_json``), as tables once (``once``, or when
    stdout is no terminal), or live until Ctrl-C. Returns the exit code: 0, or 1 (with a line
    on stderr saying why) when the service cannot be read."""
    console = Console()
    with httpx.Client(timeout=5.0, trust_env=False, verify=verify) as client:
        try:
            status = fetch(client, url)
        except (httpx.HTTPError, ValueError) as exc:
            print(f"{prog}: cannot read {url}/status: {exc}", file=sys.stderr)
            return 1
        if as_json:
            print(json.dumps(status, indent=2))
            return 0
        if once or not console.is_terminal:
            console.print(render(status))
            return 0
        try:
            with Live(render(status), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(max(0.2, interval))
                    try:
                        live.update(render(fetch(client, url)))
                    except (httpx.HTTPError, ValueError) as exc:
                        live.update(Text(f"cannot read {url}/status: {exc}", style="red"))
        except KeyboardInterrupt:
            return 0


def local_url(listen: str, *, scheme: str = "http") -> str:
    """The URL to reach a service on this host from its ``host:port`` listen setting (a
    wildcard address is reached on 127.0.0.1)."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    return f"{scheme}://{host}:{port}"


def command(
    prog: str,
    description: str,
    render: Render,
    *,
    default_url: str,
    url_help: str,
    config_help: str,
    url_from_config: Callable[[str], str],
    tls: bool = False,
    argv: list[str] | None = None,
) -> int:
    """A service's ``status`` command: ``--url``, ``--config`` (``url_from_config`` turns the
    config file's path into the URL; a bad file exits 2), ``--json``, ``--once``,
    ``--interval`` and, with ``tls``, ``--cacert`` and ``--insecure``; then :func:`show`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--url", help=f"{url_help} (default {default_url})")
    parser.add_argument("--config", help=config_help)
    if tls:
        parser.add_argument("--cacert", help="CA bundle that verifies an https service")
        parser.add_argument(
            "--insecure", action="store_true", help="do not verify an https service's certificate"
        )
    parser.add_argument("--json", action="store_true", help="print the JSON document once")
    parser.add_argument("--once", action="store_true", help="print the tables once")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    args = parser.parse_args(argv)
    url = default_url
    if args.url:
        url = str(args.url).rstrip("/")
    elif args.config:
        try:
            url = url_from_config(args.config)
        except ConfigError as exc:
            print(f"{prog}: configuration error: {exc}", file=sys.stderr)
            return 2
    verify: Any = True
    if tls:
        verify = False if args.insecure else (args.cacert or True)
    return show(
        prog,
        url,
        render,
        as_json=args.json,
        once=args.once,
        interval=args.interval,
        verify=verify,
    )
