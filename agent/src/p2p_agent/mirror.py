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
:data:`RECHECK_SECONDS` per registry), never the certificates or keys beside it.
"""

from __future__ import annotations

import ipaddress
import os
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MirrorStatus", "RegistryUse", "read_hosts_toml"]

MAX_HOSTS_TOML = 64 * 1024
RECHECK_SECONDS = 5.0
MARKER = "# managed-by:"
"""The first line of the files the chart writes (``# managed-by: p2p release NS/NAME``)."""
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


def _names_agent(key: str, port: int) -> bool:
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
    found: dict[str, Any] = {"path": str(path), "managed_by": None, "modified_at": None}
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
    first = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if first.startswith(MARKER):
        found["managed_by"] = first.removeprefix(MARKER).strip()[:200]
    if len(data) > MAX_HOSTS_TOML:
        return found | {"state": "invalid", "detail": f"larger than {MAX_HOSTS_TOML} bytes"}
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return found | {"state": "invalid", "detail": f"not TOML: {exc}"[:200]}
    hosts = doc.get("host")
    ours = None
    if isinstance(hosts, dict):
        ours = next((v for k, v in hosts.items() if _names_agent(k, port)), None)
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
    detail = f"containerd pulls through this agent ({agent}) first"
    if "resolve" not in capabilities:
        detail += "; tags are resolved at the registry (no resolve capability)"
    return found | {"state": "mirrored", "detail": detail}


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

    def _file(self, registry: str) -> dict[str, Any]:
        if self.config_path is None:
            return {
                "state": "unknown",
                "detail": "mirrorConfigPath is not set: the agent cannot see containerd's "
                "hosts.toml files",
                "path": None,
                "managed_by": None,
                "modified_at": None,
            }
        now = self.clock()
        cached = self._files.get(registry)
        if cached is not None and now - cached[0] < RECHECK_SECONDS:
            return cached[1]
        found = read_hosts_toml(self.config_path, registry, self.port())
        self._files[registry] = (now, found)
        return found

    def snapshot(self) -> dict[str, Any]:
        return {
            "config_path": None if self.config_path is None else str(self.config_path),
            "registries": [
                {"registry": registry, **self._file(registry), **self.use.view(registry)}
                for registry in self.registries
            ],
        }
