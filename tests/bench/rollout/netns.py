"""The emulated network of the rollout benchmark: one network namespace per host, a switch
namespace with a bridge, and every link shaped to its rate in both directions with two egress
token buckets (the topology is drawn in :mod:`tests.bench.bench_rollout`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.realparts.procs import clean_env, require

PREFIX = "p2prb-"
"""Every namespace this benchmark creates is named ``p2prb-<pid>-<random>-<host>``."""
SUBNET = "10.77.0"
ORIGIN_IP, INFRA_IP = f"{SUBNET}.1", f"{SUBNET}.2"
QUEUE_MS = 50
"""Default tbf queue bound (``latency``) in milliseconds, as REAL-PARTS.md measured it."""


class RolloutError(RuntimeError):
    """The benchmark could not run or a pull failed; the message says what and where."""


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_rate(text: str) -> int:
    """Bits per second of a tc-style rate: ``100mbit``, ``1gbit``, ``800kbit`` or plain bits."""
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"not a rate such as 100mbit or 1gbit: {text!r}")
    bps = int(float(match[1]) * _RATE_UNITS[(match[2] or "bit").lower()])
    if not 1_000_000 <= bps <= 10 * 10**9:
        raise ValueError(f"rate {text!r} is outside 1mbit..10gbit")
    return bps


def tbf_burst(rate_bps: int) -> int:
    """Token bucket size in bytes: 256 KiB (REAL-PARTS.md), more above ~500 Mbit/s so the bucket
    holds at least 4 ms of traffic (a timer tick at HZ=250)."""
    return max(256 * 1024, rate_bps // 8 // 250)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass(frozen=True)
class Host:
    """One emulated machine: a network namespace with one veth link to the switch."""

    role: str
    """``origin``, ``infra`` or ``node<i>``."""
    index: int
    address: str
    netns: str

    @property
    def switch_port(self) -> str:
        """The veth end in the switch namespace (its egress is this host's download)."""
        return f"h{self.index}"


def run_ip(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> str:
    """Run an ``ip``/``tc`` command; a failure raises :class:`RolloutError` with its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=clean_env(),
        )
    except subprocess.TimeoutExpired as exc:
        raise RolloutError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from exc
    if check and done.returncode != 0:
        raise RolloutError(
            f"`{' '.join(argv)}` failed (status {done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of the network namespaces in /run/netns (``ip netns list``)."""
    out = run_ip([require("ip"), "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leftover_namespaces(run_id: str | None = None) -> list[str]:
    """This benchmark's namespaces (of one run, or of any run) that exist right now."""
    prefix = PREFIX + (f"{run_id}-" if run_id else "")
    return [name for name in list_namespaces() if name.startswith(prefix)]


def _kill_inside(netns: str) -> None:
    """SIGKILL every process still inside ``netns`` (by PID, from ``ip netns pids``)."""
    out = run_ip([require("ip"), "netns", "pids", netns], check=False)
    for word in out.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _delete_namespace(netns: str) -> None:
    _kill_inside(netns)
    run_ip([require("ip"), "netns", "delete", netns], check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces of earlier runs whose owner process is gone; return their names."""
    stale = []
    for name in leftover_namespaces():
        match = re.match(re.escape(PREFIX) + r"(\d+)-", name)
        if match and not pid_alive(int(match[1])):
            _delete_namespace(name)
            stale.append(name)
    return stale


class Network:
    """The switch namespace with its bridge and one shaped veth link per host.

    :meth:`close` deletes every namespace it made (which removes the veths and the bridge) after
    killing any process still inside one; it is idempotent and safe after a partial build.
    """

    def __init__(
        self,
        run_id: str,
        rate_bps: int,
        nodes: int,
        infra_rate_bps: int | None = None,
        *,
        queue_ms: int = QUEUE_MS,
        tcp_cc: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.queue_ms = queue_ms
        self.tcp_cc = tcp_cc
        self.rate_bps = rate_bps
        self.infra_rate_bps = infra_rate_bps or rate_bps
        self.ip = require("ip")
        self.tc = require("tc")
        self.switch = f"{PREFIX}{run_id}-sw"
        self.hosts = [
            Host("origin", 1, ORIGIN_IP, f"{PREFIX}{run_id}-origin"),
            Host("infra", 2, INFRA_IP, f"{PREFIX}{run_id}-infra"),
            *(
                Host(f"node{i}", 10 + i, f"{SUBNET}.{10 + i}", f"{PREFIX}{run_id}-node{i}")
                for i in range(1, nodes + 1)
            ),
        ]
        self.created: list[str] = []
        self.commands: list[str] = []
        """Every ``ip``/``tc`` command run, in order (reported for the docs)."""

    @property
    def origin(self) -> Host:
        return self.hosts[0]

    @property
    def infra(self) -> Host:
        return self.hosts[1]

    @property
    def nodes(self) -> list[Host]:
        return self.hosts[2:]

    def _run(self, *argv: str) -> str:
        self.commands.append(" ".join(argv))
        return run_ip(argv)

    def _add_namespace(self, name: str) -> None:
        try:
            self._run(self.ip, "netns", "add", name)
        except RolloutError as exc:
            raise RolloutError(
                f"cannot create network namespaces ({exc}); this benchmark needs root "
                "(CAP_SYS_ADMIN and CAP_NET_ADMIN) and a kernel with network namespaces"
            ) from None
        self.created.append(name)

    def rate_of(self, host: Host) -> int:
        return self.infra_rate_bps if host.role == "infra" else self.rate_bps

    def tbf(self, netns: str, dev: str, rate_bps: int | None = None) -> list[str]:
        """The tc command that shapes ``dev``'s egress in ``netns`` to ``rate_bps`` (default:
        the common rate)."""
        rate = rate_bps or self.rate_bps
        return [
            self.tc,
            "-n",
            netns,
            "qdisc",
            "replace",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            f"{rate}bit",
            "burst",
            str(tbf_burst(rate)),
            "latency",
            f"{self.queue_ms}ms",
        ]

    def build(self) -> None:
        """Create the switch, the hosts, their links, addresses and shaping."""
        self._add_namespace(self.switch)
        self._run(self.ip, "-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._run(self.ip, "-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts:
            self._add_namespace(host.netns)
            self._run(
                self.ip, "link", "add", "eth0", "netns", host.netns, "type", "veth",
                "peer", "name", host.switch_port, "netns", self.switch,
            )  # fmt: skip
            self._run(
                self.ip, "-n", self.switch, "link", "set", host.switch_port, "master", "br0", "up"
            )
            self._run(self.ip, "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            self._run(self.ip, "-n", host.netns, "link", "set", "eth0", "up")
            self._run(self.ip, "-n", host.netns, "link", "set", "lo", "up")
            if self.tcp_cc:
                # Per route: a namespace may not set a restricted default (only init_net may).
                self._run(
                    self.ip, "-n", host.netns, "route", "replace", f"{SUBNET}.0/24", "dev",
                    "eth0", "src", host.address, "congctl", self.tcp_cc,
                )  # fmt: skip
            rate = self.rate_of(host)
            self._run(*self.tbf(host.netns, "eth0", rate))  # upload
            self._run(*self.tbf(self.switch, host.switch_port, rate))  # download

    def close(self) -> None:
        """Delete every namespace made (hosts first, the switch last)."""
        for name in reversed(self.created):
            _delete_namespace(name)
        self.created.clear()

    def egress_counters(self, host: Host) -> dict[str, int]:
        """``bytes``, ``packets``, ``drops`` the host's upload token bucket has sent or dropped
        so far (``tc -s qdisc`` of its ``eth0``); empty if tc cannot tell."""
        out = run_ip(
            [self.tc, "-n", host.netns, "-s", "-j", "qdisc", "show", "dev", "eth0"], check=False
        )
        try:
            qdiscs = json.loads(out or "[]")
        except ValueError:
            return {}
        for qdisc in qdiscs:
            if qdisc.get("kind") == "tbf":
                return {key: int(qdisc.get(key, 0)) for key in ("bytes", "packets", "drops")}
        return {}

    def exec_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return [self.ip, "netns", "exec", host.netns, *argv]

    def http(self, host: Host, url: str, timeout: float = 3.0) -> tuple[int, str]:
        """(status, body) of a GET from inside ``host`` with curl; status 0 if nothing answered."""
        out = run_ip(
            self.exec_argv(
                host,
                [require("curl"), "-s", "-m", f"{timeout:g}", "-w", "\n%{http_code}", url],
            ),
            check=False,
            timeout=timeout + 10,
        )
        body, _, status = out.rpartition("\n")
        return (int(status) if status.strip().isdigit() else 0), body
