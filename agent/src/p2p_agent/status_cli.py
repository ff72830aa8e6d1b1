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

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from p2p_agent.settings import AgentSettings
from p2p_common.settings import format_duration
from p2p_common.status_cli import (
    ago,
    bar,
    command,
    local_url,
    none_row,
    rate,
    short,
    size,
    table,
    trackers_table,
)

DEFAULT_URL = "http://127.0.0.1:5014"
PROG = "p2p-agent status"

MIRROR_STYLES = {"mirrored": "green", "missing": "yellow", "unknown": "dim"}


def render(status: dict[str, Any]) -> RenderableType:
    """The status document as rich tables (what ``--once`` prints and the live view shows)."""
    now = status["now"]
    cache, rates = status["cache"], status["rates"]

    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(f"p2p agent {status['version']}", style="bold"),
        f"up {ago(status['started_at'], now).removesuffix(' ago')}",
        f"last successful pull {ago(status['last_successful_pull_at'], now)}",
    )
    quota = f" of {size(cache['quota_bytes'])}" if cache["quota_bytes"] else ""
    head.add_row(
        f"cache {size(cache['used_bytes'])}{quota}, {cache['blobs']} blobs "
        f"({cache['seeded_blobs']} seeded)",
        f"disk free {size(cache['disk_free_bytes'])}",
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

    pulls = table(
        "pulls in flight",
        {
            "repository": "left",
            "blob": "left",
            "progress": "left",
            "bytes": "right",
            "MB/s": "right",
            "first byte": "left",
            "from": "left",
            "pull id": "left",
        },
    )
    for pull in status["pulls"]:
        first = pull["first_byte_seconds"]
        pulls.add_row(
            pull["repository"],
            short(pull["digest"]),
            bar(pull["percent"]),
            f"{size(pull['bytes'])} / {size(pull['size'])}",
            f"{pull['bytes_per_second'] / 1e6:.1f}",
            "-" if first is None else f"{first:.2f} s",
            pull["source"],
            str(pull["id"]),
        )
    if not status["pulls"]:
        none_row(pulls, "none")

    downloads = table(
        "downloads",
        {
            "blob": "left",
            "way": "left",
            "progress": "left",
            "peers": "left",
            "bytes by source": "left",
        },
    )
    for download in status["downloads"]:
        sources = download.get("bytes_by_source")
        by = (
            ", ".join(f"{k} {size(v)}" for k, v in sources.items())
            if sources
            else size(download.get("bytes"))
        )
        downloads.add_row(
            short(download["digest"]),
            download["way"],
            bar(download["percent"]),
            str(download.get("peers", "-")),
            by or "-",
        )
    if not status["downloads"]:
        none_row(downloads, "none")

    proxies = table("proxies", {"instance": "left", "state": "left", "last answer": "left"})
    for proxy in status["proxies"]["instances"]:
        proxies.add_row(
            proxy["url"],
            Text("answering", style="green") if proxy["ok"] else Text("failing", style="red"),
            f"{proxy['detail']}, {ago(proxy['at'], now)}",
        )
    if not status["proxies"]["instances"]:
        configured = ", ".join(status["proxies"]["configured"])
        none_row(proxies, f"not asked yet ({configured})")

    # An agent from before trackers and mirror were shown answers without them.
    extra: list[RenderableType] = []
    if "trackers" in status:
        extra.append(
            trackers_table(
                status["trackers"], now, nothing="they come with the first download's metainfo"
            )
        )
    if status.get("mirror") is not None:
        extra.append(_mirror(status["mirror"], now))

    recent = table(
        "recent pulls",
        {
            "repository": "left",
            "blob": "left",
            "outcome": "left",
            "bytes": "right",
            "seconds": "right",
            "MB/s": "right",
            "from": "left",
            "pull id": "left",
        },
    )
    for pull in status["recent"][:10]:
        recent.add_row(
            pull["repository"],
            short(pull["digest"]),
            Text(pull["outcome"], style="green" if pull["outcome"] == "done" else "red"),
            size(pull["bytes"]),
            f"{pull['seconds']:.2f}",
            f"{pull['bytes_per_second'] / 1e6:.1f}",
            pull["source"],
            str(pull["id"]),
        )
    return Group(head, pulls, downloads, proxies, *extra, recent)


CONTAINERD_STYLES = {"matches": "green", "unknown": "dim"}


def _mirror(mirror: dict[str, Any], now: float) -> Table:
    """Per registry: the hosts.toml state and the requests containerd sent each way; whether
    containerd reads hosts.toml files at all; the catch-all, when there is one."""
    found = table(
        "registries (mirror mode)", {"registry": "left", "hosts.toml": "left", "requests": "left"}
    )
    # Agents from before the containerd check and the catch-all answer without them.
    containerd = mirror.get("containerd")
    if containerd is not None:
        state = containerd["state"]
        shown = Text(state, style=CONTAINERD_STYLES.get(state, "red"))
        shown.append(f": {containerd['message']}", style="")
        found.add_row("containerd", shown, f"checked {ago(containerd['checked_at'], now)}")
    for entry in mirror["registries"]:
        state = entry["state"]
        shown = Text(state, style=MIRROR_STYLES.get(state, "red"))
        shown.append(f": {entry['detail']}", style="")
        requests = (
            f"{entry['mirror_requests']} mirror "
            f"({ago(entry['last_mirror_request_at'], now)}), "
            f"{entry['rewrite_requests']} rewrite"
        )
        found.add_row(entry["registry"], shown, requests)
    catch_all = mirror.get("catch_all")
    if catch_all is not None and catch_all["state"] != "missing":
        state = catch_all["state"]
        shown = Text(state, style=MIRROR_STYLES.get(state, "red"))
        shown.append(f": {catch_all['detail']}", style="")
        found.add_row(
            "(every other registry)",
            shown,
            f"{catch_all['refused_requests']} answered 404 "
            f"({ago(catch_all['last_refused_request_at'], now)})",
        )
    return found


def _url_from_config(path: str) -> str:
    return local_url(AgentSettings.load(path).metrics_listen)


def main(argv: list[str] | None = None) -> int:
    return command(
        PROG,
        "Show what the agent on this node is doing.",
        render,
        default_url=DEFAULT_URL,
        url_help="the agent's metrics address",
        config_help="the agent's config file (its metricsListen is used)",
        url_from_config=_url_from_config,
        argv=argv,
    )
