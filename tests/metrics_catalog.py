"""The metric catalogue of docs/metrics.md, parsed, for the tests that hold the services, the
chart's alerts and its dashboard to it.

The page has one section per service (``## p2p-agent``, ``## p2p-proxy``, ``## p2p-tracker``)
and one for what every service exposes (``## Every service``); each holds a table whose rows
start with a metric name in backquotes, then its type, its labels (in backquotes, ``-`` for
none) and its meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DOCUMENTED", "DOC", "Documented", "all_names"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

SECTIONS = {
    "every service": ("agent", "proxy", "tracker"),
    "p2p-agent": ("agent",),
    "p2p-proxy": ("proxy",),
    "p2p-tracker": ("tracker",),
}
TYPES = {"counter", "gauge", "histogram", "info", "summary"}

_ROW = re.compile(r"^\|\s*`([a-zA-Z_:][a-zA-Z0-9_:]*)`\s*\|\s*([a-z]+)\s*\|([^|]*)\|")


@dataclass(frozen=True)
class Documented:
    type: str
    labels: frozenset[str]


def _parse(text: str) -> dict[str, dict[str, Documented]]:
    found: dict[str, dict[str, Documented]] = {"agent": {}, "proxy": {}, "tracker": {}}
    services: tuple[str, ...] = ()
    for line in text.splitlines():
        if line.startswith("## "):
            services = SECTIONS.get(line[3:].strip().lower(), ())
            continue
        match = _ROW.match(line)
        if match is None:
            continue
        name, kind, labels = match.groups()
        if not services:
            raise ValueError(f"docs/metrics.md: {name} is outside a service's section")
        if kind not in TYPES:
            raise ValueError(f"docs/metrics.md: {name} has an unknown type {kind!r}")
        entry = Documented(kind, frozenset(re.findall(r"`([a-zA-Z_][a-zA-Z0-9_]*)`", labels)))
        for service in services:
            if name in found[service]:
                raise ValueError(f"docs/metrics.md: {name} is listed twice for {service}")
            found[service][name] = entry
    return found


DOCUMENTED = _parse(DOC.read_text(encoding="utf-8"))
"""Service (agent, proxy, tracker) -> query name -> type and labels."""


def all_names() -> dict[str, Documented]:
    """Every documented metric of every service, with the series names a query may use
    (a histogram's ``_bucket``, ``_sum`` and ``_count`` too)."""
    names: dict[str, Documented] = {}
    for metrics in DOCUMENTED.values():
        for name, doc in metrics.items():
            names[name] = doc
            if doc.type == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    labels = doc.labels | {"le"} if suffix == "_bucket" else doc.labels
                    names[name + suffix] = Documented("histogram", labels)
    return names
