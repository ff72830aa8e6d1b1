"""CPU quotas for the rollout benchmark's peer processes (``--cpu-quota``), with the cgroup v1
``cpu`` controller.

One cgroup per emulated node, ``/sys/fs/cgroup/cpu/p2prb-<run>-<node>/``, with
``cpu.cfs_period_us = 100000`` and ``cpu.cfs_quota_us = CORES * 100000``; the node's peer process
(its agent, or its libtorrent leecher) is moved into it by writing its PID to ``cgroup.procs``
(every thread of the process moves with it, and its children start inside). A node runs one peer
process at a time, so each process gets the whole quota.

The cgroups are removed when the run ends (after its processes are stopped), and a run removes
the cgroups of earlier runs whose process is gone (a crashed run), killing whatever is still
inside them, as it does with their namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

from tests.bench.rollout.netns import PREFIX, RolloutError, pid_alive

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
"""Where the cgroup v1 ``cpu`` controller is mounted on this machine kind."""
PERIOD_US = 100_000
"""``cpu.cfs_period_us``: the quota is enforced over 100 ms windows."""
MIN_CORES, MAX_CORES = 0.01, 64.0
"""The kernel wants a quota of at least 1 ms per period; 64 cores is a sanity bound."""


class CgroupError(RolloutError):
    """A CPU quota was asked for and cannot be set up here (the benchmark exits with 2)."""


def quota_us(cores: float, period_us: int = PERIOD_US) -> int:
    """``cpu.cfs_quota_us`` for ``cores`` CPUs' worth of time per period (0.2 -> 20000)."""
    if not MIN_CORES <= cores <= MAX_CORES:
        raise ValueError(f"a CPU quota must be between {MIN_CORES:g} and {MAX_CORES:g} cores")
    return round(cores * period_us)


def parse_cpu_quota(text: str) -> float:
    """The ``--cpu-quota`` value: cores as a decimal number (``0.2``, ``1``, ``1.5``)."""
    try:
        cores = float(text)
    except ValueError:
        raise ValueError(f"not a number of cores such as 0.2: {text!r}") from None
    if cores != cores or cores in (float("inf"), float("-inf")):  # NaN, inf
        raise ValueError(f"not a number of cores such as 0.2: {text!r}")
    quota_us(cores)  # range check
    return cores


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _kill_tasks(group: Path) -> None:
    try:
        pids = (group / "cgroup.procs").read_text().split()
    except OSError:
        return
    for word in pids:
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _remove(group: Path, timeout: float = 5.0) -> bool:
    """rmdir a cgroup, killing what is left inside; True once it is gone."""
    deadline = time.monotonic() + timeout
    while group.exists():
        try:
            group.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                return False
            _kill_tasks(group)  # tasks left: kill them, wait for them to be reaped
            time.sleep(0.05)
    return True


def remove_stale_cgroups(root: Path = CPU_ROOT) -> list[str]:
    """Delete the cgroups of earlier runs whose owner process is gone; return their names."""
    stale = []
    with contextlib.suppress(OSError):
        for group in root.glob(f"{PREFIX}*"):
            match = re.match(re.escape(PREFIX) + r"(\d+)-", group.name)
            if match and group.is_dir() and not pid_alive(int(match[1])) and _remove(group):
                stale.append(group.name)
    return stale


class CpuQuotas:
    """One ``cpu`` cgroup per node of a run, each limited to ``cores`` CPUs."""

    def __init__(self, run_id: str, cores: float, root: Path = CPU_ROOT) -> None:
        self.run_id = run_id
        self.cores = cores
        self.quota_us = quota_us(cores)
        self.root = root
        self.groups: dict[str, Path] = {}
        """Created cgroups by node name."""
        self.moved: dict[str, list[int]] = {}
        """PIDs put into each node's cgroup, in order."""

    def path(self, node: str) -> Path:
        return self.root / f"{PREFIX}{self.run_id}-{node}"

    def create(self, nodes: list[str]) -> None:
        """Create and configure every node's cgroup; :class:`CgroupError` if one cannot be."""
        if not (self.root / "cgroup.procs").exists():
            raise CgroupError(
                f"--cpu-quota needs the cgroup v1 cpu controller at {self.root} "
                "(it is not mounted here)"
            )
        for node in nodes:
            group = self.path(node)
            try:
                group.mkdir()
                self.groups[node] = group
                _write(group / "cpu.cfs_period_us", str(PERIOD_US))
                _write(group / "cpu.cfs_quota_us", str(self.quota_us))
                written = (group / "cpu.cfs_quota_us").read_text().strip()
            except OSError as exc:
                raise CgroupError(
                    f"--cpu-quota: cannot create or configure the cgroup {group} ({exc}); "
                    "it needs root and a writable cgroup v1 cpu controller"
                ) from None
            if written != str(self.quota_us):
                raise CgroupError(
                    f"--cpu-quota: {group}/cpu.cfs_quota_us reads {written}, "
                    f"not the {self.quota_us} written"
                )

    def add(self, node: str, pid: int) -> None:
        """Move process ``pid`` (all its threads) into ``node``'s cgroup."""
        group = self.groups[node]
        try:
            _write(group / "cgroup.procs", str(pid))
            inside = (group / "cgroup.procs").read_text().split()
        except OSError as exc:
            raise CgroupError(f"--cpu-quota: cannot move pid {pid} into {group}: {exc}") from None
        if str(pid) not in inside:
            raise CgroupError(f"--cpu-quota: pid {pid} is not in {group} after moving it")
        self.moved.setdefault(node, []).append(pid)

    def throttled(self) -> dict[str, dict[str, int]]:
        """Per node, ``cpu.stat``: periods, throttled periods, throttled nanoseconds."""
        found: dict[str, dict[str, int]] = {}
        for node, group in self.groups.items():
            with contextlib.suppress(OSError, ValueError):
                found[node] = {
                    key: int(value)
                    for key, value in (
                        line.split() for line in (group / "cpu.stat").read_text().splitlines()
                    )
                }
        return found

    def close(self) -> list[str]:
        """Remove every cgroup (killing anything left inside); the names that would not go."""
        left = [str(group) for group in self.groups.values() if not _remove(group)]
        self.groups.clear()
        return left
