"""What every service's ``/metrics`` shares.

:func:`service_registry` makes a service's registry with the process and Python runtime
collectors and ``p2p_build_info``; :func:`render` answers a scrape in the format its ``Accept``
header asks for (OpenMetrics for Prometheus, the classic text format otherwise). Importing this
module turns off the ``*_created`` series prometheus_client adds to counters and histograms:
they double the series count and no p2p dashboard or alert uses them.

The metric names of every service are listed in docs/metrics.md; a test compares that list with
what the services expose.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily

__all__ = ["filesystem_gauges", "filesystem_usage", "render", "service_registry"]

disable_created_metrics()  # type: ignore[no-untyped-call]  # (untyped in prometheus_client)


def service_registry(service: str, version: str) -> CollectorRegistry:
    """A registry of its own for one service (several may share a process in tests), holding
    the ``process_*`` and ``python_*`` collectors and ``p2p_build_info``."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Gauge(
        "p2p_build_info",
        "Always 1; the labels say which service, version and Python runs here.",
        ["version", "service", "python"],
        registry=registry,
    ).labels(version=version, service=service, python=platform.python_version()).set(1)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry's samples and their content type, for a scrape whose ``Accept`` header is
    ``accept``: OpenMetrics when it asks for ``application/openmetrics-text``, else the
    Prometheus text format 0.0.4."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def filesystem_usage(path: os.PathLike[str] | str) -> tuple[int, int] | None:
    """(size, bytes this process may still use) of the filesystem holding ``path``; None when
    it cannot be read."""
    try:
        disk = os.statvfs(path)
    except OSError:
        return None
    return disk.f_blocks * disk.f_frsize, disk.f_bavail * disk.f_frsize


def filesystem_gauges(
    service: str, data_dir: os.PathLike[str] | str | None
) -> Iterator[GaugeMetricFamily]:
    """``p2p_<service>_cache_filesystem_{size,free}_bytes`` of the filesystem holding
    ``data_dir`` (0 when it cannot be read)."""
    usage = None if data_dir is None else filesystem_usage(data_dir)
    size, free = usage or (0, 0)
    yield GaugeMetricFamily(
        f"p2p_{service}_cache_filesystem_size_bytes",
        "Size of the filesystem that holds dataDir (0 if it cannot be read).",
        value=size,
    )
    yield GaugeMetricFamily(
        f"p2p_{service}_cache_filesystem_free_bytes",
        f"Bytes of the filesystem that holds dataDir that the {service} may still use.",
        value=free,
    )
