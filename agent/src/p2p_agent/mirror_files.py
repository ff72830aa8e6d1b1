"""containerd's files, as the chart's mirror-config container handles them (docs/install.md,
section 6): merging the agent into a ``hosts.toml`` someone else wrote, and reading containerd's
``config.toml`` to tell whether containerd reads ``hosts.toml`` files at all.

Pure functions (text in, text or a verdict out) parsed with :mod:`tomllib`, and a small command
line the chart's ``mirror.sh`` runs in the agent image (the standard library and this module
only: it starts in a few milliseconds in the 32 MB mirror containers):

``python3 -m p2p_agent.mirror_files merge OURS ORIGINAL``
    The merged file on stdout (exit 0); exit 3 when ORIGINAL already sends pulls to the agent
    (nothing to merge), 4 when it cannot be merged safely (the reason on stderr).
``python3 -m p2p_agent.mirror_files containerd --config F --host-config F --config-path D``
    One line saying whether containerd reads ``hosts.toml`` files from D, and the exact fix if
    not; with ``--out JSON``, the verdict as JSON for the agent's status (written atomically).

**Merging.** containerd tries the ``[host."..."]`` entries of a ``hosts.toml`` in the order they
appear in the file, then ``server``. The merged file is the original's top-level keys (everything
before its first table), then the agent's host table (taken from the chart's own file, OURS), then
the rest of the original, unchanged: a table before top-level keys would not be valid TOML. Where
the original's first table starts is found by trying each line that opens a table and keeping
the first split whose result, parsed with :mod:`tomllib`, is exactly the original document plus
the agent as its first host; if no split passes that check, nothing is merged. So a merged file is
never one containerd would read differently from the original, apart from asking the agent first.

**containerd's config.** :func:`inspect_containerd` reads the ``config_path`` of the CRI registry
(``plugins."io.containerd.cri.v1.images".registry`` in a ``version = 3`` file, containerd 2.x;
``plugins."io.containerd.grpc.v1.cri".registry`` in ``version = 2``; ``plugins.cri.registry`` in
version 1), following ``imports`` the way containerd merges them (1.x: an imported file's plugin
table replaces the whole table of that plugin; 2.x, version 3: the tables are merged key by
key). ``config_path`` may list several directories separated by ``:``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tomllib
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2p_agent.mirror import MAX_HOSTS_TOML, MERGED_MARK, names_agent

__all__ = [
    "AlreadyMirroredError",
    "ContainerdVerdict",
    "MergeRefusedError",
    "check_containerd",
    "inspect_containerd",
    "load_containerd_config",
    "main",
    "merge_hosts_toml",
]

BACKUP_SUFFIX = ".p2p-orig"
"""The original ``hosts.toml`` is kept beside the merged one under this suffix."""
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_FILES = 32
"""containerd's config file and the files it imports, at most."""

EXIT_ALREADY = 3
EXIT_REFUSED = 4


class MergeRefusedError(Exception):
    """The original cannot be merged safely (the message says why); leave it alone."""


class AlreadyMirroredError(MergeRefusedError):
    """The original already names the agent as a host: nothing to merge."""


def _parse(text: str, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MergeRefusedError(f"{what} is not valid TOML ({exc})") from None


def _agent_block(ours: str) -> tuple[str, dict[str, Any], list[str]]:
    """From the chart's own hosts.toml: the agent's host key, its table, and the lines of that
    table (from the ``[host."..."]`` line to the end of the file)."""
    doc = _parse(ours, "the chart's hosts.toml")
    hosts = doc.get("host")
    if not isinstance(hosts, dict) or len(hosts) != 1:
        raise MergeRefusedError("the chart's hosts.toml must name exactly one host")
    ((key, table),) = hosts.items()
    lines = ours.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[host.")), None)
    if start is None:
        raise MergeRefusedError('the chart\'s hosts.toml has no [host."..."] table')
    return key, table, lines[start:]


def _agent_port(key: str) -> int | None:
    try:
        return urllib.parse.urlsplit(key).port
    except ValueError:
        return None


def _header(marker: str) -> list[str]:
    return [
        marker + "\n",
        f"{MERGED_MARK} the p2p agent (the first [host] below) was added to the hosts.toml\n",
        "# that was here. The original is kept unchanged beside this file in\n",
        f"# hosts.toml{BACKUP_SUFFIX} and is put back when the agent pod stops. To change\n",
        "# it, edit that file (or replace this one): p2p merges the agent into it again at its\n",
        "# next check.\n",
    ]


def _without_agent(doc: dict[str, Any], key: str) -> dict[str, Any]:
    rest = dict(doc)
    hosts = dict(rest.get("host", {}))
    hosts.pop(key, None)
    if hosts:
        rest["host"] = hosts
    else:
        rest.pop("host", None)
    return rest


def _checks_out(merged: str, original: dict[str, Any], key: str, table: dict[str, Any]) -> bool:
    """Whether ``merged`` is exactly ``original`` plus the agent as its first host."""
    try:
        doc = tomllib.loads(merged)
    except tomllib.TOMLDecodeError:
        return False
    hosts = doc.get("host")
    if not isinstance(hosts, dict) or next(iter(hosts), None) != key or hosts[key] != table:
        return False
    return _without_agent(doc, key) == original


def merge_hosts_toml(ours: str, original: str) -> str:
    """The original ``hosts.toml`` with the agent's host (from ``ours``, the chart's own file)
    asked first; the first line is ``ours``'s ``managed-by`` marker. Raises
    :class:`AlreadyMirroredError` when the original already names the agent,
    :class:`MergeRefusedError` when it cannot be merged safely (not TOML, too large, no split
    that checks out)."""
    if len(original.encode()) > MAX_HOSTS_TOML:
        raise MergeRefusedError(f"larger than {MAX_HOSTS_TOML} bytes")
    marker = ours.split("\n", 1)[0].rstrip("\r")
    if not marker.startswith("# managed-by:"):
        raise MergeRefusedError("the chart's hosts.toml does not start with its managed-by line")
    key, table, block = _agent_block(ours)
    if block and not block[-1].endswith("\n"):
        block[-1] += "\n"
    doc = _parse(original, "the existing hosts.toml")
    hosts = doc.get("host", {})
    port = _agent_port(key)
    if isinstance(hosts, dict) and any(
        k == key or (port is not None and names_agent(k, port)) for k in hosts
    ):
        raise AlreadyMirroredError("it already names the p2p agent as a host")
    lines = original.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    candidates = [i for i, line in enumerate(lines) if line.lstrip().startswith("[")]
    for split in [*candidates, len(lines)]:
        top, rest = lines[:split], lines[split:]
        parts = _header(marker)
        if top:  # every line kept, blank ones too; one blank line before the agent's table
            parts += top if not top[-1].strip() else [*top, "\n"]
        parts += block
        if rest:
            parts += ["\n", *rest]
        merged = "".join(parts)
        if _checks_out(merged, doc, key, table):
            return merged
    raise MergeRefusedError("no place to add the agent's host keeps the file's meaning")


# --- containerd's config.toml -----------------------------------------------------------------

REGISTRY_TABLES = {
    3: ("io.containerd.cri.v1.images", 'plugins."io.containerd.cri.v1.images".registry'),
    2: ("io.containerd.grpc.v1.cri", 'plugins."io.containerd.grpc.v1.cri".registry'),
    1: ("cri", "plugins.cri.registry"),
}
"""Config version -> (plugin holding the CRI registry settings, its table as written)."""


@dataclass
class ContainerdVerdict:
    """Whether containerd reads the ``hosts.toml`` files p2p writes, and what to do if not.

    ``state``: ``matches`` (its ``config_path`` includes the directory p2p writes to),
    ``other`` (it reads another directory), ``unset`` (no ``config_path``: containerd reads no
    ``hosts.toml`` at all), ``unknown`` (the config could not be read; ``message`` says why).
    """

    state: str
    config_file: str
    expected: str
    message: str
    version: int | None = None
    key: str | None = None
    config_path: list[str] = field(default_factory=list)
    unread_imports: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return asdict(self)


def _deep_merge(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in more.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _deep_merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def _same_dir(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _rancher(config_file: str) -> str | None:
    for name, part in (("k3s", "/rancher/k3s/"), ("RKE2", "/rancher/rke2/")):
        if part in config_file:
            return name
    return None


def inspect_containerd(
    files: Sequence[tuple[str, str]],
    expected: str,
    *,
    unread_imports: Iterable[str] = (),
) -> ContainerdVerdict:
    """The verdict for containerd's config: ``files`` are (path on the node, text) of the main
    config file then the files it imports, in containerd's order; ``expected`` is the
    directory (on the node) p2p writes ``hosts.toml`` files to."""
    config_file = files[0][0] if files else "config.toml"
    unread = list(unread_imports)
    docs: list[tuple[str, dict[str, Any]]] = []
    for path, text in files:
        try:
            docs.append((path, tomllib.loads(text)))
        except tomllib.TOMLDecodeError as exc:
            return ContainerdVerdict(
                "unknown",
                config_file,
                expected,
                f"cannot check containerd's config: {path} is not valid TOML ({exc}); "
                "containerd will not start with it either",
                unread_imports=unread,
            )
    if not docs:
        return ContainerdVerdict(
            "unknown", config_file, expected, "cannot check containerd's config: no file"
        )
    raw_version = docs[0][1].get("version", 1)
    version = raw_version if isinstance(raw_version, int) and raw_version in (1, 2, 3) else None
    if version is None:
        return ContainerdVerdict(
            "unknown",
            config_file,
            expected,
            f"cannot check containerd's config: {config_file} has version = {raw_version!r}, "
            "which this check does not know",
            unread_imports=unread,
        )
    plugin, key = REGISTRY_TABLES[version]
    # Imports: containerd 1.x replaces a plugin's whole table with a later file's; 2.x (the
    # version 3 format) merges the tables key by key (containerd #9982).
    table: dict[str, Any] = {}
    for _, doc in docs:
        plugins = doc.get("plugins")
        if isinstance(plugins, dict) and isinstance(plugins.get(plugin), dict):
            table = _deep_merge(table, plugins[plugin]) if version == 3 else plugins[plugin]
    registry = table.get("registry")
    registry = registry if isinstance(registry, dict) else {}
    value = registry.get("config_path", "")
    dirs = [d for d in value.split(":") if d] if isinstance(value, str) else []
    note = ""
    if unread:
        note = f" (imports not visible to this check: {', '.join(unread[:4])})"
    where = f"{key} config_path in {config_file}"
    verdict = ContainerdVerdict(
        "matches",
        config_file,
        expected,
        "",
        version=version,
        key=key,
        config_path=dirs,
        unread_imports=unread,
    )
    if any(_same_dir(d, expected) for d in dirs):
        verdict.message = (
            f"containerd reads hosts.toml files from {expected} ({where}): mirror mode is active"
        )
        return verdict
    if dirs:
        verdict.state = "other"
        verdict.message = (
            f"containerd reads hosts.toml files from {':'.join(dirs)} ({where}), not from "
            f"{expected} where p2p writes them: set the chart value "
            f"mirror.configPath={dirs[0]} (helm upgrade ... --set mirror.configPath={dirs[0]})"
            f"{note}"
        )
        return verdict
    verdict.state = "unset"
    fix = (
        f'add config_path = "{expected}" to the [{key}] table of {config_file} and restart '
        "containerd"
    )
    rancher = _rancher(config_file)
    if rancher is not None:
        fix = (
            f"{rancher} writes {config_file} at start: use a {rancher} release that sets "
            f'config_path, or add config_path = "{expected}" to the [{key}] table of its '
            f"config.toml.tmpl, then restart {rancher}"
        )
    legacy = ""
    if registry.get("mirrors"):
        legacy = (
            f"; it configures registries with {key}.mirrors, which containerd refuses "
            "together with config_path: move those mirrors into hosts.toml files first"
        )
    default = ""
    if version == 3:
        default = " (unless this containerd 2.x has a built-in default that includes it)"
    verdict.message = (
        f"containerd ignores hosts.toml files: {config_file} sets no config_path in [{key}] "
        f"(version {version}), so mirror mode has no effect on this node{default}{legacy}. "
        f"Fix: {fix} ('containerd config dump | grep config_path' on the node shows what it "
        f"uses){note}"
    )
    return verdict


def load_containerd_config(
    mounted: Path, on_node: str
) -> tuple[list[tuple[str, str]], list[str], str | None]:
    """(Blocking.) Read containerd's config file, mounted at ``mounted`` and called ``on_node``
    on the node, and the files it imports (as far as they lie in the mounted directory):
    (files as (path on the node, text), imports that could not be read, problem or None)."""
    node_dir = os.path.dirname(on_node)
    mount_dir = mounted.parent

    def to_mount(path: str) -> Path | None:
        if not path.startswith("/"):
            path = os.path.join(node_dir, path)
        path = os.path.normpath(path)
        if path == on_node:
            return mounted
        if not path.startswith(node_dir.rstrip("/") + "/"):
            return None
        return mount_dir / os.path.relpath(path, node_dir)

    files: list[tuple[str, str]] = []
    unread: list[str] = []
    queue = [on_node]
    seen: set[str] = set()
    while queue and len(files) < MAX_CONFIG_FILES:
        path = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        local = to_mount(path)
        if local is None:
            unread.append(path)
            continue
        try:
            with open(local, "rb") as file:
                data = file.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            if not files:
                return [], [], f"{on_node} does not exist on this node"
            unread.append(path)
            continue
        except OSError as exc:
            if not files:
                return [], [], f"{on_node} cannot be read ({exc.strerror or exc})"
            unread.append(path)
            continue
        if len(data) > MAX_CONFIG_BYTES:
            return files, unread, f"{path} is larger than {MAX_CONFIG_BYTES} bytes"
        text = data.decode("utf-8", "replace")
        files.append((path, text))
        try:
            imports = tomllib.loads(text).get("imports", [])
        except tomllib.TOMLDecodeError:
            continue  # inspect_containerd says so
        if not isinstance(imports, list):
            continue
        for pattern in imports:
            if not isinstance(pattern, str) or not pattern:
                continue
            full = pattern if pattern.startswith("/") else os.path.join(node_dir, pattern)
            local_pattern = to_mount(full)
            if local_pattern is None:
                unread.append(full)
                continue
            matches = sorted(glob.glob(str(local_pattern)))
            if not glob.has_magic(full) and not matches:
                unread.append(full)
            for match in matches:
                queue.append(os.path.join(node_dir, os.path.relpath(match, mount_dir)))
    return files, unread, None


def check_containerd(mounted: Path, on_node: str, expected: str) -> ContainerdVerdict:
    """(Blocking.) The verdict for the config file mounted at ``mounted``."""
    files, unread, problem = load_containerd_config(mounted, on_node)
    if problem is not None:
        return ContainerdVerdict(
            "unknown",
            on_node,
            expected,
            f"cannot check containerd's config: {problem} (set the chart value "
            "mirror.containerdConfig to the config file containerd runs with; "
            "'containerd config dump | grep config_path' on the node shows what it uses)",
            unread_imports=unread,
        )
    return inspect_containerd(files, expected, unread_imports=unread)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".p2p-new")
    scratch.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    os.replace(scratch, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m p2p_agent.mirror_files",
        description="Helpers of the chart's mirror-config container.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge the agent into an existing hosts.toml")
    merge.add_argument("ours", type=Path, help="the chart's hosts.toml for the registry")
    merge.add_argument("original", type=Path, help="the hosts.toml someone else wrote")
    check = commands.add_parser("containerd", help="does containerd read hosts.toml files?")
    check.add_argument("--config", type=Path, required=True, help="config.toml, as mounted here")
    check.add_argument("--host-config", required=True, help="config.toml, as the node names it")
    check.add_argument("--config-path", required=True, help="where p2p writes hosts.toml files")
    check.add_argument("--out", type=Path, help="write the verdict here as JSON")
    args = parser.parse_args(argv)
    if args.command == "merge":
        try:
            ours = args.ours.read_text()
            with open(args.original, "rb") as file:
                original = file.read(MAX_HOSTS_TOML + 1).decode()
            sys.stdout.write(merge_hosts_toml(ours, original))
        except AlreadyMirroredError as exc:
            print(exc, file=sys.stderr)
            return EXIT_ALREADY
        except (MergeRefusedError, OSError, UnicodeDecodeError) as exc:
            print(exc, file=sys.stderr)
            return EXIT_REFUSED
        return 0
    verdict = check_containerd(args.config, args.host_config, args.config_path)
    if args.out is not None:
        _write_json(args.out, verdict.view())
    print(verdict.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
