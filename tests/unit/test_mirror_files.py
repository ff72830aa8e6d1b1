"""The mirror-config container's helpers (p2p_agent.mirror_files): merging the agent into a
hosts.toml someone else wrote, and reading containerd's config.toml for its config_path; and what
the agent's status makes of their results (p2p_agent.mirror)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from p2p_agent.mirror import (
    MirrorStatus,
    RegistryUse,
    read_containerd_verdict,
    read_hosts_toml,
)
from p2p_agent.mirror_files import (
    AlreadyMirroredError,
    MergeRefusedError,
    check_containerd,
    inspect_containerd,
    main,
    merge_hosts_toml,
)

OURS = """# managed-by: p2p release kube-system/p2p
# containerd asks the p2p agent on this node first for images of registry.example.com and falls
# back to the registry itself when the agent does not answer.
server = "https://registry.example.com"

[host."http://127.0.0.1:5004"]
  capabilities = ["pull", "resolve"]
"""
AGENT = "http://127.0.0.1:5004"
AGENT_TABLE = {"capabilities": ["pull", "resolve"]}

ORIGINAL = """# Written by our node bootstrap.
server = "https://registry.example.com"
ca = "/etc/certs/corp-ca.pem"
client = [
  ["/etc/certs/client.cert", "/etc/certs/client.key"],
  ["/etc/certs/other.pem", ""],
]

[header]
  x-team = "platform"

[host."https://mirror.corp.example"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."https://mirror.corp.example".header]
    x-token = ["a", "b"]

[host."http://10.0.0.9:5000"]
  capabilities = ["pull"]
"""


def without_agent(doc: dict[str, Any]) -> dict[str, Any]:
    rest = dict(doc)
    hosts = {k: v for k, v in rest.pop("host", {}).items() if k != AGENT}
    if hosts:
        rest["host"] = hosts
    return rest


def check_merge(original: str) -> str:
    merged = merge_hosts_toml(OURS, original)
    doc = tomllib.loads(merged)
    assert next(iter(doc["host"])) == AGENT
    assert doc["host"][AGENT] == AGENT_TABLE
    assert without_agent(doc) == tomllib.loads(original)
    assert merged.splitlines()[0] == OURS.splitlines()[0]
    assert merged.splitlines()[1].startswith("# p2p-merged:")
    # The merge is a pure function of its inputs: the same original gives the same file.
    assert merge_hosts_toml(OURS, original) == merged
    # Every line of the original is still there, in its order.
    lines = iter(merged.splitlines())
    assert all(any(line == m for m in lines) for line in original.splitlines())
    return merged


def test_the_agent_comes_first_and_everything_else_is_kept() -> None:
    merged = check_merge(ORIGINAL)
    hosts = list(tomllib.loads(merged)["host"])
    assert hosts == [AGENT, "https://mirror.corp.example", "http://10.0.0.9:5000"]
    # The top-level keys stay top-level: the agent's table follows them (a table before
    # `server = ...` would make `server` one of the agent's keys).
    text = merged.split("[host.")[0]
    assert 'server = "https://registry.example.com"' in text
    assert "client = [" in text


def test_lines_that_start_with_a_bracket_inside_values_are_not_mistaken_for_tables() -> None:
    # The first line starting with "[" is inside the client array: splitting there would break
    # the array; the merge finds the real first table.
    original = 'client = [\n["/c.cert", "/c.key"]\n]\nserver = "https://r.example"\n'
    original += 'description = """\n[not a table]\n"""\n[host."https://m.example"]\n'
    merged = check_merge(original)
    assert merged.index('[host."http://127.0.0.1:5004"]') > merged.index('server = "https')


@pytest.mark.parametrize(
    "original",
    [
        "",
        "# only a comment\n",
        'server = "https://r.example"',  # no final newline
        'server = "https://r.example"\r\n[host."https://m.example"]\r\n  capabilities = []\r\n',
        '[host."https://m.example"]\ncapabilities = ["pull"]\n',  # no top-level keys
        '[host]\n[host."https://m.example"]\n',
        '[[weird]]\nx = 1\n[host."https://m.example"]\n',
    ],
)
def test_odd_but_valid_originals_merge(original: str) -> None:
    check_merge(original)


@pytest.mark.parametrize(
    "original",
    [
        '[host."http://127.0.0.1:5004"]\n',
        'server = "x"\n[host."http://localhost:5004"]\ncapabilities = ["pull"]\n',
        '[host."http://[::1]:5004"]\n',
    ],
)
def test_a_file_that_already_names_the_agent_is_left_as_it_is(original: str) -> None:
    with pytest.raises(AlreadyMirroredError):
        merge_hosts_toml(OURS, original)


@pytest.mark.parametrize(
    ("original", "reason"),
    [
        ("[host.\n", "not valid TOML"),
        ('server = "a"\nserver = "b"\n', "not valid TOML"),
        ("x" * (64 * 1024 + 1), "larger than"),
        # A host defined with dotted keys before any table: the agent cannot come first.
        ('host."https://m.example".capabilities = ["pull"]\nserver = "https://r"\n', "keeps"),
    ],
)
def test_what_cannot_be_merged_safely_is_refused(original: str, reason: str) -> None:
    with pytest.raises(MergeRefusedError, match=reason):
        merge_hosts_toml(OURS, original)


# --- property: any hosts.toml containerd could read merges into an equivalent file -------------

urls = st.builds(
    "{}://{}:{}".format,
    st.sampled_from(["http", "https"]),
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){0,2}", fullmatch=True),
    st.integers(1, 65535),
)
paths = st.from_regex(r"/etc/[a-z]{1,8}/[a-z.]{1,12}", fullmatch=True)
capabilities = st.lists(st.sampled_from(["pull", "resolve", "push"]), unique=True)


def q(value: str) -> str:
    return json.dumps(value)


@st.composite
def hosts_files(draw: st.DrawFn) -> str:
    """hosts.toml text in the shapes people write: top-level keys (some as multi-line arrays
    whose lines start with "["), comments, blank lines, a [header] table, host tables with
    sub-tables, and sometimes CRLF line ends."""
    lines: list[str] = []
    if draw(st.booleans()):
        lines.append("# " + draw(st.text("abc []=", max_size=20)))
    if draw(st.booleans()):
        lines.append(f"server = {q(draw(urls))}")
    if draw(st.booleans()):
        lines.append(f"capabilities = {json.dumps(draw(capabilities))}")
    if draw(st.booleans()):
        lines.append(f"ca = {q(draw(paths))}")
    if draw(st.booleans()):
        pairs = draw(st.lists(st.tuples(paths, paths), min_size=1, max_size=3))
        if draw(st.booleans()):
            lines.append("client = [")
            lines += [f"  [{q(a)}, {q(b)}]," for a, b in pairs]
            lines.append("]")
        else:
            lines.append(f"client = {json.dumps([list(p) for p in pairs])}")
    if draw(st.booleans()):
        lines.append(f"skip_verify = {draw(st.sampled_from(['true', 'false']))}")
    if draw(st.booleans()):
        lines += ["", "[header]", f"  x-a = {q(draw(st.text('abc', max_size=5)))}"]
    for url in draw(st.lists(urls, unique=True, max_size=3)):
        if url.endswith(":5004") and "://127." in url:
            continue
        lines += ["", f"[host.{q(url)}]"]
        if draw(st.booleans()):
            lines.append(f"  capabilities = {json.dumps(draw(capabilities))}")
        if draw(st.booleans()):
            lines.append(f"  ca = [{q(draw(paths))}]")
        if draw(st.booleans()):
            lines += [f"  [host.{q(url)}.header]", '    x-b = ["1", "2"]']
    end = draw(st.sampled_from(["\n", "\r\n"]))
    return end.join(lines) + (end if draw(st.booleans()) else "")


@settings(max_examples=300, deadline=None)
@given(hosts_files())
@example('server = "https://r"\n\n[host."https://m:1"]\n')
def test_any_hosts_toml_merges_into_the_same_file_with_the_agent_first(original: str) -> None:
    tomllib.loads(original)  # the strategy makes valid files only
    check_merge(original)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from('[]"=\n #.abhost:/'), max_size=80))
def test_any_text_merges_correctly_or_not_at_all(original: str) -> None:
    try:
        merged = merge_hosts_toml(OURS, original)
    except MergeRefusedError:
        return
    doc = tomllib.loads(merged)
    assert next(iter(doc["host"])) == AGENT
    assert without_agent(doc) == tomllib.loads(original)


# --- containerd's config.toml -----------------------------------------------------------------

CERTS = "/etc/containerd/certs.d"
V2 = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{}"\n'
V3 = 'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "{}"\n'
V1 = '[plugins.cri.registry]\n  config_path = "{}"\n'


@pytest.mark.parametrize(
    "text",
    [
        V2.format(CERTS),
        V2.format(CERTS + "/"),
        V3.format(CERTS),
        V1.format(CERTS),
        V2.format("/etc/docker/certs.d:" + CERTS),
    ],
)
def test_config_path_that_includes_the_directory_p2p_writes(text: str) -> None:
    verdict = inspect_containerd([("/etc/containerd/config.toml", text)], CERTS)
    assert verdict.state == "matches", verdict.message
    assert "mirror mode is active" in verdict.message


def test_config_path_elsewhere_names_the_chart_value_to_set() -> None:
    verdict = inspect_containerd(
        [("/etc/containerd/config.toml", V3.format("/etc/containerd/registries.d"))], CERTS
    )
    assert verdict.state == "other"
    assert verdict.config_path == ["/etc/containerd/registries.d"]
    assert "--set mirror.configPath=/etc/containerd/registries.d" in verdict.message


def test_no_config_path_says_where_to_add_it_for_the_config_version() -> None:
    # containerd 2.x (version 3) reads the images plugin; the old CRI table does not count.
    text = V2.format(CERTS).replace("version = 2", "version = 3")
    verdict = inspect_containerd([("/etc/containerd/config.toml", text)], CERTS)
    assert verdict.state == "unset"
    assert verdict.key == 'plugins."io.containerd.cri.v1.images".registry'
    assert (
        'add config_path = "/etc/containerd/certs.d" to the '
        '[plugins."io.containerd.cri.v1.images".registry] table of /etc/containerd/config.toml '
        "and restart containerd" in verdict.message
    )
    legacy = (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://mirror.example"]\n'
    )
    verdict = inspect_containerd([("/etc/containerd/config.toml", legacy)], CERTS)
    assert verdict.state == "unset"
    assert "mirrors" in verdict.message
    k3s = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
    verdict = inspect_containerd([(k3s, "version = 2\n")], "/var/lib/rancher/x")
    assert "config.toml.tmpl" in verdict.message
    assert "k3s" in verdict.message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_imports_are_followed_and_replace_whole_plugin_tables(tmp_path: Path) -> None:
    mount = tmp_path / "host-containerd"  # /etc/containerd as mounted in the container
    config = write(
        mount / "config.toml",
        'imports = ["conf.d/*.toml", "/etc/containerd/extra.toml", "/opt/outside.toml"]\n'
        + V2.format("/etc/elsewhere"),
    )
    write(mount / "conf.d" / "10-registry.toml", V2.format(CERTS))
    verdict = check_containerd(config, "/etc/containerd/config.toml", CERTS)
    assert verdict.state == "matches", verdict.message
    assert verdict.unread_imports == ["/etc/containerd/extra.toml", "/opt/outside.toml"]
    # A later import that defines the CRI plugin without config_path replaces that table.
    write(mount / "conf.d" / "20-cri.toml", 'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n')
    verdict = check_containerd(config, "/etc/containerd/config.toml", CERTS)
    assert verdict.state == "unset"
    assert "imports not visible to this check" in verdict.message


def test_a_missing_or_broken_config_is_unknown(tmp_path: Path) -> None:
    verdict = check_containerd(tmp_path / "config.toml", "/etc/containerd/config.toml", CERTS)
    assert verdict.state == "unknown"
    assert "does not exist" in verdict.message
    assert "mirror.containerdConfig" in verdict.message
    config = write(tmp_path / "config.toml", "version = [\n")
    verdict = check_containerd(config, "/etc/containerd/config.toml", CERTS)
    assert (verdict.state, "not valid TOML" in verdict.message) == ("unknown", True)
    write(config, "version = 7\n")
    assert check_containerd(config, "/etc/containerd/config.toml", CERTS).state == "unknown"


# --- the command line and what the agent shows -----------------------------------------------


def test_the_merge_command_and_its_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = write(tmp_path / "ours.toml", OURS)
    original = write(tmp_path / "hosts.toml", ORIGINAL)
    assert main(["merge", str(ours), str(original)]) == 0
    assert capsys.readouterr().out == merge_hosts_toml(OURS, ORIGINAL)
    write(original, '[host."http://127.0.0.1:5004"]\n')
    assert main(["merge", str(ours), str(original)]) == 3
    write(original, "[host.\n")
    assert main(["merge", str(ours), str(original)]) == 4
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["merge", str(ours), str(tmp_path / "absent.toml")]) == 4


def test_the_verdict_reaches_the_agents_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "etc" / "config.toml", V2.format("/etc/other"))
    state = tmp_path / "state"
    argv = ["containerd", "--config", str(config), "--host-config", "/etc/containerd/config.toml"]
    assert main([*argv, "--config-path", CERTS, "--out", str(state / "containerd.json")]) == 0
    line = capsys.readouterr().out.strip()
    assert "mirror.configPath=/etc/other" in line
    found = read_containerd_verdict(state)
    assert found["state"] == "other"
    assert found["message"] == line
    assert found["config_path"] == ["/etc/other"]
    assert found["config_file"] == "/etc/containerd/config.toml"
    assert found["checked_at"] is not None
    assert read_containerd_verdict(tmp_path / "nothing")["state"] == "unknown"
    write(state / "containerd.json", '{"state": "bogus"}')
    assert read_containerd_verdict(state)["state"] == "unknown"


def test_a_merged_file_and_the_catch_all_in_the_agents_status(tmp_path: Path) -> None:
    write(tmp_path / "registry.example.com" / "hosts.toml", merge_hosts_toml(OURS, ORIGINAL))
    found = read_hosts_toml(tmp_path, "registry.example.com", 5004)
    assert (found["state"], found["merged"]) == ("mirrored", True)
    assert found["hosts"] == [AGENT, "https://mirror.corp.example", "http://10.0.0.9:5000"]
    assert "then the 2 other host(s) of the file p2p merged it into" in found["detail"]
    use = RegistryUse(wall=lambda: 1_800_000_000.0)
    mirror = MirrorStatus(
        ["registry.example.com"], config_path=tmp_path, port=lambda: 5004, use=use
    )
    doc = mirror.snapshot()
    assert doc["catch_all"]["state"] == "missing"
    assert doc["containerd"]["state"] == "unknown"
    write(tmp_path / "_default" / "hosts.toml", '[host."http://127.0.0.1:5004"]\n')
    use.refuse()
    doc = MirrorStatus(
        ["registry.example.com"], config_path=tmp_path, port=lambda: 5004, use=use
    ).snapshot()
    assert doc["catch_all"]["state"] == "mirrored"
    assert doc["catch_all"]["refused_requests"] == 1
    unset = MirrorStatus([], config_path=None, port=lambda: 5004, use=use).snapshot()
    assert (unset["containerd"], unset["catch_all"]) == (None, None)
