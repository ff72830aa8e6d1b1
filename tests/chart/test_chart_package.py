"""``helm package``: the chart archive, built by Helm's own packaging code (helm-python-sdk
bundles the Helm engine; there is no helm binary on these machines), holds the chart under its
name, leaves out what .helmignore names, and installs the same objects as the chart directory."""

from __future__ import annotations

import fnmatch
import shutil
import tarfile
from pathlib import Path

import helm_python
import pytest
import yaml

from tests.chart.conftest import CHART, KUBE_VERSION, REQUIRED, VALUE_SETS

METADATA = yaml.safe_load((CHART / "Chart.yaml").read_text())
NAME = METADATA["name"]
VERSION = METADATA["version"]


def helmignore_patterns(chart: Path) -> list[str]:
    path = chart / ".helmignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """The subset of .helmignore rules this chart uses: names, globs, directories (``dir/``)."""
    parts = relative.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if pattern.rstrip("/") in parts[:-1]:
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def chart_files(chart: Path) -> set[str]:
    """The files ``helm package`` should put into the archive, relative to the chart."""
    patterns = helmignore_patterns(chart)
    files = {str(p.relative_to(chart)) for p in chart.rglob("*") if p.is_file()}
    return {f for f in files if not ignored(f, patterns)}


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        out = {}
        for member in tar.getmembers():
            assert member.isfile(), f"{member.name}: only regular files belong in a chart archive"
            extracted = tar.extractfile(member)
            assert extracted is not None
            out[member.name] = extracted.read()
        return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("package")
    return Path(helm_python.package(CHART, destination=out))


def test_package_writes_name_version_tgz(archive: Path) -> None:
    assert archive.name == f"{NAME}-{VERSION}.tgz"
    assert helm_python.digest(archive).startswith("sha256:")


def test_archive_holds_the_chart_files_under_the_chart_name(archive: Path) -> None:
    files = members(archive)
    assert all(name.startswith(f"{NAME}/") for name in files)
    inside = {name.removeprefix(f"{NAME}/") for name in files}
    assert inside == chart_files(CHART)
    assert {"Chart.yaml", "values.yaml", "values.schema.json", "README.md"} <= inside
    assert "templates/_helpers.tpl" in inside
    for name in inside - {"Chart.yaml"}:
        assert files[f"{NAME}/{name}"] == (CHART / name).read_bytes(), name
    # Helm writes Chart.yaml anew (without its comments): same metadata.
    packaged = yaml.safe_load(files[f"{NAME}/Chart.yaml"])
    assert {k: packaged[k] for k in METADATA} == METADATA


def test_helmignore_keeps_editor_and_vcs_files_out(tmp_path: Path) -> None:
    chart = tmp_path / "src" / NAME
    shutil.copytree(CHART, chart)
    junk = [
        ".git/HEAD",
        "__pycache__/gen.cpython-311.pyc",
        "values.yaml.bak",
        "templates/agent-daemonset.yaml.orig",
        "templates/.agent-daemonset.yaml.swp",
        "README.md~",
    ]
    for name in junk:
        (chart / name).parent.mkdir(parents=True, exist_ok=True)
        (chart / name).write_text("junk\n")
    archive = Path(helm_python.package(chart, destination=tmp_path))
    inside = {name.removeprefix(f"{NAME}/") for name in members(archive)}
    assert inside == chart_files(CHART)
    assert not inside & set(junk)


def test_the_archive_renders_what_the_directory_renders(archive: Path) -> None:
    with helm_python.Chart.load(archive) as packaged, helm_python.Chart.load(CHART) as source:
        assert packaged.metadata["version"] == VERSION
        for values in (REQUIRED, VALUE_SETS["everything-changed"], VALUE_SETS["mirror"]):
            rendered = packaged.render(values, name="p2p", namespace="kube-system", is_install=True)
            expected = source.render(values, name="p2p", namespace="kube-system", is_install=True)
            assert rendered == expected
        # The schema travels with the archive.
        with pytest.raises(helm_python.HelmValuesError, match="/proxy/replicas"):
            packaged.render(
                {**REQUIRED, "proxy": {"replicas": 0}},
                name="p2p",
                namespace="kube-system",
                is_install=True,
            )


def test_the_archive_lints_clean(archive: Path) -> None:
    report = helm_python.lint(archive, REQUIRED, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_archive_expands_to_the_chart(archive: Path, tmp_path: Path) -> None:
    # What `helm pull --untar` / `helm install ./p2p-x.y.z.tgz` unpack.
    helm_python.expand(tmp_path, archive)
    assert chart_files(tmp_path / NAME) == chart_files(CHART)
