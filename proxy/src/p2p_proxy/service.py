"""Wiring of p2p-proxy: one :func:`serve` that builds and runs everything.

Order of start-up: the cache directory is scanned, the peer engine listens on
``peerPort``, every cached blob with stored metainfo is seeded again, then the HTTP API
listens and ``/readyz`` turns 200. When ``shutdown_trigger`` returns, ``/readyz`` turns
503, the API stops accepting connections, in-flight requests get ``shutdownTimeout``
seconds, then the engine stops (announcing ``stopped`` to the trackers).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import trio

from p2p_common.asgi import serve_app
from p2p_common.blobcache import BlobCache
from p2p_common.engine import Engine
from p2p_common.logs import event
from p2p_common.settings import ConfigError, registry_name
from p2p_proxy import __version__
from p2p_proxy.app import ProxyApp
from p2p_proxy.authz import Authorizer
from p2p_proxy.fetch import BlobFetcher
from p2p_proxy.limits import OriginLimits
from p2p_proxy.manifests import Manifests
from p2p_proxy.metrics import ProxyMetrics
from p2p_proxy.origin import OriginClient
from p2p_proxy.preheat import Preheater
from p2p_proxy.seeding import Seeder
from p2p_proxy.settings import ProxySettings
from p2p_proxy.status import Limits, StatusView

__all__ = ["open_cache", "serve"]

log = logging.getLogger("p2p.proxy")


async def open_cache(settings: ProxySettings) -> BlobCache:
    """The blob cache in ``dataDir`` (scanned; a directory we cannot use is a config error)."""

    def build() -> BlobCache:
        return BlobCache(settings.data_dir, quota=settings.cache_size)

    try:
        return await trio.to_thread.run_sync(build)
    except OSError as exc:
        raise ConfigError(f"dataDir: {settings.data_dir}: {exc.strerror or exc}") from None


async def serve(
    settings: ProxySettings,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run the proxy until cancelled or until ``shutdown_trigger`` returns.

    Reports the bound API port through ``task_status`` (``listen`` may use port 0).
    """
    metrics = ProxyMetrics()
    cache = await open_cache(settings)
    engine = Engine(
        port=settings.peer_port,
        role="proxy",
        upload_rate=settings.upload_rate,
        max_connections=settings.max_connections,
        super_seed=settings.super_seed,
    )
    egress = settings.egress_routes(os.environ)
    if egress is not None:
        event(log, "proxy.origin_egress", logging.INFO, **egress.describe())
    async with AsyncExitStack() as stack:
        origins: dict[str, OriginClient] = {}
        for url in settings.registry:
            origins[registry_name(url)] = await stack.enter_async_context(
                OriginClient(
                    url,
                    ca_file=settings.registry_ca_file,
                    user_agent="p2p-proxy/0.1",
                    token_max_age=settings.auth_cache_ttl,
                    token_realm_hosts=settings.token_realm_hosts,
                    egress=egress,
                )
            )
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.serve)
            seeder = Seeder(engine, cache, nursery, settings.trackers)
            stack.callback(seeder.close)  # after the nursery: the engine has stopped
            cache.on_evict = partial(_evicted, seeder, metrics)
            reseeded = await seeder.reseed_all()
            limits = OriginLimits.from_settings(settings, metrics)
            preheater = Preheater(nursery)
            fetcher = BlobFetcher(
                cache,
                metrics,
                nursery,
                settings.trackers,
                disk=engine.shared.disk,
                listener=seeder,
                limits=limits,
            )
            app = ProxyApp(
                origins=origins,
                cache=cache,
                authorizer=Authorizer(nursery, metrics, ttl=settings.auth_cache_ttl),
                manifests=Manifests(
                    nursery,
                    metrics,
                    Authorizer(nursery, metrics, ttl=settings.auth_cache_ttl, kind="manifest"),
                    max_bytes=settings.manifest_cache_size,
                ),
                fetcher=fetcher,
                seeder=seeder,
                metrics=metrics,
                peer_port=lambda: engine.port,
                progressive_streams=settings.progressive_streams,
                limits=limits,
                preheater=preheater,
            )
            app.status = StatusView(
                version=__version__,
                registries=origins,
                fetches=fetcher.log,
                cache=cache,
                seeds=seeder.torrents,
                engine=engine,
                jobs=lambda: reversed(list(preheater.jobs.values())),
                origin_limits=limits,
                limits=Limits(
                    upload_rate=settings.upload_rate,
                    max_connections=settings.max_connections,
                    progressive_streams=settings.progressive_streams,
                    auth_cache_ttl=settings.auth_cache_ttl,
                ),
                trackers=settings.trackers,
                data_dir=settings.data_dir,
                ready=lambda: app.ready,
                egress=egress,
            )
            metrics.watch(
                lambda: {
                    "uploaded": float(engine.upload_limiter.total),
                    "seeding": float(len(engine.torrents)),
                    "connections": float(engine.connection_count),
                    "cache_used": float(cache.used),
                    "cache_blobs": float(len(cache.digests())),
                    "cache_quota": float(cache.quota),
                },
                settings.data_dir,
            )

            async def trigger() -> None:
                if shutdown_trigger is None:
                    await trio.sleep_forever()
                else:
                    await shutdown_trigger()
                app.ready = False
                event(log, "proxy.stopping", grace=settings.shutdown_timeout)

            async with trio.open_nursery() as server:
                port: int = await server.start(
                    partial(
                        serve_app,
                        app,
                        settings.listen,
                        shutdown_trigger=trigger,
                        graceful_timeout=settings.shutdown_timeout,
                        send_timeout=settings.send_timeout,
                        tls=_tls_files(settings),
                    )
                )
                app.ready = True
                event(
                    log,
                    "proxy.listening",
                    port=port,
                    tls=settings.tls_cert_file is not None,
                    peer_port=engine.port,
                    registries=list(origins),
                    cached=len(cache.digests()),
                    reseeded=reseeded,
                )
                task_status.started(port)
            cache.on_evict = None
            nursery.cancel_scope.cancel()
    event(log, "proxy.stopped")


def _evicted(seeder: Seeder, metrics: ProxyMetrics, digest: str) -> None:
    metrics.evictions.inc()
    seeder.on_evict(digest)


def _tls_files(settings: ProxySettings) -> tuple[Path, Path] | None:
    """(certificate, key) when the agent API serves HTTPS; a pair that cannot be loaded is a
    configuration error naming the keys (exit 2), not a failure to listen."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None or key is None:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        detail = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"tlsCertFile/tlsKeyFile: {cert}, {key}: {detail}") from None
    return cert, key
