"""A node as the chart's mirror containers see it, for running the rendered mirror.sh for real
(tests/chart/test_chart_mirror.py, tests/integration/test_mirror_compat.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import yaml

from tests.chart.conftest import CHART, RELEASE, Rendered


def render_chart(values: dict[str, Any], *, namespace: str = "kube-system") -> Rendered:
    """The chart rendered with the real Helm engine (outside the chart tests' cached fixture)."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
    objects = [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return Rendered(objects, "")


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


def materialise(rendered: Rendered, source: Path) -> None:
    """Lay the p2p-mirror ConfigMap out as the pod's `mirror` volume (keys mapped to paths)."""
    spec = rendered.pod_spec("DaemonSet", "p2p-agent")
    volume = by_name(spec["volumes"])["mirror"]["configMap"]
    data = rendered.get("ConfigMap", volume["name"])["data"]
    if source.exists():
        shutil.rmtree(source)
    for item in volume["items"]:
        target = source / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[item["key"]])


class Node:
    """One node's view: the mounted ConfigMap, containerd's config_path and containerd's config
    directory (and, with ``state``, the directory the agent sees copies of the hosts.toml files
    in). The script runs with the mirror-config container's environment as rendered, its paths
    mapped to these directories, and this interpreter as its Python (with p2p_agent)."""

    def __init__(
        self, root: Path, rendered: Rendered, *, state: bool = False, merge: bool | None = None
    ) -> None:
        self.source = root / "etc-p2p-mirror"
        self.certs = root / "certs.d"
        self.certs.mkdir()
        self.containerd = root / "containerd-config"
        self.containerd.mkdir()
        self.state = root / "mirror-state" if state else None
        if self.state is not None:
            self.state.mkdir()
        self.rendered = rendered
        self.merge = merge
        materialise(rendered, self.source)

    @property
    def rendered_env(self) -> dict[str, str]:
        spec = self.rendered.pod_spec("DaemonSet", "p2p-agent")
        keeper = by_name(spec["containers"])["mirror-config"]
        return {e["name"]: e["value"] for e in keeper["env"]}

    @property
    def containerd_config(self) -> Path:
        """containerd's config file as this node's mirror containers see it."""
        return self.containerd / Path(self.rendered_env["P2P_CONTAINERD_CONFIG"]).name

    def env(self, interval: str = "60") -> dict[str, str]:
        env = {
            **self.rendered_env,
            "PATH": os.environ["PATH"],
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "P2P_MIRROR_PYTHON": sys.executable,
            "P2P_MIRROR_SOURCE": str(self.source),
            "P2P_MIRROR_TARGET": str(self.certs),
            "P2P_MIRROR_INTERVAL": interval,
            "P2P_CONTAINERD_CONFIG": str(self.containerd_config),
        }
        if self.merge is not None:
            env["P2P_MIRROR_MERGE"] = "1" if self.merge else "0"
        if self.state is None:
            del env["P2P_MIRROR_STATE"]
        else:
            env["P2P_MIRROR_STATE"] = str(self.state)
        return env

    def run(self, mode: str) -> str:
        done = subprocess.run(
            ["/bin/sh", str(self.source / "mirror.sh"), mode],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout + done.stderr

    def files(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.certs)): p.read_text()
            for p in sorted(self.certs.rglob("*"))
            if p.is_file()
        }
