"""``p2p-agent cache``: the node's blob cache, through the running agent.

    p2p-agent cache ls                      # blobs (next to be evicted first), downloads, policy
    p2p-agent cache ls --json               # the same, for scripts
    p2p-agent cache rm DIGEST               # one blob: sha256:<hex>, <hex>, or a unique prefix
    p2p-agent cache prune                   # apply the cache policy now
    p2p-agent cache prune --all             # every blob not in use, and interrupted downloads
    p2p-agent cache prune --unused-for 2d   # every blob not in use and unused for two days

In a cluster: ``kubectl exec -n kube-system ds/p2p-agent -c agent -- p2p-agent cache ls``.

Every command talks to the agent's admin API (:mod:`p2p_agent.admin`) on its unix socket,
``dataDir/admin.sock``, so that the agent's index and seeding stay right and nothing a client is
reading is deleted. The socket is ``--socket PATH``, or in the ``dataDir`` of ``--config FILE``,
or of ``/etc/p2p/agent.yaml`` (where the image and the chart put the agent's config) when that
exists, or of the environment (``P2P_AGENT_DATA_DIR``) and the default ``/p2p_agent_data``.

Exit codes: 0 done; 1 the agent cannot be reached (not running), or it refused (a blob in use,
an unknown digest); 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from p2p_agent.admin import ADMIN_SOCKET
from p2p_agent.settings import AgentSettings
from p2p_common.settings import ConfigError, format_duration, parse_duration
from p2p_common.status_cli import ago, short, size

PROG = "p2p-agent cache"
DEFAULT_CONFIG = Path("/etc/p2p/agent.yaml")
"""The config file the agent's image and the chart start it with."""
MIN_PREFIX = 8
_FULL = re.compile(r"^(?:sha256:)?([0-9a-f]{64})\Z")
_PREFIX = re.compile(r"^(?:sha256:)?([0-9a-f]+)\Z")


class CliError(Exception):
    """Print the message and exit with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def socket_path(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Path:
    """Where the agent's admin socket is (see the module's docstring)."""
    if args.socket:
        return Path(args.socket)
    config = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if config is not None:
        return Path(AgentSettings.load(config).data_dir) / ADMIN_SOCKET
    env = os.environ if environ is None else environ
    default = AgentSettings.model_fields["data_dir"].default
    return Path(env.get("P2P_AGENT_DATA_DIR") or default) / ADMIN_SOCKET


class Agent:
    """The admin API of the agent at ``socket``."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket)),
            base_url="http://p2p-agent",
            timeout=httpx.Timeout(10.0, read=300.0),
            trust_env=False,
        )

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CliError(self._unreachable(exc)) from None
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise CliError(f"the agent answered {response.status_code} without JSON") from None
        return response.status_code, body

    def _unreachable(self, exc: Exception) -> str:
        if not self.socket.exists():
            return (
                f"the agent is not running (no admin socket at {self.socket}; "
                "give --config or --socket if its dataDir is elsewhere)"
            )
        if not os.access(self.socket, os.W_OK):
            return f"permission denied on {self.socket}: run as the agent's user (root)"
        return f"the agent is not running ({self.socket} refuses connections: {exc})"


# --- ls -----------------------------------------------------------------------------------------


def render_listing(doc: dict[str, Any]) -> RenderableType:
    now = doc["now"]
    policy, disk = doc["policy"], doc["disk"]
    head = Table.grid(padding=(0, 2))
    quota = f" of {size(policy['quota_bytes'])}" if policy["quota_bytes"] else " (no quota)"
    blobs = doc["blobs"]
    in_use = sum(1 for b in blobs if b["state"] == "in use")
    head.add_row(
        Text(f"cache {size(doc['used_bytes'])}{quota}", style="bold"),
        f"{len(blobs)} blobs, {in_use} in use",
        f"dataDir {doc['data_dir']}",
    )
    if disk is not None and disk["used_percent"] is not None:
        used = f"disk {disk['used_percent']:.1f}% used of {size(disk['total_bytes'])}"
    else:
        used = "disk usage unknown"
    if policy["high_watermark_percent"]:
        marks = (
            f"evict above {policy['high_watermark_percent']}% "
            f"down to {policy['low_watermark_percent']}%"
        )
    else:
        marks = "watermarks off"
    expiry = (
        f"expire after {format_duration(policy['max_unused_seconds'])} unused"
        if policy["max_unused_seconds"]
        else "no expiry"
    )
    head.add_row(used, marks, expiry)
    evictions = ", ".join(f"{k} {v}" for k, v in sorted(policy["evictions"].items()) if v)
    head.add_row(
        f"policy from {policy['source']}",
        f"evicted since start: {evictions or 'none'}",
        f"last sweep {ago(policy['last_sweep_at'], now)}",
    )
    for limit in policy["limits_unmet"]:
        head.add_row(
            Text(f"the {limit} cannot be met: everything left is in use", style="red"), "", ""
        )

    table = Table(
        title="blobs (least recently used first: the next to be evicted)",
        title_justify="left",
        expand=True,
    )
    for column in ("blob", "size", "last use", "state"):
        table.add_column(column, justify="right" if column == "size" else "left")
    styles = {"in use": "yellow", "seeding": "green", "cached": ""}
    for blob in blobs:
        table.add_row(
            short(blob["digest"]),
            size(blob["size"]),
            ago(blob["last_used_at"], now),
            Text(blob["state"], style=styles.get(blob["state"], "")),
        )
    if not blobs:
        table.add_row(Text("none", style="dim"), "", "", "")
    parts: list[RenderableType] = [head, table]
    if doc["partials"]:
        partials = Table(title="partial downloads", title_justify="left", expand=True)
        for column in ("blob", "on disk", "of", "last write", "state"):
            partials.add_column(column, justify="right" if column in ("on disk", "of") else "left")
        for partial in doc["partials"]:
            partials.add_row(
                short(partial["digest"]),
                size(partial["bytes_on_disk"]),
                size(partial["size"]),
                ago(partial["modified_at"], now),
                partial["state"],
            )
        parts.append(partials)
    return Group(*parts)


# --- rm -----------------------------------------------------------------------------------------


def resolve(agent: Agent, given: str) -> str:
    """A full digest from ``given``: a digest, its hex, or a unique prefix of one listed."""
    text = given.strip().lower()
    full = _FULL.match(text)
    if full:
        return "sha256:" + full.group(1)
    prefix = _PREFIX.match(text)
    if prefix is None or len(prefix.group(1)) < MIN_PREFIX:
        raise CliError(
            f"{given!r} is not a digest (sha256:<64 hex digits>, or at least {MIN_PREFIX} of "
            "its first hex digits as `ls` shows them)",
            2,
        )
    _, doc = agent.request("GET", "/v1/cache")
    known: set[str] = {b["digest"] for b in doc.get("blobs", [])} | {
        p["digest"] for p in doc.get("partials", [])
    }
    matches = sorted(d for d in known if d.removeprefix("sha256:").startswith(prefix.group(1)))
    if not matches:
        raise CliError(f"no blob in the cache starts with {prefix.group(1)}")
    if len(matches) > 1:
        raise CliError(f"{prefix.group(1)} is ambiguous: " + ", ".join(matches))
    return matches[0]


# --- prune --------------------------------------------------------------------------------------


def render_prune(doc: dict[str, Any]) -> RenderableType:
    evicted = doc["evicted"]
    lines: list[RenderableType] = [
        Text(f"evicted {len(evicted)} blobs, {size(doc['freed_bytes'])} freed", style="bold")
    ]
    if evicted:
        table = Table(expand=True)
        for column in ("blob", "size", "reason"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for eviction in evicted:
            table.add_row(short(eviction["digest"]), size(eviction["size"]), eviction["reason"])
        lines.append(table)
    if doc["partials_removed"]:
        lines.append(Text(f"removed {len(doc['partials_removed'])} interrupted downloads"))
    if doc["skipped_in_use"]:
        lines.append(Text(f"{doc['skipped_in_use']} blobs were kept: a client started using them"))
    if doc["quota_unmet"]:
        lines.append(Text("still above cacheSize: every blob left is in use", style="red"))
    if doc["watermark_unmet"]:
        lines.append(
            Text(
                "the filesystem stays above the low watermark: every blob left is in use, or "
                "the space is not the cache's",
                style="red",
            )
        )
    return Group(*lines)


# --- the command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--config", help="the agent's config file (its dataDir holds the socket)")
    where.add_argument("--socket", help=f"the agent's admin socket (dataDir/{ADMIN_SOCKET})")
    common.add_argument("--json", action="store_true", help="print the agent's JSON answer")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Show and clean the blob cache of the agent on this node."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "ls", parents=[common], help="list cached blobs, partial downloads and the policy"
    )
    rm = commands.add_parser(
        "rm", parents=[common], help="remove one blob (refused while a client pulls it)"
    )
    rm.add_argument("digest", help="sha256:<hex>, <hex>, or a unique prefix as `ls` shows it")
    prune = commands.add_parser(
        "prune", parents=[common], help="apply the cache policy now, or evict more"
    )
    what = prune.add_mutually_exclusive_group()
    what.add_argument(
        "--all", action="store_true", help="every blob not in use, and interrupted downloads"
    )
    what.add_argument(
        "--unused-for",
        metavar="DURATION",
        help="every blob not in use and unused this long (90s, 30m, 12h, 2d)",
    )
    return parser


def _run(args: argparse.Namespace, console: Console) -> int:
    try:
        socket = socket_path(args)
    except ConfigError as exc:
        raise CliError(f"configuration error: {exc}", 2) from None
    agent = Agent(socket)
    try:
        if args.command == "ls":
            _, doc = agent.request("GET", "/v1/cache")
            if args.json:
                print(json.dumps(doc, indent=2))
            else:
                console.print(render_listing(doc))
            return 0
        if args.command == "rm":
            digest = resolve(agent, args.digest)
            status, doc = agent.request("DELETE", f"/v1/cache/blobs/{digest}")
            if args.json:
                print(json.dumps(doc, indent=2))
            if status != 200:
                raise CliError(str(doc.get("error", f"the agent answered {status}")))
            if not args.json:
                what = "interrupted download of " if doc["removed"] == "removed_partial" else ""
                console.print(f"removed {what}{digest} ({size(doc['bytes'])})")
            return 0
        body: dict[str, Any] = {}
        if args.all:
            body["all"] = True
        elif args.unused_for is not None:
            try:
                body["unused_for"] = parse_duration(args.unused_for)
            except ValueError as exc:
                raise CliError(f"--unused-for: {exc}", 2) from None
        status, doc = agent.request("POST", "/v1/cache/prune", json=body)
        if status != 200:
            raise CliError(str(doc.get("error", f"the agent answered {status}")))
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            console.print(render_prune(doc))
        return 0
    finally:
        agent.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args, Console())
    except CliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
