"""chart/README.md lists every value, generated from values.yaml's ``# --`` comments by
``python -m tools.chart_readme``; the committed file must be what the script writes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from tools import chart_readme

from tests.chart.conftest import CHART

README = CHART / "README.md"
VALUES = CHART / "values.yaml"


def committed() -> tuple[str, str, dict[str, Any] | None]:
    return chart_readme.read_chart(CHART)


def table_rows(readme: str) -> dict[str, tuple[str, str]]:
    """Key -> (type, default) of every row of the generated tables."""
    rows = {}
    for line in readme.split(chart_readme.MARKER, 1)[1].splitlines():
        match = re.match(r"^\| `([^`]+)` \| ([^|]+) \| `(.*?)` \| ", line)
        if match:
            rows[match[1]] = (match[2].strip(), match[3].replace("\\|", "|"))
    return rows


def leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf of a values tree: scalars, lists and empty mappings."""
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in leaves(value, (*path, key))]
    return [path]


def test_the_committed_readme_is_current() -> None:
    readme, values_text, schema = committed()
    assert chart_readme.render_readme(readme, values_text, schema) == readme, (
        "chart/README.md is out of date: run python -m tools.chart_readme"
    )
    assert chart_readme.main(["--check"]) == 0


def test_every_value_has_a_description() -> None:
    _, values_text, schema = committed()
    assert chart_readme.reference(values_text, schema).undocumented == []


def test_every_leaf_value_is_in_the_table_with_its_default() -> None:
    readme, values_text, _ = committed()
    values = yaml.safe_load(values_text)
    rows = table_rows(readme)
    for leaf in leaves(values):
        # A leaf is listed itself, or inside a mapping documented as a whole (resources).
        covering = [".".join(leaf[:n]) for n in range(len(leaf), 0, -1)]
        listed = [key for key in covering if key in rows]
        assert listed, f"{'.'.join(leaf)} is not in chart/README.md"
    for key, (_, default) in rows.items():
        node: Any = values
        for part in key.split("."):
            node = node[part]
        assert json.loads(default) == node, key


def test_the_hand_written_introduction_stays_above_the_table() -> None:
    readme, _, _ = committed()
    intro, generated = readme.split(chart_readme.MARKER, 1)
    assert intro.startswith("# p2p Helm chart\n")
    assert "helm install p2p ./chart -n kube-system --set registry=" in intro
    assert generated.lstrip().startswith("## Values\n")
    # A stale table is replaced, the introduction kept as it is.
    _, values_text, schema = committed()
    stale = intro + chart_readme.MARKER + "\n\n## Values\n\n| old | table |\n"
    assert chart_readme.render_readme(stale, values_text, schema) == readme
    # A README without a table yet gets one below its text.
    fresh = chart_readme.render_readme(intro.rstrip() + "\n", values_text, schema)
    assert fresh == readme


def test_types_come_from_the_schema() -> None:
    rows = table_rows(committed()[0])
    assert rows["registry"][0] == "string or list"
    assert rows["downloadRate"][0] == "int or string"
    assert rows["proxy.replicas"][0] == "int"
    assert rows["agent.extraEnv"][0] == "list"
    assert rows["agent.nodeSelector"] == ("object", '{"kubernetes.io/os":"linux"}')
    assert rows["logFormat"] == ("string", '"json"')


def test_markdown_is_escaped_outside_code() -> None:
    readme = committed()[0]
    # <service> would vanish as an HTML tag; a bare * would start emphasis.
    assert "&lt;service&gt;.&lt;namespace&gt;" in readme
    assert "prometheus.io/\\* annotations" in readme
    assert "`P2P_AGENT_*`" in readme


VALUES_WITH_GAPS = """\
# Header of the values.
#
# Second paragraph.

# -- Documented.
documented: 1
undocumented: 2
# A section.
group:
  # -- Documented as a whole, children and all.
  whole:
    a: 1
    b: [1, 2]
  # -- Documented.
  inner: x
  partly:
    # -- Documented.
    one: 1
    two: 2
  # -- A list whose items look like keys.
  list:
    - name: a
      value: b
  empty: {}
"""


def test_values_without_a_description_are_reported() -> None:
    ref = chart_readme.reference(VALUES_WITH_GAPS)
    assert ref.undocumented == ["undocumented", "group.partly.two", "group.empty"]
    assert ref.header == ["Header of the values.", "Second paragraph."]
    rows = {row.key: row for section in ref.sections for row in section.rows}
    assert set(rows) == {
        "documented",
        "group.whole",
        "group.inner",
        "group.partly.one",
        "group.list",
    }
    assert rows["group.whole"].default == '{"a":1,"b":[1,2]}'
    assert rows["group.list"].type == "list"
    group = [s for s in ref.sections if s.title == "group"]
    assert group[0].intro == ["A section."]


def test_check_fails_on_a_stale_readme_and_a_missing_description(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chart = tmp_path / "p2p"
    shutil.copytree(CHART, chart)
    values = (chart / "values.yaml").read_text()

    changed = values.replace("# -- Log level of every service:", "# -- How chatty: ")
    (chart / "values.yaml").write_text(changed)
    assert chart_readme.main(["--check", "--chart", str(chart)]) == 1
    assert "README.md is not current" in capsys.readouterr().err
    assert chart_readme.main(["--chart", str(chart)]) == 0
    assert '| `logLevel` | string | `"info"` | How chatty:' in (chart / "README.md").read_text()
    assert chart_readme.main(["--check", "--chart", str(chart)]) == 0

    gap = changed.replace(
        "  # -- Extra labels on the proxy pods", "  # Extra labels on the proxy pods"
    )
    (chart / "values.yaml").write_text(gap)
    before = (chart / "README.md").read_text()
    assert chart_readme.main(["--chart", str(chart)]) == 1
    assert "proxy.podLabels has no `# --` description" in capsys.readouterr().err
    assert (chart / "README.md").read_text() == before
