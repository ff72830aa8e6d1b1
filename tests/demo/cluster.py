"""The demo's services as local processes: one tracker, the proxies and the agents.

:func:`plan_cluster` gives every service its ports (``free_port()``, all on 127.0.0.1), its YAML
configuration and its log file; :meth:`Cluster.start` writes the configs and starts the processes
(``p2p-tracker|p2p-proxy|p2p-agent --config FILE``, the console scripts beside this Python, or
``python -m`` the package); :meth:`Cluster.wait_ready` waits for every ``/readyz``.

Every process (the registry too) is registered in a :class:`ProcessSet`, which stops them all:
SIGTERM to every one at once, a bounded wait, then SIGKILL for whatever is left. One signal
only: a second SIGTERM means "stop at once" to the services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import trio
import yaml

from tests.realparts.procs import ManagedProcess, free_port

__all__ = [
    "Cluster",
    "ClusterError",
    "ProcessSet",
    "Service",
    "StopResult",
    "plan_cluster",
    "service_command",
]

Kind = Literal["tracker", "proxy", "agent"]
KINDS: tuple[Kind, ...] = ("tracker", "proxy", "agent")
HOST = "127.0.0.1"
ANNOUNCE_INTERVAL = 5
"""Seconds between the agents' regular announces: short, so the young swarm meshes quickly."""


class ClusterError(RuntimeError):
    """A service could not be started, did not become ready, or died; ``log`` is its log."""

    def __init__(self, message: str, *, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


def service_command(kind: Kind) -> list[str]:
    """The command that runs a service: its console script beside this interpreter, on PATH,
    or ``python -m p2p_<kind>``."""
    script = f"p2p-{kind}"
    beside = Path(sys.executable).with_name(script)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(script)
    if found is not None:
        return [found]
    return [sys.executable, "-m", f"p2p_{kind}"]


def last_lines(path: Path, count: int = 8) -> list[str]:
    """The last ``count`` lines of a log (empty if unreadable)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 32 * 1024))
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-count:]


@dataclass
class Service:
    """One tracker, proxy or agent process."""

    name: str
    kind: Kind
    config: dict[str, Any]
    config_path: Path
    log_path: Path
    process: ManagedProcess | None = None

    @property
    def ready_url(self) -> str:
        """``/readyz``: the agent serves it on ``metricsListen``, the others on ``listen``."""
        where = self.config["metricsListen"] if self.kind == "agent" else self.config["listen"]
        return f"http://{where}/readyz"

    @property
    def url(self) -> str:
        """The API: the agent's registry API, the proxy's agent API, the tracker's announce."""
        return f"http://{self.config['listen']}"

    @property
    def metrics_url(self) -> str:
        where = self.config["metricsListen"] if self.kind == "agent" else self.config["listen"]
        return f"http://{where}/metrics"

    @property
    def data_dir(self) -> Path | None:
        value = self.config.get("dataDir")
        return None if value is None else Path(value)

    def describe_port(self) -> str:
        return str(self.config["listen"]).rpartition(":")[2]

    def failure(self, what: str) -> ClusterError:
        """A :class:`ClusterError` naming this service, its log and the log's last line."""
        tail = [line for line in last_lines(self.log_path) if line.strip()]
        last = f"; last log line: {tail[-1].strip()}" if tail else ""
        return ClusterError(f"{self.name} {what} (log: {self.log_path}){last}", log=self.log_path)


@dataclass(frozen=True)
class StopResult:
    name: str
    returncode: int | None
    stopped: bool
    """It was running when the stop began (else it had exited before)."""
    graceful: bool
    """It exited 0 by itself within the bound after the one SIGTERM."""


@dataclass
class ProcessSet:
    """Every process the demo started, stopped together (see the module docstring)."""

    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    def add(self, name: str, process: ManagedProcess) -> None:
        """Register a started process."""
        self.processes[name] = process

    def pids(self) -> dict[str, int]:
        """Process ids by name (every registered process has been started)."""
        return {name: process.pid for name, process in self.processes.items()}

    def stop_all(self, timeout: float = 10.0) -> list[StopResult]:
        """SIGTERM to every running process, wait up to ``timeout`` s, then SIGKILL the rest.

        Blocking and idempotent. Also kills leftover children in each process group.
        """
        running = {n: p for n, p in self.processes.items() if p.running}
        for process in running.values():
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.running for p in running.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        results = []
        for name, process in self.processes.items():
            graceful = name in running and not process.running
            # Already exited: only reaps and kills leftovers in its group. Still running after
            # the bound: SIGTERM again (the services then stop at once) and SIGKILL soon after.
            code = process.stop(timeout=1.0)
            results.append(StopResult(name, code, name in running, graceful and code == 0))
        return results

    def kill_all(self) -> None:
        """SIGKILL everything at once (a second Ctrl-C during the stop)."""
        for process in self.processes.values():
            with contextlib.suppress(Exception):
                process.kill()


@dataclass
class Cluster:
    """The planned services of one demo run (see :func:`plan_cluster`)."""

    services: list[Service]
    pending: list[Service] = field(default_factory=list)
    """Services not ready yet (see :meth:`wait_ready`)."""

    def of(self, kind: Kind) -> list[Service]:
        return [s for s in self.services if s.kind == kind]

    @property
    def agents(self) -> list[Service]:
        return self.of("agent")

    def start(self, processes: ProcessSet) -> None:
        """Write every config and start every process (quick: does not wait)."""
        for service in self.services:
            service.config_path.parent.mkdir(parents=True, exist_ok=True)
            service.config_path.write_text(yaml.safe_dump(service.config, sort_keys=False))
            if service.data_dir is not None:
                service.data_dir.mkdir(parents=True, exist_ok=True)
            process = ManagedProcess(
                [*service_command(service.kind), "--config", str(service.config_path)],
                service.log_path,
                name=service.name,
                stop_timeout=10.0,
            )
            # Settings come from the config files only: drop P2P_* overrides of the caller.
            process.env = {k: v for k, v in process.env.items() if not k.startswith("P2P_")}
            service.process = process
            process.start()
            processes.add(service.name, process)

    async def wait_ready(self) -> None:
        """Wait until every service answers ``/readyz`` with 200 (the caller bounds the wait;
        :attr:`pending` then names those not ready). Raises :class:`ClusterError` naming the
        first service that exits meanwhile."""
        self.pending = list(self.services)
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
            while self.pending:
                for service in list(self.pending):
                    self.check_alive([service], "during start-up")
                    try:
                        response = await client.get(service.ready_url)
                    except httpx.TransportError:
                        continue
                    if response.status_code == 200:
                        self.pending.remove(service)
                if self.pending:
                    await trio.sleep(0.1)

    def check_alive(self, services: Iterable[Service] | None = None, when: str = "") -> None:
        """Raise :class:`ClusterError` if any of ``services`` (default all) has exited."""
        for service in self.services if services is None else services:
            process = service.process
            if process is not None and process.returncode is not None:
                raise service.failure(f"exited with status {process.returncode} {when}".strip())


def plan_cluster(
    workdir: Path,
    registry_url: str,
    *,
    agents: int,
    proxies: int = 2,
    overrides: dict[Kind, dict[str, Any]] | None = None,
) -> Cluster:
    """Ports, configs and log paths of one tracker, ``proxies`` proxies and ``agents`` agents.

    ``overrides`` adds or replaces configuration keys per kind (``--set agent.KEY=VALUE``).
    """
    overrides = overrides or {}
    config_dir, data_dir, log_dir = workdir / "config", workdir / "data", workdir / "logs"

    def service(name: str, kind: Kind, config: dict[str, Any]) -> Service:
        config.update(overrides.get(kind, {}))
        return Service(name, kind, config, config_dir / f"{name}.yaml", log_dir / f"{name}.log")

    tracker_port = free_port()
    tracker = service(
        "tracker",
        "tracker",
        {"listen": f"{HOST}:{tracker_port}", "announceInterval": ANNOUNCE_INTERVAL},
    )
    announce = f"http://{HOST}:{tracker_port}/announce"
    proxy_services = [
        service(
            f"proxy-{n}",
            "proxy",
            {
                "listen": f"{HOST}:{free_port()}",
                "peerPort": free_port(),
                "dataDir": str(data_dir / f"proxy-{n}"),
                "registry": registry_url,
                "trackers": [announce],
            },
        )
        for n in range(1, proxies + 1)
    ]
    proxy_urls = [p.url for p in proxy_services]
    agent_services = [
        service(
            f"agent-{n}",
            "agent",
            {
                "listen": f"{HOST}:{free_port()}",
                "metricsListen": f"{HOST}:{free_port()}",
                "peerPort": free_port(),
                "dataDir": str(data_dir / f"agent-{n}"),
                "registry": registry_url,
                "proxies": proxy_urls,
                "downloadRate": 0,
                "uploadRate": 0,
                # The demo's blobs stay whatever else fills this machine's disk (an agent
                # evicts above 85% of its filesystem by default).
                "cacheHighWatermark": 0,
            },
        )
        for n in range(1, agents + 1)
    ]
    return Cluster([tracker, *proxy_services, *agent_services])
