"""Finding and starting the project's own console scripts in process-level tests."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def service_binary(name: str) -> str:
    """Absolute path of ``p2p-<name>`` (beside this interpreter, else on PATH); fails the test
    when the package is not installed."""
    script = f"p2p-{name}"
    beside = Path(sys.executable).with_name(script)
    found = str(beside) if beside.exists() else shutil.which(script)
    if found is None:
        pytest.fail(f"the {script} console script is not installed (pip install -e ./{name})")
    return found


def service_env(**extra: str) -> dict[str, str]:
    """This process's environment without any ``P2P_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2P_")}
    env.update(extra)
    return env


class ConfigMapVolume:
    """A directory kept the way kubelet keeps a ConfigMap volume: each version in its own
    directory, ``..data`` swapped atomically, the file a symlink through ``..data``."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.version = 0
        root.mkdir(parents=True)

    @property
    def file(self) -> Path:
        return self.root / self.name

    def publish(self, text: str) -> None:
        self.version += 1
        data = self.root / f"..2026_11_26_00_00_{self.version:02d}"
        data.mkdir()
        (data / self.name).write_text(text)
        staging = self.root / "..data_tmp"
        staging.symlink_to(data.name)
        staging.rename(self.root / "..data")
        if not self.file.is_symlink():
            self.file.symlink_to(f"..data/{self.name}")
