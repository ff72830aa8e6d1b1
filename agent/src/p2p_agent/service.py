"""Wiring of p2p-agent: the one place where its parts are put together.

``serve(settings)`` starts the BitTorrent engine on ``peerPort``, reseeds the cache,
serves the registry API on ``listen`` (127.0.0.1:5004) and metrics/health on
``metricsListen``, keeps the cache within its policy (:mod:`p2p_agent.janitor`), serves
the admin API for ``p2p-agent cache`` on the unix socket ``dataDir/admin.sock``, and,
given the config file, applies new ``downloadRate``, ``uploadRate`` and cache policy
values from it without a restart (Kubernetes updates a mounted ConfigMap by swapping a
symlink; the file is polled by path).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from p2p_agent import __version__
from p2p_agent.admin import ADMIN_SOCKET, AdminApp, policy_view
from p2p_agent.api import RegistryApp
from p2p_agent.downloads import Downloads
from p2p_agent.janitor import Janitor, PolicyInForce
from p2p_agent.metrics import AgentMetrics, engine_reader
from p2p_agent.mirror import MirrorStatus
from p2p_agent.pacing import Pacer
from p2p_agent.proxies import ProxyClient
from p2p_agent.settings import AgentSettings
from p2p_agent.status import Rates, StatusView, page
from p2p_common.asgi import Receive, Request, Scope, Send, lifespan, send_bytes, serve_app
from p2p_common.blobcache import BlobCache
from p2p_common.diskpace import Pace
from p2p_common.engine import Engine
from p2p_common.httpclient import tune_reads
from p2p_common.logs import event
from p2p_common.settings import ConfigError

log = logging.getLogger("p2p.agent")

CONFIG_POLL_SECONDS = 2.0
GRACEFUL_SECONDS = 60.0
"""In-flight pulls get this long to finish after SIGTERM (the chart allows 120 s)."""
LIVE_KEYS = (
    "downloadRate",
    "uploadRate",
    "diskWriteLatencyLimit",
    "diskMinDownloadRate",
    "cacheSize",
    "cacheHighWatermark",
    "cacheLowWatermark",
    "cacheMaxUnused",
    "cacheSweepInterval",
)
MAX_UNIX_SOCKET_PATH = 107
"""Bytes of a unix socket's path Linux accepts (sun_path holds 108 with the final NUL)."""


@dataclass
class AgentPorts:
    api: int
    metrics: int
    peer: int


class StatusApp:
    """``/metrics``, ``/healthz``, ``/readyz``, ``/status`` (JSON) and ``/`` (the status page)
    on ``metricsListen``."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self.ready = False
        self.view: StatusView | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        request = Request.from_scope(scope)
        head = request.method == "HEAD"
        if request.path == "/metrics":
            body, content_type = self.metrics.render(", ".join(request.headers.get("accept", [])))
            await send_bytes(send, 200, body, content_type=content_type, head=head)
        elif request.path == "/healthz":
            await send_bytes(send, 200, b"ok\n", content_type="text/plain", head=head)
        elif request.path == "/readyz":
            status = 200 if self.ready else 503
            body = b"ready\n" if self.ready else b"not ready\n"
            await send_bytes(send, status, body, content_type="text/plain", head=head)
        elif request.path == "/status" and self.view is not None:
            body = json.dumps(self.view.snapshot(), separators=(",", ":")).encode()
            await send_bytes(send, 200, body, content_type="application/json", head=head)
        elif request.path in ("/", "/index.html"):
            await send_bytes(send, 200, page(), content_type="text/html; charset=utf-8", head=head)
        else:
            await send_bytes(send, 404, b"not found\n", content_type="text/plain", head=head)


def _tracker_urls(engine: Engine) -> set[str]:
    """The tracker URLs in the metainfo of the engine's torrents."""
    return {url for torrent in list(engine.torrents.values()) for url in torrent.info.trackers}


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)  # follows the ..data symlink kubelet swaps
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


async def watch_config(
    path: Path, current: AgentSettings, apply: Callable[[AgentSettings], None]
) -> None:
    """Re-read ``path`` when it changes; hand valid settings to ``apply``."""
    seen = _stat_key(path)
    while True:
        await trio.sleep(CONFIG_POLL_SECONDS)
        key = _stat_key(path)
        if key is None or key == seen:
            continue
        seen = key
        try:
            fresh = await trio.to_thread.run_sync(AgentSettings.load, path)
        except ConfigError as exc:
            event(log, "config.rejected", logging.ERROR, file=str(path), error=str(exc))
            continue
        old, new = current.dump(), fresh.dump()
        restart = sorted(k for k in new if new[k] != old[k] and k not in LIVE_KEYS)
        if restart:
            event(log, "config.needs_restart", logging.WARNING, keys=",".join(restart))
        apply(fresh)
        current = fresh


async def serve_admin(
    app: AdminApp, path: Path, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """The admin API on its unix socket (removed again when the agent stops). A ``dataDir``
    too deep for a socket's path leaves the agent without it (``p2p-agent cache`` then says
    the agent is not running), not without its registry API."""
    if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH:
        event(
            log,
            "admin.unavailable",
            logging.ERROR,
            socket=str(path),
            error=f"the path is longer than {MAX_UNIX_SOCKET_PATH} bytes",
        )
        task_status.started(0)
        return
    try:
        await serve_app(app, f"unix:{path}", graceful_timeout=5.0, task_status=task_status)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def serve(
    settings: AgentSettings,
    *,
    config_file: Path | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[AgentPorts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until cancelled, or until ``shutdown_trigger`` returns and in-flight
    pulls have finished (bounded)."""
    metrics = AgentMetrics()
    cache = await trio.to_thread.run_sync(
        lambda: BlobCache(settings.data_dir, quota=settings.cache_size)
    )
    source = "config file" if config_file is not None else "settings"
    janitor = Janitor(
        cache,
        settings.data_dir,
        PolicyInForce(settings.cache_policy(), source),
        interval=settings.cache_sweep_interval,
    )
    engine = Engine(
        host=settings.peer_host,
        port=settings.peer_port,
        role="agent",
        download_rate=settings.download_rate,
        upload_rate=settings.upload_rate,
        max_connections=settings.max_connections,
    )
    metrics.watch(engine_reader(engine, cache, settings.data_dir, lambda: janitor.unmet))

    origin = source
    rates = Rates(settings.download_rate, settings.upload_rate, origin)

    def show_download_rate(_pace: Pace | None = None) -> None:
        """The download rate in force (downloadRate, or the adaptive limit below it) into the
        status view and the metrics: when the adaptive limit changes it, and on a reload."""
        adaptive = pacer.core.adaptive is not None
        rates.download, rates.changed_at = round(pacer.rate), time.time()
        rates.source = "adaptive (disk writes too slow)" if adaptive else origin
        metrics.download_rate.set(pacer.rate)
        metrics.download_rate_adaptive.set(1 if adaptive else 0)

    pacer = Pacer(
        engine,
        limit=settings.disk_write_latency_limit,
        floor=settings.disk_min_download_rate,
        configured=settings.download_rate,
        on_change=show_download_rate,
        observe=metrics.disk_flush_seconds.observe,
    )

    def adaptive_view() -> dict[str, Any] | None:
        core = pacer.core
        if not core.limit:
            return None
        return {
            "limit_seconds": core.limit,
            "min_bytes_per_second": round(core.floor),
            "active": core.adaptive is not None,
            "last_flush_seconds": round(core.last_latency, 3),
            "cuts": core.cuts,
        }

    def apply_cache_policy(fresh: AgentSettings) -> None:
        janitor.interval = fresh.cache_sweep_interval
        policy = fresh.cache_policy()
        if janitor.set_policy(policy, "config file (reloaded)"):
            event(
                log,
                "cache.policy_applied",
                cacheSize=policy.quota,
                cacheHighWatermark=policy.high_watermark,
                cacheLowWatermark=policy.low_watermark,
                cacheMaxUnused=policy.max_unused,
            )

    def apply(fresh: AgentSettings) -> None:
        nonlocal origin
        origin = "config file (reloaded)"
        pacer.reconfigure(
            limit=fresh.disk_write_latency_limit,
            floor=fresh.disk_min_download_rate,
            configured=fresh.download_rate,
        )
        rates.upload = fresh.upload_rate
        show_download_rate()
        engine.set_rates(pacer.rate, fresh.upload_rate)
        metrics.upload_rate.set(fresh.upload_rate)
        event(
            log,
            "rates.applied",
            downloadRate=fresh.download_rate,
            uploadRate=fresh.upload_rate,
            diskWriteLatencyLimit=fresh.disk_write_latency_limit,
        )
        apply_cache_policy(fresh)

    rates.adaptive = adaptive_view
    metrics.download_rate.set(settings.download_rate)
    metrics.upload_rate.set(settings.upload_rate)
    status = StatusApp(metrics)
    tune_reads()
    timeout = httpx.Timeout(connect=5.0, read=300.0, write=60.0, pool=30.0)
    verify: ssl.SSLContext | bool = True
    if settings.proxy_ca_file is not None:
        verify = ssl.create_default_context(cafile=os.fspath(settings.proxy_ca_file))
    async with httpx.AsyncClient(timeout=timeout, trust_env=False, verify=verify) as http:
        proxies = ProxyClient(settings.proxies, http)
        downloads = Downloads(
            cache=cache,
            engine=engine,
            proxies=proxies,
            metrics=metrics,
            fallback_after=settings.fallback_after,
            swarm_min_size=settings.swarm_min_size,
        )
        cache.on_evict = downloads.evicted
        janitor.notify = downloads.evicted
        janitor.downloading = lambda: set(downloads.active)
        downloads.on_complete = lambda _digest: janitor.poke()
        app = RegistryApp(
            registries=settings.registry,
            proxies=proxies,
            downloads=downloads,
            cache=cache,
            metrics=metrics,
            auth_ttl=settings.auth_cache_ttl,
        )
        api_port = 0  # bound below (``listen`` may ask for port 0)
        status.view = StatusView(
            version=__version__,
            pulls=app.pulls,
            downloads=downloads,
            cache=cache,
            proxies=proxies,
            rates=rates,
            data_dir=settings.data_dir,
            trackers=engine.shared.announcer.log,
            tracker_urls=lambda: _tracker_urls(engine),
            mirror=MirrorStatus(
                app.namespaces,
                config_path=settings.mirror_config_path,
                port=lambda: api_port,
                use=app.use,
            ),
            cache_policy=lambda: policy_view(janitor),
        )
        admin = AdminApp(janitor=janitor, cache=cache, downloads=downloads)
        api_done = trio.Event()

        async def run_api(task_status: trio.TaskStatus[int]) -> None:
            try:
                await serve_app(
                    app,
                    settings.listen,
                    shutdown_trigger=shutdown_trigger,
                    graceful_timeout=GRACEFUL_SECONDS,
                    send_timeout=settings.send_timeout,
                    task_status=task_status,
                )
            finally:
                api_done.set()

        async def gauges() -> None:
            while True:
                metrics.cache_bytes.set(cache.used)
                metrics.active_torrents.set(len(engine.torrents))
                await trio.sleep(2.0)

        async with trio.open_nursery() as nursery:
            await nursery.start(engine.serve)
            await nursery.start(downloads.run)
            await nursery.start(janitor.run)
            await nursery.start(serve_admin, admin, settings.data_dir / ADMIN_SOCKET)
            nursery.start_soon(gauges)
            nursery.start_soon(pacer.run)
            if config_file is not None:
                nursery.start_soon(watch_config, config_file, settings, apply)
            status_port = await nursery.start(serve_app, status, settings.metrics_listen)
            api_port = await nursery.start(run_api)
            status.ready = True
            event(log, "agent.ready", api=api_port, metrics=status_port, peer=engine.port)
            task_status.started(AgentPorts(api=api_port, metrics=status_port, peer=engine.port))
            await api_done.wait()
            status.ready = False
            nursery.cancel_scope.cancel()
    event(log, "agent.stopped")
