"""What the demo found: the agents' metrics, per-agent results and the summary table.

:func:`parse_metrics` reads the Prometheus text format an agent serves on ``/metrics``;
:func:`agent_traffic` turns it into bytes by source (``p2p_agent_download_bytes_total{source=…}``).
:class:`Summary` holds the whole run and renders the table printed at the end and the JSON
written with ``--summary-json``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from tests.demo.progress import MB, mb

__all__ = [
    "AgentReport",
    "Summary",
    "Traffic",
    "agent_traffic",
    "read_traffic",
    "parse_metrics",
]

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = list[tuple[str, dict[str, str], float]]


def parse_metrics(text: str) -> Samples:
    """``(name, labels, value)`` of every sample in a Prometheus text exposition."""
    samples: Samples = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        samples.append((match["name"], labels, value))
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        value
        for sample, have, value in samples
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


PROXY_SOURCES = ("proxy", "proxy_stream")
"""Download sources that are a proxy: its BitTorrent seed, and its HTTP stream of a blob it is
still fetching from the origin."""


@dataclass(frozen=True)
class Traffic:
    """An agent's bytes by where they came from, and what it uploaded, from its metrics.

    ``sources`` is ``p2p_agent_download_bytes_total`` by its ``source`` label: ``agent`` (other
    agents), ``proxy`` (a proxy's BitTorrent seed), ``proxy_stream`` (a proxy streaming a blob
    over HTTP while it fetches it from the origin), ``http_fallback`` (pieces fetched from a proxy
    over HTTP when the swarm stalled), ``foreign`` (other BitTorrent peers).
    """

    sources: dict[str, int] = field(default_factory=dict)
    uploaded: int = 0
    """``p2p_agent_upload_bytes_total``: what the agent uploaded to its peers."""
    pulled: int = 0
    """``p2p_agent_pull_bytes_total``: what the agent sent to its client (us)."""
    fallbacks: int = 0

    @property
    def from_agents(self) -> int:
        return self.sources.get("agent", 0)

    @property
    def from_proxies(self) -> int:
        """From the proxies, over BitTorrent or streamed (not the fallback)."""
        return sum(self.sources.get(source, 0) for source in PROXY_SOURCES)

    @property
    def streamed(self) -> int:
        return self.sources.get("proxy_stream", 0)

    @property
    def from_http_fallback(self) -> int:
        return self.sources.get("http_fallback", 0)

    @property
    def downloaded(self) -> int:
        return sum(self.sources.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": dict(self.sources),
            "from_agents": self.from_agents,
            "from_proxies": self.from_proxies,
            "from_http_fallback": self.from_http_fallback,
            "downloaded": self.downloaded,
            "uploaded": self.uploaded,
            "pulled": self.pulled,
            "fallbacks": self.fallbacks,
        }


def agent_traffic(samples: Samples) -> Traffic:
    """:class:`Traffic` from an agent's parsed metrics."""
    sources: dict[str, int] = {}
    for name, labels, value in samples:
        if name == "p2p_agent_download_bytes_total" and value:
            source = labels.get("source", "?")
            sources[source] = sources.get(source, 0) + int(value)
    return Traffic(
        sources=sources,
        uploaded=int(metric(samples, "p2p_agent_upload_bytes_total")),
        pulled=int(metric(samples, "p2p_agent_pull_bytes_total")),
        fallbacks=int(metric(samples, "p2p_agent_http_fallbacks_total")),
    )


async def read_traffic(client: httpx.AsyncClient, url: str) -> Traffic:
    """An agent's :class:`Traffic`, read once from its ``/metrics`` at ``url``."""
    response = await client.get(url)
    response.raise_for_status()
    return agent_traffic(parse_metrics(response.text))


@dataclass
class AgentReport:
    """One agent's pull."""

    name: str
    seconds: float
    bytes: int
    blobs: int
    verified: bool
    problems: list[str] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)
    first_byte: float = 0.0
    """Seconds from the start of the pulls to the first layer byte this agent served."""

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else math.inf


@dataclass
class Summary:
    """The whole run."""

    origin_kind: str
    origin_description: str
    origin_source: str
    """Where the origin's numbers come from (the access log, or the built-in counters)."""
    image_reference: str
    image_bytes: int
    image_blobs: int
    manifest_digest: str
    origin_bytes: int
    origin_gets: int
    pull_seconds: float
    agents: list[AgentReport]
    setup_seconds: float = 0.0
    origin_manifest_gets: int = 0
    origin_done: float | None = None
    """Seconds from the start of the pulls until the proxies had received every blob byte from
    the origin (None: not seen before the pulls ended)."""

    @property
    def verified(self) -> bool:
        return bool(self.agents) and all(agent.verified for agent in self.agents)

    @property
    def origin_ratio(self) -> float:
        return self.origin_bytes / self.image_bytes if self.image_bytes else math.inf

    @property
    def pull_rate(self) -> float:
        """Bytes per second through all agents together."""
        return self.pulled_bytes / self.pull_seconds if self.pull_seconds > 0 else math.inf

    @property
    def pulled_bytes(self) -> int:
        return sum(agent.bytes for agent in self.agents)

    def table(self) -> list[str]:
        """The per-agent table."""
        header = (
            f"  {'agent':<9} {'first byte':>10} {'pull time':>9} {'MB/s':>7} {'from agents':>12} "
            f"{'from proxies':>13} {'HTTP fallback':>14} {'uploaded':>9}  verified"
        )
        lines = [header, "  " + "-" * (len(header) - 2)]
        for agent in self.agents:
            t = agent.traffic
            verdict = f"yes, {agent.blobs} blobs" if agent.verified else "NO"
            lines.append(
                f"  {agent.name:<9} {agent.first_byte:8.2f} s {agent.seconds:7.2f} s "
                f"{agent.rate / MB:7.1f} "
                f"{mb(t.from_agents):>9} MB {mb(t.from_proxies):>10} MB "
                f"{mb(t.from_http_fallback):>11} MB {mb(t.uploaded):>6} MB  {verdict}"
            )
        total = self.total_traffic()
        slowest = max((a.seconds for a in self.agents), default=0.0)
        lines.append(
            f"  {'all':<9} {'':>10} {slowest:7.2f} s {'':>7} {mb(total.from_agents):>9} MB "
            f"{mb(total.from_proxies):>10} MB {mb(total.from_http_fallback):>11} MB "
            f"{mb(total.uploaded):>6} MB"
        )
        return lines

    def total_traffic(self) -> Traffic:
        """Every agent's traffic added up."""
        sources: dict[str, int] = {}
        for agent in self.agents:
            for source, count in agent.traffic.sources.items():
                sources[source] = sources.get(source, 0) + count
        return Traffic(
            sources=sources,
            uploaded=sum(a.traffic.uploaded for a in self.agents),
            pulled=sum(a.traffic.pulled for a in self.agents),
            fallbacks=sum(a.traffic.fallbacks for a in self.agents),
        )

    def overall(self) -> list[str]:
        """The lines under the table: the image, the origin, the pulls."""
        count = len(self.agents)
        total = self.total_traffic()
        downloaded = total.downloaded
        if downloaded:
            parts = [
                f"{mb(total.from_agents)} MB ({total.from_agents / downloaded:.0%}) from other "
                f"agents",
                f"{mb(total.sources.get('proxy', 0))} MB from the proxies' BitTorrent seeds",
            ]
            if total.streamed:
                parts.append(
                    f"{mb(total.streamed)} MB streamed by the proxies while they fetched "
                    f"from the origin"
                )
            if total.from_http_fallback:
                parts.append(f"{mb(total.from_http_fallback)} MB by HTTP fallback")
            others = {
                k: v
                for k, v in total.sources.items()
                if k not in ("agent", "proxy", "proxy_stream", "http_fallback")
            }
            parts += [f"{mb(v)} MB from {k}" for k, v in sorted(others.items())]
            peers = "the agents got " + ", ".join(parts)
        else:
            peers = "the agents reported no downloads"
        return [
            f"  image        {self.image_reference}: {mb(self.image_bytes)} MB in "
            f"{self.image_blobs} blobs, manifest {self.manifest_digest[:19]}…",
            f"  origin       {self.origin_description}",
            f"  origin sent  {mb(self.origin_bytes)} MB of blobs in {self.origin_gets} GETs = "
            f"{self.origin_ratio:.2f} x the image (a pull per agent straight from the origin: "
            f"{count:.2f} x) [{self.origin_source}]; and the manifest "
            f"{self.origin_manifest_gets} time(s) for {count} agents",
            f"  pulled       {mb(self.pulled_bytes)} MB through {count} agents at once in "
            f"{self.pull_seconds:.2f} s ({self.pull_rate / MB:.1f} MB/s); "
            + (
                "every blob byte-identical to the pushed image (sha256)"
                if self.verified
                else "VERIFICATION FAILED"
            ),
            f"  peers        {peers}",
            f"  pipelining   {self.pipelining()}",
        ]

    def pipelining(self) -> str:
        """Did the agents get bytes while the proxies were still fetching from the origin?"""
        if not self.agents:
            return "no agents"
        latest = max(agent.first_byte for agent in self.agents)
        firsts = f"every agent was serving layer bytes by {latest:.2f} s"
        if self.origin_done is None:
            return f"{firsts}; the proxies' origin counters did not reach the image's size"
        early = sum(1 for agent in self.agents if agent.first_byte < self.origin_done)
        return (
            f"the proxies had the whole image from the origin by {self.origin_done:.2f} s; "
            f"{firsts} ({early} of {len(self.agents)} agents before the proxies had it all: "
            f"the swarm does not wait for whole blobs)"
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for agent, report in zip(doc["agents"], self.agents, strict=True):
            agent["traffic"] = report.traffic.to_json()
        doc["verified"] = self.verified
        doc["origin_ratio"] = self.origin_ratio
        doc["pulled_bytes"] = self.pulled_bytes
        return doc
