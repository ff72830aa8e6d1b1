"""Debian's ``tinyproxy`` as a real forward (egress) HTTP proxy on 127.0.0.1.

How it is run (see :func:`run_tinyproxy`)::

    /usr/bin/tinyproxy -d -c WORKDIR/tinyproxy.conf

with ``tinyproxy.conf``::

    Port PORT
    Listen 127.0.0.1
    LogFile "WORKDIR/tinyproxy.log"
    LogLevel Connect
    Allow 127.0.0.1
    BasicAuth USER PASSWORD        (when credentials are asked for)
    DisableViaHeader Yes

Facts this relies on (checked on Debian 12, tinyproxy 1.11.1):

- ``-d`` keeps it in the foreground; started as root without ``User`` it warns and stays root.
- Without any ``ConnectPort`` line every port may be tunnelled with ``CONNECT`` (the packaged
  config allows 443 and 563 only).
- ``LogLevel Connect`` logs one ``Request (file descriptor N): <request line>`` per request it
  reads from a client: ``CONNECT 127.0.0.1:5000 HTTP/1.1`` for a tunnel (https targets; what
  goes through the tunnel is not seen), ``GET http://127.0.0.1:5001/token?... HTTP/1.1`` for
  plain http targets. A request without the right ``Proxy-Authorization`` is answered 407 (and
  logged before that).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.realparts.procs import ManagedProcess, free_port, require

__all__ = ["TinyProxy", "run_tinyproxy"]

_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


@dataclass
class TinyProxy:
    port: int
    log_path: Path
    daemon: ManagedProcess
    credentials: tuple[str, str] | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The proxy URL, with its credentials when it asks for them."""
        if self.credentials is None:
            return f"http://{self.address}"
        user, password = self.credentials
        return f"http://{user}:{password}@{self.address}"

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request clients sent it so far, in order."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return _REQUEST.findall(text)

    def targets(self) -> list[str]:
        """The ``host:port`` of every request (the tunnel's for ``CONNECT``)."""
        found = []
        for method, target in self.requests():
            if method == "CONNECT":
                found.append(target)
            else:
                found.append(target.split("://", 1)[-1].split("/", 1)[0])
        return found


@contextmanager
def run_tinyproxy(
    workdir: Path, *, credentials: tuple[str, str] | None = None
) -> Iterator[TinyProxy]:
    """Start tinyproxy on 127.0.0.1 under ``workdir``; stop it (by PID) on exit."""
    binary = require("tinyproxy")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "tinyproxy.log"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 60",
        f'LogFile "{log_path}"',
        "LogLevel Connect",
        "MaxClients 200",
        "Allow 127.0.0.1",
        "DisableViaHeader Yes",
    ]
    if credentials is not None:
        lines.append(f"BasicAuth {credentials[0]} {credentials[1]}")
    config = workdir / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    daemon = ManagedProcess([binary, "-d", "-c", str(config)], workdir / "tinyproxy.out")
    with daemon:
        daemon.wait_port(port)
        yield TinyProxy(port, log_path, daemon, credentials)
