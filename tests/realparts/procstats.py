"""What a running process holds, read from ``/proc``: memory (VmRSS, VmHWM) and open files.

Load tests and benchmarks use it to bound a service process's memory and to check that its file
descriptors come back after a load (sockets and files of cancelled requests closed).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.realparts.procs import clean_env, require

__all__ = [
    "Connection",
    "MiB",
    "ProcStats",
    "open_fds",
    "proc_stats",
    "socket_fds",
    "tcp_sockets",
]

MiB = 1024 * 1024


@dataclass(frozen=True)
class ProcStats:
    rss: int
    """Resident set size now (VmRSS), bytes."""
    hwm: int
    """Peak resident set size since the process started (VmHWM), bytes."""
    fds: int
    """Open file descriptors."""
    threads: int


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _kib(value: str) -> int:
    number, _, unit = value.partition(" ")
    assert unit == "kB", value
    return int(number) * 1024


def open_fds(pid: int) -> list[str]:
    """Where each open file descriptor of ``pid`` points (``socket:[…]``, a path, …)."""
    base = f"/proc/{pid}/fd"
    found = []
    for name in os.listdir(base):
        try:
            found.append(os.readlink(f"{base}/{name}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return found


def socket_fds(pid: int) -> int:
    return sum(1 for target in open_fds(pid) if target.startswith("socket:"))


@dataclass(frozen=True)
class Connection:
    """One TCP socket of a process, as ``ss`` shows it."""

    state: str
    local: str
    peer: str

    @property
    def local_port(self) -> int:
        return int(self.local.rpartition(":")[2])

    @property
    def peer_port(self) -> int | None:
        port = self.peer.rpartition(":")[2]
        return None if port == "*" else int(port)

    def __str__(self) -> str:
        return f"{self.state} {self.local} {self.peer}"


def tcp_sockets(pid: int) -> list[Connection]:
    """The TCP sockets (listening ones too) of ``pid``."""
    out = subprocess.run(
        [require("ss"), "-H", "-t", "-a", "-n", "-p"],
        check=True,
        capture_output=True,
        text=True,
        env=clean_env(),
    ).stdout
    marker = f"pid={pid},"
    found = []
    for line in out.splitlines():
        if marker in line:
            fields = line.split()
            found.append(Connection(fields[0], fields[3], fields[4]))
    return found


def proc_stats(pid: int) -> ProcStats:
    """Memory and descriptors of a live process (raises ``FileNotFoundError`` once it exited)."""
    status = _status(pid)
    return ProcStats(
        rss=_kib(status["VmRSS"]),
        hwm=_kib(status["VmHWM"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
    )
