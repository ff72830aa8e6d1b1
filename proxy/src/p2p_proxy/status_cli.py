"""``p2p-proxy status``: the proxy's ``/status`` in a terminal, refreshed live.

    p2p-proxy status                      # live, until Ctrl-C
    p2p-proxy status --once               # one set of tables, then exit
    p2p-proxy status --json               # the JSON document, for scripts
    p2p-proxy status --url http://10.0.0.5:5005
    p2p-proxy status --config proxy.yaml  # find the proxy from its listen (and TLS) settings

In a cluster: ``kubectl exec -n kube-system deploy/p2p-proxy -- p2p-proxy status`` (one proxy
pod; ``kubectl exec POD`` for a given one). A proxy serving HTTPS (``tlsCertFile``) is read with
``--url https://NAME:5005 --cacert ca.crt``, or ``--insecure`` (the document holds no secret and
the command sends none). Exit code 0, or 1 when the proxy cannot be read (the message says why),
2 for a bad config file.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

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
from p2p_proxy.settings import ProxySettings

DEFAULT_URL = "http://127.0.0.1:5005"
PROG = "p2p-proxy status"


def _mbps(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _head(status: dict[str, Any]) -> Table:
    now = status["now"]
    origin, cache, seeding, peers = (
        status["origin"],
        status["cache"],
        status["seeding"],
        status["peers"],
    )
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(f"p2p proxy {status['version']}", style="bold"),
        f"up {ago(status['started_at'], now).removesuffix(' ago')}",
        Text("ready", style="green") if status["ready"] else Text("not ready", style="red"),
        "registries " + ", ".join(status["registries"]),
    )
    quota = f" of {size(cache['quota_bytes'])}" if cache["quota_bytes"] else ""
    head.add_row(
        f"origin {size(origin['bytes'])} received, {origin['fetches_done']} fetched, "
        f"{origin['fetches_failed']} failed",
        f"last fetch {ago(origin['last_fetch_done_at'], now)}",
        f"cache {size(cache['used_bytes'])}{quota}, {cache['blobs']} blobs",
        f"disk free {size(cache['disk_free_bytes'])}",
    )
    egress = origin.get("egress_proxy")
    if egress:
        proxies = {egress.get("https_proxy"), egress.get("http_proxy")} - {None}
        exempt = len(egress.get("no_proxy") or [])
        head.add_row(
            f"origin through {', '.join(sorted(proxies)) or 'no proxy'} ({egress.get('source')})",
            f"{exempt} NO_PROXY entries",
        )
    roles = ", ".join(f"{n} {role}" for role, n in peers["by_role"].items())
    head.add_row(
        f"seeding {seeding['blobs']} blobs ({size(seeding['bytes'])})",
        f"{peers['connections']} peer connections" + (f" ({roles})" if roles else ""),
        f"uploaded {size(peers['upload_bytes'])}",
        "",
    )
    return head


def _limits(limits: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    parts = [
        f"upload {rate(limits['upload_bytes_per_second'])}",
        f"max {limits['max_connections']} peer connections",
    ]
    if "max_origin_fetches" in limits:
        waiting = limits["origin_fetches_waiting"]
        parts.append(
            f"origin fetches {limits['origin_fetches_running']} of "
            f"{limits['max_origin_fetches']}" + (f" ({waiting} waiting)" if waiting else "")
        )
        width = limits.get("large_fetches_per_origin", 0)
        in_line = limits.get("origin_fetches_in_line", 0)
        parts.append(
            (f"large fetches {width} per origin" if width else "large fetches unordered")
            + (f" ({in_line} in line)" if in_line else "")
        )
        per = limits["origin_requests_per_address"]
        speed = limits["origin_rate_per_address"]
        parts.append(
            "per address "
            + (f"{per} in progress" if per else "no request limit")
            + ", "
            + (f"{speed:g}/s (burst {limits['origin_burst_per_address']})" if speed else "no rate")
        )
    grid.add_row(Text("limits", style="bold"), *parts)
    return grid


def render(status: dict[str, Any]) -> RenderableType:
    """The status document as rich tables (what ``--once`` prints and the live view shows)."""
    now = status["now"]

    fetches = table(
        "fetches from the origin",
        {
            "repository": "left",
            "blob": "left",
            "progress": "left",
            "bytes": "right",
            "MB/s": "right",
            "started": "left",
        },
    )
    for fetch in status["fetches"]:
        fetches.add_row(
            fetch["repository"],
            short(fetch["digest"]),
            bar(fetch["percent"]),
            f"{size(fetch['bytes'])} / {size(fetch['size'])}",
            _mbps(fetch["bytes_per_second"]),
            ago(fetch["started_at"], now),
        )
    if not status["fetches"]:
        none_row(fetches, "none")

    preheat = table(
        "preheat jobs",
        {"job": "right", "image": "left", "state": "left", "progress": "left", "blobs": "left"},
    )
    for job in status["preheat"]:
        state = job["state"]
        style = {"done": "green", "failed": "red"}.get(state)
        detail = f"{job['blobs_ready']}/{job['blobs']} ready ({job['blobs_fetched']} fetched)"
        if job["error"]:
            detail += f": {job['error']}"
        preheat.add_row(
            str(job["id"]),
            job["image"],
            Text(state, style=style or ""),
            bar(job["percent"]),
            detail,
        )
    if not status["preheat"]:
        none_row(preheat, "none")

    trackers = trackers_table(status["trackers"], now, nothing="none configured")

    seeds = table(
        "busiest seeds", {"blob": "left", "size": "right", "uploaded": "right", "peers": "right"}
    )
    for seed in status["seeding"]["top"]:
        seeds.add_row(
            short(seed["digest"]),
            size(seed["size"]),
            size(seed["uploaded_bytes"]),
            str(seed["peers"]),
        )
    if not status["seeding"]["top"]:
        none_row(seeds, "no uploads yet")

    recent = table(
        "recent fetches",
        {
            "repository": "left",
            "blob": "left",
            "outcome": "left",
            "bytes": "right",
            "seconds": "right",
            "MB/s": "right",
        },
    )
    for fetch in status["recent_fetches"][:10]:
        outcome = fetch["outcome"]
        shown = outcome if fetch["error"] is None else f"{outcome}: {fetch['error']}"
        recent.add_row(
            fetch["repository"],
            short(fetch["digest"]),
            Text(shown, style="green" if outcome == "done" else "red"),
            size(fetch["bytes"]),
            f"{fetch['seconds']:.2f}",
            _mbps(fetch["bytes_per_second"]),
        )
    return Group(
        _head(status), _limits(status["limits"]), fetches, preheat, trackers, seeds, recent
    )


def _url_from_config(path: str) -> str:
    settings = ProxySettings.load(path)
    scheme = "https" if settings.tls_cert_file is not None else "http"
    return local_url(settings.listen, scheme=scheme)


def main(argv: list[str] | None = None) -> int:
    return command(
        PROG,
        "Show what this proxy is doing.",
        render,
        default_url=DEFAULT_URL,
        url_help="the proxy's API address",
        config_help="the proxy's config file (its listen is used)",
        url_from_config=_url_from_config,
        tls=True,
        argv=argv,
    )
