"""Mirror mode as the agent can see it, per configured registry, for the status view.

The agent does not write containerd's ``hosts.toml`` files (in the chart the ``mirror-config``
container of the agent pod does, see docs/install.md). What the agent can know:

- whether containerd sends it requests for the registry: mirror-mode requests carry
  ``?ns=<registry>``, rewrite-mode ones (``localhost:5004/<repo>``) do not. :class:`RegistryUse`
  counts both (the registry API feeds it);
- given ``mirrorConfigPath`` (containerd's ``config_path`` as the agent sees it, mounted read
  only; the chart sets it in mirror mode), what ``<mirrorConfigPath>/<registry>/hosts.toml``
  says: :func:`read_hosts_toml` reports ``mirrored`` (the file names this agent as a host that
  may pull), ``missing`` (no file: containerd pulls straight from the registry), ``other`` (a file
  that does not send pulls to this agent, for example one written by someone else, which the
  chart leaves alone), ``invalid`` (not TOML) or ``unreadable``. Without ``mirrorConfigPath``
  the state is ``unknown``.

Only ``hosts.toml`` is read (at most :data:`MAX_HOSTS_TOML` bytes, at most every
:data:`RECHECK_SECONDS` per registry), never the certificates or keys beside it. A file the chart
merged the agent into (someone else's ``hosts.toml``, see :mod:`p2p_agent.mirror_files`) says so
in its second line; ``hosts`` lists the hosts containerd tries, in order.

Two more things come from the ``mirror-config`` container through the same directory:
``containerd.json``, its verdict on containerd's own config (does containerd read ``hosts.toml``
files from the directory p2p writes to at all? :func:`read_containerd_verdict`), and the copy of
``_default/hosts.toml`` when the chart's catch-all (``mirror.allRegistries``) is on.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MirrorStatus",
    "RegistryUse",
    "names_agent",
    "read_containerd_verdict",
    "read_hosts_toml",
]

MAX_HOSTS_TOML = 64 * 1024
RECHECK_SECONDS = 5.0
MARKER = "# managed-by:"
"""The first line of the files the chart writes (``# managed-by: p2p release NS/NAME``)."""
MERGED_MARK = "# p2p-merged:"
"""The second line of a file the chart merged the agent into."""
CATCH_ALL = "_default"
"""containerd's fallback host namespace: its hosts.toml applies to every registry without one."""
CONTAINERD_VERDICT = "containerd.json"
MAX_VERDICT_BYTES = 16 * 1024
MAX_HOSTS_SHOWN = 16
CONTAINERD_STATES = frozenset({"matches", "other", "unset", "unknown"})
DEFAULT_CAPABILITIES = ("pull", "resolve", "push")
"""containerd's capabilities of a host entry that names none."""


@dataclass
class _Use:
    mirror: int = 0
    rewrite: int = 0
    last_mirror_at: float | None = None
    last_rewrite_at: float | None = None


class RegistryUse:
    """Requests of the registry API per registry: with ``?ns=`` (mirror mode) or without
    (rewrite mode). Only configured registries are counted (others are refused)."""

    def __init__(self, *, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.by_registry: dict[str, _Use] = {}
        self.refused = 0
        """Mirror-mode requests for registries not accelerated here (answered 404 at once)."""
        self.last_refused_at: float | None = None

    def refuse(self) -> None:
        self.refused += 1
        self.last_refused_at = self.wall()

    def refused_view(self) -> dict[str, Any]:
        return {
            "refused_requests": self.refused,
            "last_refused_request_at": _round(self.last_refused_at),
        }

    def seen(self, registry: str, *, mirror: bool) -> None:
        use = self.by_registry.get(registry)
        if use is None:
            use = self.by_registry[registry] = _Use()
        if mirror:
            use.mirror += 1
            use.last_mirror_at = self.wall()
        else:
            use.rewrite += 1
            use.last_rewrite_at = self.wall()

    def view(self, registry: str) -> dict[str, Any]:
        use = self.by_registry.get(registry, _Use())
        return {
            "mirror_requests": use.mirror,
            "last_mirror_request_at": _round(use.last_mirror_at),
            "rewrite_requests": use.rewrite,
            "last_rewrite_request_at": _round(use.last_rewrite_at),
        }


def _round(at: float | None) -> float | None:
    return None if at is None else round(at, 3)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def names_agent(key: str, port: int) -> bool:
    """Whether a ``[host."..."]`` key of hosts.toml is this agent (loopback, our port)."""
    parts = urllib.parse.urlsplit(key if "://" in key else f"https://{key}")
    try:
        key_port = parts.port
    except ValueError:
        return False
    return parts.hostname is not None and _is_loopback(parts.hostname) and key_port == port


def read_hosts_toml(config_path: Path, registry: str, port: int) -> dict[str, Any]:
    """(Blocking, a small file.) What ``<config_path>/<registry>/hosts.toml`` does for
    ``registry``, with the agent's registry API on loopback port ``port``."""
    path = config_path / registry / "hosts.toml"
    found: dict[str, Any] = {
        "path": str(path),
        "managed_by": None,
        "modified_at": None,
        "merged": False,
        "hosts": [],
    }
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            data = file.read(MAX_HOSTS_TOML + 1)
    except FileNotFoundError:
        return found | {
            "state": "missing",
            "detail": "no hosts.toml: containerd pulls from the registry itself",
        }
    except OSError as exc:
        return found | {"state": "unreadable", "detail": exc.strerror or str(exc)}
    found["modified_at"] = round(stat.st_mtime, 3)
    head = data.split(b"\n", 2)
    first = head[0].decode("utf-8", "replace").strip()
    if first.startswith(MARKER):
        found["managed_by"] = first.removeprefix(MARKER).strip()[:200]
        second = head[1].decode("utf-8", "replace") if len(head) > 1 else ""
        found["merged"] = second.startswith(MERGED_MARK)
    if len(data) > MAX_HOSTS_TOML:
        return found | {"state": "invalid", "detail": f"larger than {MAX_HOSTS_TOML} bytes"}
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return found | {"state": "invalid", "detail": f"not TOML: {exc}"[:200]}
    hosts = doc.get("host")
    ours = None
    if isinstance(hosts, dict):
        ours = next((v for k, v in hosts.items() if names_agent(k, port)), None)
        found["hosts"] = [str(k)[:200] for k in list(hosts)[:MAX_HOSTS_SHOWN]]
    agent = f"loopback port {port}"
    if not isinstance(ours, dict):
        return found | {
            "state": "other",
            "detail": f"hosts.toml does not name this agent ({agent}): containerd does not "
            "pull through it",
        }
    capabilities = ours.get("capabilities", list(DEFAULT_CAPABILITIES))
    if not isinstance(capabilities, list) or "pull" not in capabilities:
        return found | {
            "state": "other",
            "detail": f"hosts.toml names this agent ({agent}) without the pull capability",
        }
    others = [h for h in found["hosts"] if not names_agent(h, port)]
    agent_first = bool(found["hosts"]) and names_agent(found["hosts"][0], port)
    detail = f"containerd pulls through this agent ({agent}) {'first' if agent_first else 'too'}"
    if found["merged"]:
        detail += f", then the {len(others)} other host(s) of the file p2p merged it into"
    if "resolve" not in capabilities:
        detail += "; tags are resolved at the registry (no resolve capability)"
    return found | {"state": "mirrored", "detail": detail}


def read_containerd_verdict(config_path: Path) -> dict[str, Any]:
    """(Blocking, a small file.) The mirror-config container's verdict on containerd's config
    (``<config_path>/containerd.json``, see :mod:`p2p_agent.mirror_files`): ``state``
    (``matches``, ``other``, ``unset``, ``unknown``), ``message`` (with the fix), ``config_file``,
    ``key``, ``config_path``, ``expected``, ``checked_at``."""
    path = config_path / CONTAINERD_VERDICT
    empty: dict[str, Any] = {
        "config_file": None,
        "key": None,
        "config_path": [],
        "expected": None,
        "checked_at": None,
    }
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            data = file.read(MAX_VERDICT_BYTES + 1)
    except FileNotFoundError:
        return empty | {
            "state": "unknown",
            "message": "containerd's config was not checked (yet): the mirror-config container "
            "writes its verdict here at each resync",
        }
    except OSError as exc:
        return empty | {"state": "unknown", "message": f"cannot read {path}: {exc.strerror}"}
    try:
        doc = json.loads(data) if len(data) <= MAX_VERDICT_BYTES else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("state") not in CONTAINERD_STATES:
        return empty | {"state": "unknown", "message": f"{path} is not a verdict"}

    def text(key: str) -> str | None:
        value = doc.get(key)
        return value[:1000] if isinstance(value, str) else None

    dirs = doc.get("config_path")
    return {
        "state": doc["state"],
        "message": text("message") or "",
        "config_file": text("config_file"),
        "key": text("key"),
        "config_path": [d[:500] for d in dirs[:8] if isinstance(d, str)]
        if isinstance(dirs, list)
        else [],
        "expected": text("expected"),
        "checked_at": round(stat.st_mtime, 3),
    }


class MirrorStatus:
    """The ``mirror`` part of the agent's status document (see the module docstring)."""

    def __init__(
        self,
        registries: Iterable[str],
        *,
        config_path: Path | None,
        port: Callable[[], int],
        use: RegistryUse,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registries = list(registries)
        self.config_path = config_path
        self.port = port
        self.use = use
        self.clock = clock
        self._files: dict[str, tuple[float, dict[str, Any]]] = {}

    def _cached(self, key: str, read: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        assert self.config_path is not None
        now = self.clock()
        cached = self._files.get(key)
        if cached is not None and now - cached[0] < RECHECK_SECONDS:
            return cached[1]
        found = read(self.config_path)
        self._files[key] = (now, found)
        return found

    def _file(self, registry: str) -> dict[str, Any]:
        if self.config_path is None:
            return {
                "state": "unknown",
                "detail": "mirrorConfigPath is not set: the agent cannot see containerd's "
                "hosts.toml files",
                "path": None,
                "managed_by": None,
                "modified_at": None,
                "merged": False,
                "hosts": [],
            }
        return self._cached(registry, lambda path: read_hosts_toml(path, registry, self.port()))

    def snapshot(self) -> dict[str, Any]:
        containerd = catch_all = None
        if self.config_path is not None:
            containerd = self._cached(" containerd", read_containerd_verdict)
            catch_all = self._cached(
                CATCH_ALL, lambda path: read_hosts_toml(path, CATCH_ALL, self.port())
            )
        return {
            "config_path": None if self.config_path is None else str(self.config_path),
            "containerd": containerd,
            "registries": [
                {"registry": registry, **self._file(registry), **self.use.view(registry)}
                for registry in self.registries
            ],
            "catch_all": None if catch_all is None else catch_all | self.use.refused_view(),
        }
