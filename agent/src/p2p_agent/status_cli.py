"""``p2p-agent status``: the agent's ``/status`` in a terminal, refreshed live.

    p2p-agent status                     # live, until Ctrl-C
    p2p-agent status --once              # one table, then exit
    p2p-agent status --json              # the JSON document, for scripts
    p2p-agent status --config agent.yaml # find the agent from its metricsListen

In a cluster: ``kubectl exec -n kube-system ds/p2p-agent -- p2p-agent status`` (one pod of the
DaemonSet; ``kubectl exec POD`` for a given node). Exit code 0, or 1 when the agent cannot be
reached (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from p2p_agent.settings import AgentSettings
from p2p_common.settings import ConfigError, format_duration

DEFAULT_URL = "http://127.0.0.1:5014"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    units = ["B", "kB", "MB", "GB", "TB"]
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n /= 1000
        i += 1
    return f"{n:.1f} {units[i]}" if i else f"{int(n)} B"


def _ago(at: float | None, now: float) -> str:
    if not at:
        return "never"
    seconds = max(0.0, now - at)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _bar(percent: float) -> RenderableType:
    return Group(ProgressBar(total=100, completed=percent, width=20), Text(f"{percent:5.1f}%"))


def render(status: dict[str, Any]) -> RenderableType:
    """The status document as rich tables (what ``--once`` prints and the live view shows)."""
    now = status["now"]
    cache, rates = status["cache"], status["rates"]

    def rate(n: int) -> str:
        return f"{_size(n)}/s" if n else "unlimited"

    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(f"p2p agent {status['version']}", style="bold"),
        f"up {_ago(status['started_at'], now).removesuffix(' ago')}",
        f"last successful pull {_ago(status['last_successful_pull_at'], now)}",
    )
    quota = f" of {_size(cache['quota_bytes'])}" if cache["quota_bytes"] else ""
    head.add_row(
        f"cache {_size(cache['used_bytes'])}{quota}, {cache['blobs']} blobs "
        f"({cache['seeded_blobs']} seeded)",
        f"disk free {_size(cache['disk_free_bytes'])}",
        f"rates {rate(rates['download_bytes_per_second'])} down / "
        f"{rate(rates['upload_bytes_per_second'])} up ({rates['source']})",
    )

    policy = cache.get("policy")
    if policy is not None:
        marks = (
            f"evict above {policy['high_watermark_percent']}% of the disk "
            f"to {policy['low_watermark_percent']}%"
            if policy["high_watermark_percent"]
            else "disk watermarks off"
        )
        unused = policy["max_unused_seconds"]
        evicted = sum(policy["evictions"].values())
        head.add_row(
            f"cache policy ({policy['source']}): {marks}",
            f"expire after {format_duration(unused)} unused" if unused else "no expiry",
            f"{evicted} evicted since start"
            + (
                f", cannot meet: {', '.join(policy['limits_unmet'])}"
                if policy["limits_unmet"]
                else ""
            ),
        )

    pulls = Table(title="pulls in flight", title_justify="left", expand=True)
    for column in ("repository", "blob", "progress", "bytes", "MB/s", "first byte", "from"):
        pulls.add_column(column, justify="right" if column in ("bytes", "MB/s") else "left")
    for pull in status["pulls"]:
        first = pull["first_byte_seconds"]
        pulls.add_row(
            pull["repository"],
            _short(pull["digest"]),
            _bar(pull["percent"]),
            f"{_size(pull['bytes'])} / {_size(pull['size'])}",
            f"{pull['bytes_per_second'] / 1e6:.1f}",
            "-" if first is None else f"{first:.2f} s",
            pull["source"],
        )
    if not status["pulls"]:
        pulls.add_row(Text("none", style="dim"), "", "", "", "", "", "")

    downloads = Table(title="downloads", title_justify="left", expand=True)
    for column in ("blob", "way", "progress", "peers", "bytes by source"):
        downloads.add_column(column)
    for download in status["downloads"]:
        sources = download.get("bytes_by_source")
        by = (
            ", ".join(f"{k} {_size(v)}" for k, v in sources.items())
            if sources
            else _size(download.get("bytes"))
        )
        downloads.add_row(
            _short(download["digest"]),
            download["way"],
            _bar(download["percent"]),
            str(download.get("peers", "-")),
            by or "-",
        )
    if not status["downloads"]:
        downloads.add_row(Text("none", style="dim"), "", "", "", "")

    proxies = Table(title="proxies", title_justify="left", expand=True)
    for column in ("instance", "state", "last answer"):
        proxies.add_column(column)
    for proxy in status["proxies"]["instances"]:
        proxies.add_row(
            proxy["url"],
            Text("answering", style="green") if proxy["ok"] else Text("failing", style="red"),
            f"{proxy['detail']}, {_ago(proxy['at'], now)}",
        )
    if not status["proxies"]["instances"]:
        configured = ", ".join(status["proxies"]["configured"])
        proxies.add_row(Text(f"not asked yet ({configured})", style="dim"), "", "")

    recent = Table(title="recent pulls", title_justify="left", expand=True)
    for column in ("repository", "blob", "outcome", "bytes", "seconds", "MB/s", "from"):
        recent.add_column(
            column, justify="right" if column in ("bytes", "seconds", "MB/s") else "left"
        )
    for pull in status["recent"][:10]:
        recent.add_row(
            pull["repository"],
            _short(pull["digest"]),
            Text(pull["outcome"], style="green" if pull["outcome"] == "done" else "red"),
            _size(pull["bytes"]),
            f"{pull['seconds']:.2f}",
            f"{pull['bytes_per_second'] / 1e6:.1f}",
            pull["source"],
        )
    return Group(head, pulls, downloads, proxies, recent)


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    if args.config:
        settings = AgentSettings.load(args.config)
        host, _, port = settings.metrics_listen.rpartition(":")
        if host in ("0.0.0.0", "", "::", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{port}"
    return DEFAULT_URL


def fetch(client: httpx.Client, url: str) -> dict[str, Any]:
    response = client.get(f"{url}/status")
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2p-agent status", description="Show what the agent on this node is doing."
    )
    parser.add_argument("--url", help=f"the agent's metrics address (default {DEFAULT_URL})")
    parser.add_argument("--config", help="the agent's config file (its metricsListen is used)")
    parser.add_argument("--json", action="store_true", help="print the JSON document once")
    parser.add_argument("--once", action="store_true", help="print the tables once")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    args = parser.parse_args(argv)
    try:
        url = _url(args)
    except ConfigError as exc:
        print(f"p2p-agent status: configuration error: {exc}", file=sys.stderr)
        return 2
    console = Console()
    with httpx.Client(timeout=5.0, trust_env=False) as client:
        try:
            status = fetch(client, url)
        except (httpx.HTTPError, ValueError) as exc:
            print(f"p2p-agent status: cannot read {url}/status: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(status, indent=2))
            return 0
        if args.once or not console.is_terminal:
            console.print(render(status))
            return 0
        try:
            with Live(render(status), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(max(0.2, args.interval))
                    try:
                        live.update(render(fetch(client, url)))
                    except (httpx.HTTPError, ValueError) as exc:
                        live.update(Text(f"cannot read {url}/status: {exc}", style="red"))
        except KeyboardInterrupt:
            return 0
