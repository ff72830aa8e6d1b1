"""chart/README.md's reference of every value, generated from chart/values.yaml's comments.

    python -m tools.chart_readme           # rewrite chart/README.md
    python -m tools.chart_readme --check   # exit 1 when chart/README.md is not current or a
                                           # value has no description

values.yaml follows the helm-docs convention: the comment block right above a key, from its
line that starts with ``# --`` on, describes that key. A mapping whose description is the only
one in its subtree (``resources``, ``nodeSelector``) is documented as one value, its whole default
shown; below any other mapping every key needs its own description. Plain comments (without
``--``) above a top-level mapping introduce its section of the table; the file's first comment
block, when a blank line ends it, introduces the whole reference.

chart/README.md keeps everything above the marker line (its hand-written introduction) and gets
the generated reference below it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "chart"
MARKER = (
    "<!-- Generated below this line from values.yaml by `python -m tools.chart_readme`:"
    " edit the comments in values.yaml, not this file. -->"
)

ValuePath = tuple[str, ...]

_KEY_LINE = re.compile(r"""^(?P<indent> *)(?P<key>"[^"]*"|'[^']*'|[^\s#'"\-][^:#]*?)\s*:(\s|$)""")
_MISSING = object()


class ValuesFormatError(ValueError):
    """values.yaml has a line this script cannot place (it is simpler than a YAML parser)."""


@dataclass
class Doc:
    """The comments above one key."""

    description: str | None = None
    intro: list[str] = field(default_factory=list)


@dataclass
class Row:
    key: str
    type: str
    default: str
    description: str


@dataclass
class Section:
    title: str
    intro: list[str]
    rows: list[Row] = field(default_factory=list)


@dataclass
class Reference:
    """What values.yaml documents, and which values it leaves undocumented."""

    header: list[str]
    sections: list[Section]
    undocumented: list[str]


def _paragraphs(lines: Sequence[str]) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def _doc(block: Sequence[str]) -> Doc:
    starts = [i for i, line in enumerate(block) if line == "--" or line.startswith("-- ")]
    if not starts:
        return Doc(None, _paragraphs(block))
    start = starts[-1]
    lines = [block[start][2:], *block[start + 1 :]]
    description = " ".join(line.strip() for line in lines if line.strip())
    return Doc(description, _paragraphs(block[:start]))


def _lookup(tree: Any, path: ValuePath) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _comments(text: str, tree: dict[str, Any]) -> tuple[list[str], dict[ValuePath, Doc]]:
    """The header paragraphs and the comments above each key path of values.yaml."""
    header: list[str] = []
    docs: dict[ValuePath, Doc] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    at_start = True
    inside: int | None = None  # indentation of a key whose value (a list) spans lines
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if inside is not None:
            if not stripped or indent > inside or (indent == inside and stripped[0] == "-"):
                continue
            inside = None
        if not stripped:
            if at_start and block:
                header = _paragraphs(block)
            at_start = False
            block = []
            continue
        if stripped.startswith("#"):
            block.append(stripped[1:].removeprefix(" ").rstrip())
            continue
        match = _KEY_LINE.match(line)
        if not match:
            raise ValuesFormatError(f"values.yaml line {number}: not a `key: value` line: {line!r}")
        key = match["key"]
        if key[0] in "'\"":
            key = key[1:-1]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = tuple(k for _, k in stack)
        value = _lookup(tree, path)
        if value is _MISSING:
            raise ValuesFormatError(f"values.yaml line {number}: cannot place key {key!r}")
        docs[path] = _doc(block)
        block = []
        at_start = False
        if not isinstance(value, dict):
            inside = indent
    return header, docs


_SCHEMA_TYPES = {
    "boolean": "bool",
    "integer": "int",
    "number": "number",
    "string": "string",
    "array": "list",
    "object": "object",
    "null": "null",
}


def _schema_type(schema: dict[str, Any] | None, path: ValuePath) -> str | None:
    """The type values.schema.json gives the value at ``path`` ("int or string"), if any."""
    node: Any = schema
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get("properties", {}).get(key)
    if not isinstance(node, dict) or "type" not in node:
        return None
    types = node["type"] if isinstance(node["type"], list) else [node["type"]]
    return " or ".join(_SCHEMA_TYPES.get(str(t), str(t)) for t in types)


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null"


def reference(values_text: str, schema: dict[str, Any] | None = None) -> Reference:
    """Parse values.yaml (its text) into sections of documented values; the types come from
    ``schema`` (values.schema.json) where it gives one, else from the defaults."""
    tree = yaml.safe_load(values_text) or {}
    if not isinstance(tree, dict):
        raise ValuesFormatError("values.yaml: the top level must be a mapping")
    header, docs = _comments(values_text, tree)
    described = [path for path, doc in docs.items() if doc.description is not None]

    def described_below(path: ValuePath) -> bool:
        return any(len(p) > len(path) and p[: len(path)] == path for p in described)

    undocumented: list[str] = []

    def walk(node: dict[str, Any], path: ValuePath, rows: list[Row]) -> None:
        for key, value in node.items():
            here = (*path, str(key))
            doc = docs.get(here, Doc())
            if isinstance(value, dict) and value and described_below(here):
                walk(value, here, rows)
            elif doc.description is None:
                undocumented.append(".".join(here))
            else:
                default = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
                kind = _schema_type(schema, here) or _type(value)
                rows.append(Row(".".join(here), kind, default, doc.description))

    general = Section("General", [])
    sections = [general]
    for key, value in tree.items():
        path = (str(key),)
        if isinstance(value, dict) and value and described_below(path):
            doc = docs.get(path, Doc())
            intro = [*doc.intro, *([doc.description] if doc.description else [])]
            section = Section(str(key), intro)
            sections.append(section)
            walk(value, path, section.rows)
        else:
            walk({key: value}, (), general.rows)
    return Reference(header, [s for s in sections if s.rows], undocumented)


def _prose(text: str) -> str:
    """Markdown for a description: code spans kept, table pipes, tags and stars escaped."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts)


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def markdown(ref: Reference) -> str:
    """The generated part of chart/README.md."""
    lines = ["## Values", ""]
    for paragraph in ref.header:
        lines += [_prose(paragraph), ""]
    for section in ref.sections:
        lines += [f"### {section.title}", ""]
        for paragraph in section.intro:
            lines += [_prose(paragraph), ""]
        lines += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
        lines += [
            f"| {_code(r.key)} | {r.type} | {_code(r.default)} | {_prose(r.description)} |"
            for r in section.rows
        ]
        lines.append("")
    return "\n".join(lines)


def render_readme(readme: str, values_text: str, schema: dict[str, Any] | None = None) -> str:
    """chart/README.md with its values reference regenerated from ``values_text``."""
    intro = readme.split(MARKER, 1)[0].rstrip()
    return f"{intro}\n\n{MARKER}\n\n{markdown(reference(values_text, schema))}"


def read_chart(chart: Path) -> tuple[str, str, dict[str, Any] | None]:
    """README.md (empty if missing), values.yaml and values.schema.json (None if missing)."""
    readme_path = chart / "README.md"
    readme = readme_path.read_text(encoding="utf-8") if readme_path.exists() else ""
    values_text = (chart / "values.yaml").read_text(encoding="utf-8")
    schema_path = chart / "values.schema.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8")) if schema_path.exists() else None
    return readme, values_text, schema


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.chart_readme",
        description="Generate chart/README.md's values reference from values.yaml's # -- comments.",
    )
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if the README is not current"
    )
    parser.add_argument("--chart", type=Path, default=CHART, help="chart directory (./chart)")
    args = parser.parse_args(argv)
    readme_path: Path = args.chart / "README.md"
    readme, values_text, schema = read_chart(args.chart)

    undocumented = reference(values_text, schema).undocumented
    for key in undocumented:
        print(f"{args.chart / 'values.yaml'}: {key} has no `# --` description", file=sys.stderr)
    if undocumented:
        return 1
    wanted = render_readme(readme, values_text, schema)
    if args.check:
        if wanted != readme:
            print(
                f"{readme_path} is not current: run python -m tools.chart_readme", file=sys.stderr
            )
            return 1
        return 0
    if wanted != readme:
        readme_path.write_text(wanted, encoding="utf-8")
        print(f"wrote {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
