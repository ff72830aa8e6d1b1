"""The container images, as far as they can be checked without a container engine.

The wheels the Dockerfiles build are built here the same way (pip, from the package
directories), installed alone into a directory, and their console scripts run. Each Dockerfile is
parsed and checked against the chart: which packages it installs, its user, its entrypoint and
the config path the chart mounts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chart.conftest import REPO, REQUIRED, Render

SERVICES = ["agent", "proxy", "tracker"]
PACKAGES = ["common", *SERVICES]
EXPOSED = {"agent": {5004, 6881, 5014}, "proxy": {5005, 6882}, "tracker": {6969}}
WORKLOAD = {
    "agent": ("DaemonSet", "p2p-agent"),
    "proxy": ("Deployment", "p2p-proxy"),
    "tracker": ("Deployment", "p2p-tracker"),
}


# --- wheels ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One wheel per package, built by pip from the package directory."""
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(out),
            *(str(REPO / p) for p in PACKAGES),
        ],
        check=True,
        timeout=600,
    )
    built = {}
    for package in PACKAGES:
        (wheel,) = out.glob(f"p2p_{package}-*.whl")
        built[package] = wheel
    return built


def dist_info(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [m for m in archive.namelist() if re.fullmatch(rf"[^/]+\.dist-info/{name}", m)]
        return archive.read(member).decode()


@pytest.mark.parametrize("service", SERVICES)
def test_service_wheel_declares_its_console_script(wheels: dict[str, Path], service: str) -> None:
    entry_points = dist_info(wheels[service], "entry_points.txt")
    section = entry_points.split("[console_scripts]", 1)[1]
    scripts = dict(
        (part.strip() for part in line.split("=", 1))
        for line in section.strip().splitlines()
        if "=" in line
    )
    assert scripts == {f"p2p-{service}": f"p2p_{service}.__main__:main"}
    requires = [
        line
        for line in dist_info(wheels[service], "METADATA").splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert "Requires-Dist: p2p-common==0.1.0" in requires
    # A service never depends on another service.
    assert not [r for r in requires if re.search(r"p2p-(agent|proxy|tracker)", r)]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_wheel_holds_only_its_own_package(wheels: dict[str, Path], package: str) -> None:
    with zipfile.ZipFile(wheels[package]) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {f"p2p_{package}"}


@pytest.fixture(scope="session")
def installed(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each service installed with common only, from the wheels, into its own directory."""
    targets = {}
    for service in SERVICES:
        target = tmp_path_factory.mktemp(f"site-{service}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-index",
                "--target",
                str(target),
                str(wheels["common"]),
                str(wheels[service]),
            ],
            check=True,
            timeout=300,
        )
        targets[service] = target
    return targets


@pytest.mark.parametrize("service", SERVICES)
def test_installed_console_script_runs(installed: dict[str, Path], service: str) -> None:
    target = installed[service]
    script = target / "bin" / f"p2p-{service}"
    assert script.is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [str(script), "--help"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert "--config" in done.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_installed_service_accepts_the_charts_config(
    installed: dict[str, Path], render: Render, service: str, tmp_path: Path
) -> None:
    # Load the rendered ConfigMap file with the settings class from the installed wheel (not the
    # source tree), as the container will.
    config = tmp_path / f"{service}.yaml"
    config.write_text(render(REQUIRED).config_file(service))
    target = installed[service]
    settings_class = {
        "agent": "AgentSettings",
        "proxy": "ProxySettings",
        "tracker": "TrackerSettings",
    }[service]
    code = (
        f"import json, p2p_common, p2p_{service}.settings as s\n"
        f"assert s.__file__.startswith({str(target)!r}), s.__file__\n"
        f"assert p2p_common.__file__.startswith({str(target)!r}), p2p_common.__file__\n"
        f"print(json.dumps(s.{settings_class}.load({str(config)!r}, environ={{}}).dump()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout)["logLevel"] == "info"


# --- Dockerfiles ----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Instructions by stage: comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = words[0]
            for arg, value in global_args.items():
                base = base.replace(f"${{{arg}}}", value)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            arg, _, value = rest.partition("=")
            global_args[arg] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return global_args, stages


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not the exec (JSON) form: {value}"
    return [str(item) for item in parsed]


def pip_requirements(command: str, verb: str) -> list[str]:
    """The package arguments of the `pip <verb>` in a RUN command."""
    words = shlex.split(command)
    (index,) = [i for i, w in enumerate(words) if w == verb and words[i - 1] == "pip"]
    out = []
    skip = False
    for word in words[index + 1 :]:
        if word == "&&":
            break
        if skip:
            skip = False
            continue
        if word in ("--wheel-dir", "-w", "--find-links", "-f", "--target", "-t"):
            skip = True
            continue
        if word.startswith("-"):
            continue
        out.append(word)
    return out


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_builds_wheels_then_installs_only_common_and_the_service(service: str) -> None:
    global_args, stages = parse_dockerfile(REPO / service / "Dockerfile")
    assert global_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert len(stages) == 2
    build, runtime = stages
    assert build.name == "build"
    assert build.base == runtime.base == global_args["PYTHON_IMAGE"]

    copies = [c.split() for c in build.args("COPY")]
    assert copies == [["common/", "common/"], [f"{service}/", f"{service}/"]]
    (wheel_run,) = [r for r in build.args("RUN") if "pip wheel" in r]
    assert pip_requirements(wheel_run, "wheel") == ["./common", f"./{service}"]

    # The runtime stage gets no source, only the wheels through a build mount.
    assert runtime.args("COPY") == []
    (install_run,) = [r for r in runtime.args("RUN") if "pip install" in r]
    assert install_run.startswith("--mount=type=bind,from=build,source=/wheels,target=/wheels ")
    assert "--no-index" in install_run
    assert sorted(pip_requirements(install_run, "install")) == sorted(
        ["p2p-common", f"p2p-{service}"]
    )


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_runs_the_console_script_as_the_charts_user(
    service: str, render: Render
) -> None:
    _, stages = parse_dockerfile(REPO / service / "Dockerfile")
    runtime = stages[-1]
    (user,) = runtime.args("USER")
    assert user == "10001:10001"
    (entrypoint,) = runtime.args("ENTRYPOINT")
    (cmd,) = runtime.args("CMD")
    assert exec_form(entrypoint) == [f"p2p-{service}"]
    assert exec_form(cmd) == ["--config", f"/etc/p2p/{service}.yaml"]
    (expose,) = runtime.args("EXPOSE")
    assert {int(p) for p in expose.split()} == EXPOSED[service]

    # The chart runs the same command, as the same user, with the config where it mounts it.
    spec = render(REQUIRED).pod_spec(*WORKLOAD[service])
    (main,) = [c for c in spec["containers"] if c["name"] == service]
    assert main["command"] + main["args"] == exec_form(entrypoint) + exec_form(cmd)
    assert f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}" == user
    (mount,) = [m for m in main["volumeMounts"] if m["name"] == "config"]
    assert Path(mount["mountPath"]) / f"{service}.yaml" == Path(exec_form(cmd)[1])
    assert main["image"] == f"p2p/{service}:0.1.0"


@pytest.mark.parametrize("service", SERVICES)
def test_documented_build_command_matches_the_charts_image(service: str) -> None:
    command = f"docker build -f {service}/Dockerfile -t p2p/{service}:0.1.0 ."
    assert command in (REPO / service / "Dockerfile").read_text()
    assert command in (REPO / "docs" / "install.md").read_text()


def test_dockerignore_lets_the_packages_in_and_little_else() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == set(PACKAGES)
    assert "**/__pycache__" in lines
