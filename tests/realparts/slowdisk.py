"""A deliberately slow disk: an ext4 file system on a loop device whose writes the kernel's block
I/O throttle holds to a set rate.

    with slow_disk(tmp_path, size_mib=256, write_bps=8_000_000) as disk:
        disk.mountpoint  # an empty, mounted ext4 file system
        disk.set_write_bps(0)  # unthrottled

The throttle is the blkio controller's ``blkio.throttle.write_bps_device`` of the root cgroup
(cgroup v1), which every process here and the kernel's writeback threads are in, so buffered
writes are held back too once the kernel writes them out; on a cgroup v2 host, ``io.max`` of this
process's cgroup (writeback is charged to the cgroup that dirtied the pages). Needs root and the
loop driver; fails (never skips) without them: the tests that use it are about a slow disk.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

V1_THROTTLE = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device")


def _run(*command: str) -> str:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def _v2_io_max() -> Path | None:
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for entry in line:
        if entry.startswith("0::"):
            path = Path("/sys/fs/cgroup") / entry[3:].lstrip("/") / "io.max"
            return path if path.exists() else None
    return None


@dataclass
class SlowDisk:
    mountpoint: Path
    device: str
    major_minor: str

    def set_write_bps(self, bps: int) -> None:
        """Writes to the device at most ``bps`` bytes per second (0 = unthrottled)."""
        if V1_THROTTLE.exists():
            V1_THROTTLE.write_text(f"{self.major_minor} {bps}\n")
            return
        io_max = _v2_io_max()
        if io_max is None:
            raise RuntimeError("no block I/O throttle: neither cgroup v1 blkio nor v2 io.max")
        io_max.write_text(f"{self.major_minor} wbps={bps or 'max'}\n")

    def written_bytes(self) -> int:
        """Bytes the device has written so far (its ``/sys/dev/block`` statistics: data,
        journal and metadata)."""
        fields = Path(f"/sys/dev/block/{self.major_minor}/stat").read_text().split()
        return int(fields[6]) * 512  # sectors written; the kernel counts 512-byte sectors


@contextlib.contextmanager
def slow_disk(
    workdir: Path, *, size_mib: int = 256, write_bps: int = 8_000_000
) -> Iterator[SlowDisk]:
    """A fresh throttled file system under ``workdir`` (removed, and the throttle lifted, after)."""
    if os.geteuid() != 0:
        pytest.fail("a throttled loop device needs root")
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "slowdisk.img"
    mountpoint = workdir / "mnt"
    mountpoint.mkdir(exist_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    device = _run("losetup", "--find", "--show", str(image))
    disk: SlowDisk | None = None
    mounted = False
    try:
        _run("mkfs.ext4", "-q", "-F", device)
        _run("mount", device, str(mountpoint))
        mounted = True
        stat = os.stat(device)
        disk = SlowDisk(mountpoint, device, f"{os.major(stat.st_rdev)}:{os.minor(stat.st_rdev)}")
        disk.set_write_bps(write_bps)
        yield disk
    finally:
        if disk is not None:
            with contextlib.suppress(OSError, RuntimeError):
                disk.set_write_bps(0)
        if mounted:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=120)
        subprocess.run(["losetup", "-d", device], check=False, timeout=60)
        image.unlink(missing_ok=True)
