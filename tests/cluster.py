"""p2p services in this process, for component and end-to-end tests of the pull path.

Each ``run_*`` context manager starts one service through its real ``serve()`` wiring on
127.0.0.1, or on ``host`` (``::1``), with ports chosen by the kernel or :func:`free_port`,
yields a handle with an httpx client, and stops it through the service's graceful path on exit.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2p_agent.service import AgentPorts
from p2p_agent.service import serve as serve_agent
from p2p_agent.settings import AgentSettings
from p2p_common.settings import join_host_port
from p2p_proxy.service import serve as serve_proxy
from p2p_proxy.settings import ProxySettings
from p2p_tracker.service import serve as serve_tracker
from p2p_tracker.settings import TrackerSettings
from tests.realparts import images
from tests.realparts.procs import free_port
from tests.realparts.registry import AuthMode, Registry, run_registry


def basic(user: str, password: str) -> dict[str, str]:
    raw = f"{user}:{password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def metric(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    """One sample of a service's ``/metrics`` (0 when absent)."""
    response = await http.get("/metrics")
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@asynccontextmanager
async def run_tracker(*, host: str = "127.0.0.1", announce_interval: int = 5) -> AsyncIterator[str]:
    """Our tracker on ``host`` (``::1`` for IPv6); yields its announce URL."""
    settings = TrackerSettings.load(
        None,
        environ={},
        listen=join_host_port(host, 0),
        announce_interval=announce_interval,
        min_announce_interval=1,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_tracker, settings)
        yield f"http://{join_host_port(host, port)}/announce"
        nursery.cancel_scope.cancel()


@dataclass
class ProxyHandle:
    settings: ProxySettings
    port: int
    http: httpx.AsyncClient
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{join_host_port(self.host, self.port)}"


@asynccontextmanager
async def run_proxy(
    data_dir: Path,
    registries: Sequence[str],
    trackers: Sequence[str],
    *,
    host: str = "127.0.0.1",
    **overrides: object,
) -> AsyncIterator[ProxyHandle]:
    """A proxy whose API listens on ``host`` (its peer port on every address)."""
    overrides.setdefault("shutdown_timeout", 2.0)
    settings = ProxySettings.load(
        None,
        environ={},
        listen=join_host_port(host, 0),
        peer_port=free_port(),
        data_dir=data_dir,
        registry=list(registries),
        trackers=list(trackers),
        **overrides,
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(partial(serve_proxy, settings, shutdown_trigger=stop.wait))
        async with httpx.AsyncClient(
            base_url=f"http://{join_host_port(host, port)}", timeout=60, trust_env=False
        ) as http:
            yield ProxyHandle(settings, port, http, host)
        stop.set()


@dataclass
class AgentHandle:
    settings: AgentSettings
    ports: AgentPorts
    http: httpx.AsyncClient
    """The registry API (what containerd talks to)."""
    status: httpx.AsyncClient
    """Metrics, health and readiness."""
    address: str = "127.0.0.1"

    @property
    def host(self) -> str:
        return join_host_port(self.address, self.ports.api)

    async def metric(self, name: str, **labels: str) -> float:
        return await metric(self.status, name, **labels)


@asynccontextmanager
async def run_agent(
    data_dir: Path,
    registries: Sequence[str],
    proxies: Sequence[str],
    *,
    config_file: Path | None = None,
    host: str = "127.0.0.1",
    **overrides: object,
) -> AsyncIterator[AgentHandle]:
    """An agent with every port on ``host`` (``::1``: IPv6 only).

    Without a config file the disk watermarks are off unless a test sets them: the data
    directory is on the machine's shared disk, and an agent on a disk more than 85% full
    (``cacheHighWatermark``) rightly evicts the blobs a test has just pulled (a CI run on a
    disk at 84% failed six tests that way)."""
    if config_file is None:
        overrides.setdefault("cache_high_watermark", 0)
    settings = AgentSettings.load(
        config_file,
        environ={},
        listen=join_host_port(host, 0),
        metrics_listen=join_host_port(host, 0),
        peer_host=host,
        peer_port=free_port(),
        data_dir=data_dir,
        registry=list(registries),
        proxies=list(proxies),
        **overrides,
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ports: AgentPorts = await nursery.start(
            partial(serve_agent, settings, config_file=config_file, shutdown_trigger=stop.wait)
        )
        async with (
            httpx.AsyncClient(
                base_url=f"http://{join_host_port(host, ports.api)}", timeout=120, trust_env=False
            ) as http,
            httpx.AsyncClient(
                base_url=f"http://{join_host_port(host, ports.metrics)}",
                timeout=30,
                trust_env=False,
            ) as status,
        ):
            yield AgentHandle(settings, ports, http, status, host)
        stop.set()


def push(
    workdir: Path,
    registry: Registry,
    repository: str,
    *,
    creds: tuple[str, str] | None = None,
    **options: object,
) -> images.Image:
    """Build an image (see ``images.make_image``) and push it to ``registry``."""
    layout = workdir / f"layout-{repository.replace('/', '-')}-{options.get('seed', 'x')}"
    image = images.build_image(layout, **options)  # type: ignore[arg-type]
    images.push_image(layout, image, registry.host, repository, creds=creds)
    return image


@contextmanager
def origin_with_image(
    workdir: Path,
    *,
    repository: str = "team/app",
    auth: AuthMode = "none",
    creds: tuple[str, str] | None = None,
    **options: object,
) -> Iterator[tuple[Registry, images.Image]]:
    """A real registry (``auth``: ``none`` or ``token``) holding one image built with
    ``images.build_image(**options)`` under ``repository``: the origin of most component
    tests' modules."""
    with run_registry(workdir / "registry", auth=auth) as registry:
        yield registry, push(workdir, registry, repository, creds=creds, **options)
