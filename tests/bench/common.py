"""Helpers shared by the benchmarks."""

from __future__ import annotations

import os


def default_workdir() -> str | None:
    """tmpfs when there is one: this machine kind's disk throttles gigabyte writes so much that
    disk-backed rounds vary fivefold (docs/benchmarks.md); the benchmarks measure software."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
