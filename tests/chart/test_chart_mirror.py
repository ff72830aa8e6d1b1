"""Mirror mode: hosts.toml files for containerd, written while an agent runs on the node.

The rendered shell scripts are run here with /bin/sh (dash, as in the python:slim images) against
temporary directories laid out the way kubelet mounts the ConfigMap volume.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

from p2p_agent.mirror import read_hosts_toml
from tests.chart.conftest import REQUIRED, VALUE_SETS, Render, Rendered, merged

MIRROR = {
    "registry": ["registry.example.com", "http://registry.internal:5000", "ghcr.example.org"],
    "mirror": {"enabled": True},
}
MARKER = "# managed-by: p2p release kube-system/p2p"


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
    """One node's view: the mounted ConfigMap and containerd's config_path (and, with
    ``state``, the directory the agent sees copies of the hosts.toml files in)."""

    def __init__(self, root: Path, rendered: Rendered, *, state: bool = False) -> None:
        self.source = root / "etc-p2p-mirror"
        self.certs = root / "certs.d"
        self.certs.mkdir()
        self.state = root / "mirror-state" if state else None
        if self.state is not None:
            self.state.mkdir()
        self.rendered = rendered
        materialise(rendered, self.source)

    def env(self, interval: str = "60") -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "P2P_MIRROR_SOURCE": str(self.source),
            "P2P_MIRROR_TARGET": str(self.certs),
            "P2P_MIRROR_INTERVAL": interval,
        }
        if self.state is not None:
            env["P2P_MIRROR_STATE"] = str(self.state)
        return env

    def run(self, mode: str) -> str:
        done = subprocess.run(
            ["/bin/sh", str(self.source / "mirror.sh"), mode],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout + done.stderr

    def files(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.certs)): p.read_text()
            for p in sorted(self.certs.rglob("*"))
            if p.is_file()
        }


# --- what the chart renders -----------------------------------------------------------------


def test_mirror_off_touches_nothing_of_containerd(render: Render) -> None:
    rendered = render(REQUIRED)
    spec = rendered.pod_spec("DaemonSet", "p2p-agent")
    assert [c["name"] for c in spec["initContainers"]] == ["data-dir-owner"]
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    assert "containerd-certs" not in by_name(spec["volumes"])
    assert ("ConfigMap", "p2p-mirror") not in rendered.ids()


def test_mirror_on_adds_the_init_container_the_keeper_and_the_host_path(render: Render) -> None:
    spec = render(MIRROR).pod_spec("DaemonSet", "p2p-agent")
    init = by_name(spec["initContainers"])["mirror-setup"]
    keeper = by_name(spec["containers"])["mirror-config"]
    assert init["command"] == ["/bin/sh", "/etc/p2p/mirror/mirror.sh", "sync"]
    assert keeper["command"] == ["/bin/sh", "/etc/p2p/mirror/mirror.sh", "watch"]
    volumes = by_name(spec["volumes"])
    assert volumes["containerd-certs"]["hostPath"] == {
        "path": "/etc/containerd/certs.d",
        "type": "DirectoryOrCreate",
    }
    for c in (init, keeper):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["P2P_MIRROR_TARGET"] == mounts["containerd-certs"]
        assert env["P2P_MIRROR_SOURCE"] == mounts["mirror"]
    # Only the mirror containers see containerd's configuration; the agent sees their copies of
    # the hosts.toml files (read only), for its status.
    agent_mounts = by_name(by_name(spec["containers"])["agent"]["volumeMounts"])
    assert "containerd-certs" not in agent_mounts
    assert agent_mounts["mirror-state"]["readOnly"] is True
    assert volumes["mirror-state"]["emptyDir"] == {"sizeLimit": "4Mi"}
    for c in (init, keeper):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["P2P_MIRROR_STATE"] == mounts["mirror-state"]
        assert mounts["mirror-state"] == agent_mounts["mirror-state"]["mountPath"]


def test_mirror_config_path_is_configurable(render: Render) -> None:
    spec = render(VALUE_SETS["everything-changed"]).pod_spec("DaemonSet", "p2p-agent")
    assert (
        by_name(spec["volumes"])["containerd-certs"]["hostPath"]["path"]
        == "/etc/containerd/registries.d"
    )
    env = {e["name"]: e["value"] for e in by_name(spec["containers"])["mirror-config"]["env"]}
    assert env["P2P_MIRROR_INTERVAL"] == "5"


def test_one_hosts_toml_per_registry_pointing_containerd_at_the_agent(
    render: Render, tmp_path: Path
) -> None:
    materialise(render(MIRROR), tmp_path)
    found = {str(p.parent.relative_to(tmp_path)): p for p in tmp_path.glob("*/hosts.toml")}
    assert sorted(found) == ["ghcr.example.org", "registry.example.com", "registry.internal:5000"]
    servers = {}
    for name, path in found.items():
        text = path.read_text()
        assert text.splitlines()[0] == MARKER
        hosts = tomllib.loads(text)
        servers[name] = hosts["server"]
        assert hosts["host"] == {"http://127.0.0.1:5004": {"capabilities": ["pull", "resolve"]}}
    assert servers == {
        "registry.example.com": "https://registry.example.com",
        "registry.internal:5000": "http://registry.internal:5000",
        "ghcr.example.org": "https://ghcr.example.org",
    }


def test_hosts_toml_follows_the_agent_port(render: Render, tmp_path: Path) -> None:
    materialise(render(VALUE_SETS["everything-changed"]), tmp_path)
    (path,) = tmp_path.glob("*/hosts.toml")
    assert path.parent.name == "registry.internal:5000"
    hosts = tomllib.loads(path.read_text())
    assert list(hosts["host"]) == ["http://[::1]:15004"]  # agent.loopback ::1


# --- what the scripts do on a node ----------------------------------------------------------


def test_sync_writes_every_file_and_is_idempotent(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR))
    output = node.run("sync")
    assert output.count("wrote") == 3
    assert set(node.files()) == {
        "registry.example.com/hosts.toml",
        "registry.internal:5000/hosts.toml",
        "ghcr.example.org/hosts.toml",
    }
    for name, text in node.files().items():
        assert text == (node.source / name).read_text()
    assert "wrote" not in node.run("sync")


def test_sync_leaves_a_hosts_toml_it_did_not_write(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR))
    own = node.certs / "registry.example.com" / "hosts.toml"
    own.parent.mkdir()
    own.write_text('server = "https://registry.example.com"\n')
    output = node.run("sync")
    assert "not written by p2p" in output
    assert own.read_text() == 'server = "https://registry.example.com"\n'
    node.run("remove")
    assert own.read_text() == 'server = "https://registry.example.com"\n'
    assert not (node.certs / "ghcr.example.org").exists()


def test_sync_removes_registries_no_longer_configured(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR))
    node.run("sync")
    fewer = merged(MIRROR, {"registry": ["ghcr.example.org"]})
    materialise(render(fewer), node.source)
    output = node.run("sync")
    assert output.count("removed") == 2
    assert set(node.files()) == {"ghcr.example.org/hosts.toml"}
    assert sorted(p.name for p in node.certs.iterdir()) == ["ghcr.example.org"]


def test_sync_copies_what_containerd_reads_for_the_agents_status(
    render: Render, tmp_path: Path
) -> None:
    rendered = render(MIRROR)
    node = Node(tmp_path, rendered, state=True)
    assert node.state is not None
    foreign = node.certs / "registry.example.com" / "hosts.toml"
    foreign.parent.mkdir()
    foreign.write_text('server = "https://registry.example.com"\n')
    node.run("sync")
    config = yaml.safe_load(rendered.get("ConfigMap", "agent")["data"]["agent.yaml"])
    agent_mounts = by_name(
        by_name(rendered.pod_spec("DaemonSet", "p2p-agent")["containers"])["agent"]["volumeMounts"]
    )
    assert config["mirrorConfigPath"] == agent_mounts["mirror-state"]["mountPath"]
    # What the agent makes of the copies (p2p_agent.mirror, as its status shows them).
    port = int(config["listen"].rpartition(":")[2])
    states = {
        name: read_hosts_toml(node.state, name, port)
        for name in ("registry.example.com", "registry.internal:5000", "ghcr.example.org")
    }
    assert states["registry.example.com"]["state"] == "other"  # someone else's file
    for name in ("registry.internal:5000", "ghcr.example.org"):
        assert states[name]["state"] == "mirrored"
        assert states[name]["managed_by"] == MARKER.removeprefix("# managed-by:").strip()
    for name in states:
        copy = node.state / name / "hosts.toml"
        assert copy.read_text() == (node.certs / name / "hosts.toml").read_text()
    # The foreign file goes: p2p writes its own, and the copy follows.
    foreign.unlink()
    node.run("sync")
    assert read_hosts_toml(node.state, "registry.example.com", port)["state"] == "mirrored"
    # A registry no longer configured: its copy goes with its file.
    materialise(render(merged(MIRROR, {"registry": ["ghcr.example.org"]})), node.source)
    node.run("sync")
    assert sorted(p.parent.name for p in node.state.glob("*/hosts.toml")) == ["ghcr.example.org"]
    # Nothing at the target (removed by hand): no copy, the agent says missing until resync.
    (node.certs / "ghcr.example.org" / "hosts.toml").unlink()
    (node.source / "ghcr.example.org" / "hosts.toml").unlink()
    node.run("sync")
    assert read_hosts_toml(node.state, "ghcr.example.org", port)["state"] == "missing"


def test_remove_deletes_only_this_releases_files(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR))
    node.run("sync")
    other = node.certs / "docker.io" / "hosts.toml"
    other.parent.mkdir()
    other.write_text('server = "https://registry-1.docker.io"\n')
    output = node.run("remove")
    assert output.count("removed") == 3
    assert node.files() == {"docker.io/hosts.toml": 'server = "https://registry-1.docker.io"\n'}


def test_watch_keeps_the_files_and_removes_them_on_sigterm(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR))
    keeper = subprocess.Popen(
        ["/bin/sh", str(node.source / "mirror.sh"), "watch"],
        env=node.env(interval="0.2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(node.files()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(node.files()) == 3
        # Someone deletes a file: the next resync puts it back.
        victim = node.certs / "ghcr.example.org" / "hosts.toml"
        victim.unlink()
        while not victim.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim.exists()
        keeper.send_signal(signal.SIGTERM)
        output, _ = keeper.communicate(timeout=10)
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()
    assert keeper.returncode == 0, output
    assert node.files() == {}
    assert list(node.certs.iterdir()) == []


# --- the data directory owner -----------------------------------------------------------------


def test_data_dir_owner_script_hands_the_directory_to_the_service_user(
    render: Render, tmp_path: Path
) -> None:
    spec = render(REQUIRED).pod_spec("DaemonSet", "p2p-agent")
    init = by_name(spec["initContainers"])["data-dir-owner"]
    data = tmp_path / "p2p_agent_data"
    (data / "blobs").mkdir(parents=True)
    (data / "blobs" / "sha256-x").write_text("x")
    data.chmod(0o755)
    # As root (the init container's user) hand it to another user, as the chart does; otherwise
    # to ourselves, which exercises the same script.
    uid, gid = (12345, 12345) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    env = {
        "PATH": os.environ["PATH"],
        "P2P_DATA_DIR": str(data),
        "P2P_UID": str(uid),
        "P2P_GID": str(gid),
    }
    subprocess.run(init["command"], env=env, check=True, timeout=30)
    for path in (data, data / "blobs", data / "blobs" / "sha256-x"):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    subprocess.run(init["command"], env=env, check=True, timeout=30)  # again: nothing to do
