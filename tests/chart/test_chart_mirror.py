"""Mirror mode: hosts.toml files for containerd, written while an agent runs on the node.

The rendered shell scripts are run here with /bin/sh (dash, as in the python:slim images) against
temporary directories laid out the way kubelet mounts the ConfigMap volume.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import yaml

from p2p_agent.mirror import read_containerd_verdict, read_hosts_toml
from tests.chart.conftest import REQUIRED, VALUE_SETS, Render, merged
from tests.chart.mirror_node import Node, by_name, materialise

MIRROR = {
    "registry": ["registry.example.com", "http://registry.internal:5000", "ghcr.example.org"],
    "mirror": {"enabled": True},
}
MARKER = "# managed-by: p2p release kube-system/p2p"


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


def test_without_merging_sync_leaves_a_hosts_toml_it_did_not_write(
    render: Render, tmp_path: Path
) -> None:
    node = Node(tmp_path, render(merged(MIRROR, {"mirror": {"mergeExisting": False}})))
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
    node = Node(tmp_path, rendered, state=True, merge=False)
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


# --- someone else's hosts.toml: merged, kept and put back ------------------------------------

FOREIGN = """# Our bootstrap's mirror for registry.example.com.
server = "https://registry.example.com"
ca = "/etc/certs/corp.pem"

[host."https://mirror.corp.example"]
  capabilities = ["pull", "resolve"]
"""
AGENT_HOST = "http://127.0.0.1:5004"


def foreign_file(node: Node, name: str = "registry.example.com", text: str = FOREIGN) -> Path:
    path = node.certs / name / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o640)
    return path


def test_mirror_values_reach_the_mirror_containers(render: Render) -> None:
    rendered = render(MIRROR)
    spec = rendered.pod_spec("DaemonSet", "p2p-agent")
    volumes = by_name(spec["volumes"])
    assert volumes["containerd-config"]["hostPath"] == {
        "path": "/etc/containerd",
        "type": "DirectoryOrCreate",
    }
    for c in (
        by_name(spec["initContainers"])["mirror-setup"],
        by_name(spec["containers"])["mirror-config"],
    ):
        env = {e["name"]: e["value"] for e in c["env"]}
        mounts = by_name(c["volumeMounts"])
        assert env["P2P_MIRROR_MERGE"] == "1"  # mergeExisting defaults to true
        assert env["P2P_MIRROR_HOST_PATH"] == "/etc/containerd/certs.d"
        assert env["P2P_CONTAINERD_CONFIG_HOST"] == "/etc/containerd/config.toml"
        assert env["P2P_CONTAINERD_CONFIG"] == "/host/containerd-config/config.toml"
        assert mounts["containerd-config"] == {
            "name": "containerd-config",
            "mountPath": "/host/containerd-config",
            "readOnly": True,
        }
    # The agent sees neither containerd directory.
    agent_mounts = by_name(by_name(spec["containers"])["agent"]["volumeMounts"])
    assert "containerd-config" not in agent_mounts
    k3s = render(
        merged(
            MIRROR,
            {
                "mirror": {
                    "configPath": "/var/lib/rancher/k3s/agent/etc/containerd/certs.d",
                    "mergeExisting": False,
                }
            },
        )
    ).pod_spec("DaemonSet", "p2p-agent")
    env = {e["name"]: e["value"] for e in by_name(k3s["containers"])["mirror-config"]["env"]}
    assert env["P2P_MIRROR_MERGE"] == "0"
    assert env["P2P_CONTAINERD_CONFIG_HOST"] == (
        "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
    )
    explicit = render(
        merged(MIRROR, {"mirror": {"containerdConfig": "/etc/containerd-custom/main.toml"}})
    ).pod_spec("DaemonSet", "p2p-agent")
    assert by_name(explicit["volumes"])["containerd-config"]["hostPath"]["path"] == (
        "/etc/containerd-custom"
    )
    env = {e["name"]: e["value"] for e in by_name(explicit["containers"])["mirror-config"]["env"]}
    assert env["P2P_CONTAINERD_CONFIG"] == "/host/containerd-config/main.toml"


def test_sync_merges_the_agent_first_keeps_the_original_and_remove_puts_it_back(
    render: Render, tmp_path: Path
) -> None:
    node = Node(tmp_path, render(MIRROR), state=True)
    assert node.state is not None
    target = foreign_file(node)
    before = target.stat()
    output = node.run("sync")
    assert f"merged the p2p agent into {target}" in output
    backup = target.with_name("hosts.toml.p2p-orig")
    assert backup.read_text() == FOREIGN
    assert stat.S_IMODE(backup.stat().st_mode) == 0o640  # kept with its mode and times
    assert backup.stat().st_mtime == before.st_mtime
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the merged file too
    text = target.read_text()
    assert text.splitlines()[0] == MARKER
    doc = tomllib.loads(text)
    assert list(doc["host"]) == [AGENT_HOST, "https://mirror.corp.example"]
    assert doc["server"] == "https://registry.example.com"
    assert doc["ca"] == "/etc/certs/corp.pem"
    # Idempotent: nothing changes at the next sync.
    assert "merged" not in node.run("sync")
    assert target.read_text() == text
    # The agent's status sees the merged file through the state copy.
    found = read_hosts_toml(node.state, "registry.example.com", 5004)
    assert (found["state"], found["merged"]) == ("mirrored", True)
    assert found["hosts"] == [AGENT_HOST, "https://mirror.corp.example"]
    # Removal puts the original back exactly and leaves no backup.
    output = node.run("remove")
    assert f"restored {target}" in output
    assert target.read_text() == FOREIGN
    assert not backup.exists()
    assert set(node.files()) == {"registry.example.com/hosts.toml"}


def test_an_owner_who_replaces_the_merged_file_or_edits_the_original_is_respected(
    render: Render, tmp_path: Path
) -> None:
    node = Node(tmp_path, render(MIRROR))
    target = foreign_file(node)
    node.run("sync")
    backup = target.with_name("hosts.toml.p2p-orig")
    # The owner's configuration management writes its (new) file over ours.
    replaced = FOREIGN.replace("mirror.corp.example", "mirror2.corp.example")
    target.write_text(replaced)
    assert "merged" in node.run("sync")
    assert backup.read_text() == replaced
    assert list(tomllib.loads(target.read_text())["host"]) == [
        AGENT_HOST,
        "https://mirror2.corp.example",
    ]
    # Someone edits the kept original: merged again from it.
    edited = replaced + '\n[host."https://mirror3.corp.example"]\n  capabilities = ["pull"]\n'
    backup.write_text(edited)
    assert "merged" in node.run("sync")
    assert list(tomllib.loads(target.read_text())["host"]) == [
        AGENT_HOST,
        "https://mirror2.corp.example",
        "https://mirror3.corp.example",
    ]
    node.run("remove")
    assert target.read_text() == edited
    # The owner deletes the merged file: the registry gets p2p's own file, the stale backup goes.
    node.run("sync")
    target.unlink()
    output = node.run("sync")
    assert "was deleted" in output
    assert not backup.exists()
    assert target.read_text() == (node.source / "registry.example.com" / "hosts.toml").read_text()


def test_turning_merging_off_puts_the_original_back(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR))
    target = foreign_file(node)
    node.run("sync")
    node.merge = False
    output = node.run("sync")
    assert f"restored {target}" in output
    assert "mirror.mergeExisting is off" in output
    assert target.read_text() == FOREIGN
    assert not target.with_name("hosts.toml.p2p-orig").exists()
    node.run("sync")
    assert target.read_text() == FOREIGN


def test_files_that_cannot_be_merged_or_need_no_merge_are_left_alone(
    render: Render, tmp_path: Path
) -> None:
    node = Node(tmp_path, render(MIRROR))
    broken = foreign_file(node, "registry.example.com", "server = [\n")
    mirrored = foreign_file(
        node, "ghcr.example.org", '[host."http://localhost:5004"]\n  capabilities = ["pull"]\n'
    )
    output = node.run("sync")
    assert "cannot merge the p2p agent into" in output
    assert "not valid TOML" in output
    assert "already names the p2p agent" in output
    assert broken.read_text() == "server = [\n"
    assert not broken.with_name("hosts.toml.p2p-orig").exists()
    assert mirrored.read_text() == '[host."http://localhost:5004"]\n  capabilities = ["pull"]\n'
    node.run("remove")
    assert broken.exists()
    assert mirrored.exists()


def test_without_python_tools_foreign_files_are_left_alone(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR))
    target = foreign_file(node)
    env = node.env() | {"P2P_MIRROR_PYTHON": "/nonexistent/python3"}
    done = subprocess.run(
        ["/bin/sh", str(node.source / "mirror.sh"), "sync"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "this image cannot merge it" in done.stdout
    assert target.read_text() == FOREIGN
    assert len(node.files()) == 3


# --- the catch-all ------------------------------------------------------------------------------


def test_the_catch_all_writes_default_hosts_toml_without_a_server(
    render: Render, tmp_path: Path
) -> None:
    assert "_default" not in {p.parent.name for p in tmp_path.glob("*/hosts.toml")}
    node = Node(tmp_path, render(merged(MIRROR, {"mirror": {"allRegistries": True}})))
    node.run("sync")
    default = tomllib.loads(node.files()["_default/hosts.toml"])
    assert default == {"host": {AGENT_HOST: {"capabilities": ["pull", "resolve"]}}}
    assert node.files()["_default/hosts.toml"].splitlines()[0] == MARKER
    # Turned off again: the file goes.
    materialise(render(MIRROR), node.source)
    assert "removed" in node.run("sync")
    assert "_default/hosts.toml" not in node.files()


# --- containerd's own config --------------------------------------------------------------------


def test_the_keeper_says_whether_containerd_reads_the_hosts_toml_files(
    render: Render, tmp_path: Path
) -> None:
    node = Node(tmp_path, render(MIRROR), state=True)
    assert node.state is not None
    output = node.run("sync")
    assert "cannot check containerd's config: /etc/containerd/config.toml does not exist" in output
    node.containerd_config.write_text("version = 2\n")
    output = node.run("sync")
    assert "containerd ignores hosts.toml files" in output
    assert (
        'Fix: add config_path = "/etc/containerd/certs.d" to the '
        '[plugins."io.containerd.grpc.v1.cri".registry] table of /etc/containerd/config.toml '
        "and restart containerd" in output
    )
    assert read_containerd_verdict(node.state)["state"] == "unset"
    node.containerd_config.write_text(
        'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n'
    )
    output = node.run("sync")
    assert "mirror mode is active" in output
    verdict = read_containerd_verdict(node.state)
    assert (verdict["state"], verdict["config_path"]) == ("matches", ["/etc/containerd/certs.d"])


def test_watch_logs_a_lasting_condition_once(render: Render, tmp_path: Path) -> None:
    node = Node(tmp_path, render(MIRROR), merge=False)
    foreign_file(node)
    node.containerd_config.write_text("version = 2\n")
    keeper = subprocess.Popen(
        ["/bin/sh", str(node.source / "mirror.sh"), "watch"],
        env=node.env(interval="0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Wait for several resyncs: each rewrites a file deleted before it.
        deadline = time.monotonic() + 20
        victim = node.certs / "ghcr.example.org" / "hosts.toml"
        for _ in range(3):
            while not victim.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert victim.exists()
            victim.unlink()
        while not victim.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        keeper.send_signal(signal.SIGTERM)
        output, _ = keeper.communicate(timeout=20)
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()
    assert output.count("wrote " + str(victim)) >= 4
    assert output.count("mirror.mergeExisting is off") == 1
    assert output.count("containerd ignores hosts.toml files") == 1


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
