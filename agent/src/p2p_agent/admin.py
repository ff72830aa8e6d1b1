"""The agent's admin API: the cache, for ``p2p-agent cache`` (:mod:`p2p_agent.cache_cli`).

Served on a unix socket, ``dataDir/admin.sock`` (mode 0600: root on the node, or
``kubectl exec`` into the agent's container), never on a network port. Acting through the
running agent keeps its index of the cache and its seeding right: a blob removed here stops
being seeded, and one a client is reading is never deleted.

``GET /v1/cache``
    The policy in force, the filesystem, every cached blob (least recently used first: the
    next to be evicted) with its size, last use and state, and the partial downloads.
``DELETE /v1/cache/blobs/<digest>``
    Remove one blob (or the files of an interrupted download of it). ``409`` while a client
    reads it or it is being downloaded; ``404`` when nothing of it is here.
``POST /v1/cache/prune``
    JSON ``{}`` applies the policy now; ``{"all": true}`` evicts every blob not in use and the
    files of interrupted downloads; ``{"unused_for": SECONDS}`` evicts every blob not in use
    and unused that long.

Answers are JSON; errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import trio

from p2p_agent.janitor import Janitor, Removal
from p2p_common.asgi import Receive, Request, Scope, Send, lifespan, read_body, send_bytes
from p2p_common.blobcache import BlobCache
from p2p_common.oci import OCIError
from p2p_common.settings import parse_duration

__all__ = ["ADMIN_SOCKET", "AdminApp", "policy_view"]

ADMIN_SOCKET = "admin.sock"
"""The socket's name in dataDir."""
MAX_BODY = 4096
_BLOB_PATH = re.compile(r"^/v1/cache/blobs/(sha256:[0-9a-f]{64})\Z")


class BadRequestError(Exception):
    """The request is malformed (answered 400 with this message)."""


def policy_view(janitor: Janitor) -> dict[str, Any]:
    """The cache policy in force, as ``/status`` and ``GET /v1/cache`` show it."""
    in_force = janitor.in_force
    policy = in_force.policy
    return {
        "quota_bytes": policy.quota,
        "high_watermark_percent": policy.high_watermark,
        "low_watermark_percent": policy.low_watermark,
        "max_unused_seconds": policy.max_unused,
        "sweep_interval_seconds": janitor.interval,
        "source": in_force.source,
        "changed_at": round(in_force.changed_at, 3),
        "limits_unmet": sorted(k for k, v in janitor.unmet.items() if v),
        "evictions": janitor.cache.eviction_counts(),
        "last_sweep_at": None if janitor.last is None else round(janitor.last.at, 3),
    }


def parse_prune(raw: bytes) -> tuple[bool, float | None]:
    """(everything, unused_for) from a prune request's body; raises :class:`BadRequestError`."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise BadRequestError("the body must be JSON") from None
    if not isinstance(body, dict) or set(body) - {"all", "unused_for"}:
        raise BadRequestError('expected {"all": true} or {"unused_for": SECONDS} or {}')
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        raise BadRequestError('"all" must be true or false')
    unused_for = body.get("unused_for")
    if unused_for is not None:
        if isinstance(unused_for, str):
            raise BadRequestError('"unused_for" must be a number of seconds')
        try:
            unused_for = parse_duration(unused_for)
        except ValueError as exc:
            raise BadRequestError(f'"unused_for": {exc}') from None
    if everything and unused_for is not None:
        raise BadRequestError('give "all" or "unused_for", not both')
    return everything, unused_for


class AdminApp:
    def __init__(self, *, janitor: Janitor, cache: BlobCache, downloads: Any) -> None:
        self.janitor = janitor
        self.cache = cache
        self.downloads = downloads
        """Read for ``active`` (digest -> download) and ``info_hashes`` (the seeded blobs)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request.from_scope(scope)
        try:
            status, body = await self._route(request, receive)
        except OCIError as exc:  # read_body: too large
            status, body = exc.status, {"error": exc.message}
        except BadRequestError as exc:
            status, body = 400, {"error": str(exc)}
        await send_bytes(send, status, json.dumps(body).encode())

    async def _route(self, request: Request, receive: Receive) -> tuple[int, dict[str, Any]]:
        path, method = request.path, request.method
        if path == "/v1/cache":
            if method != "GET":
                return 405, {"error": "GET only"}
            return 200, await self.listing()
        if path == "/v1/cache/prune":
            if method != "POST":
                return 405, {"error": "POST only"}
            return 200, await self._prune(await read_body(receive, MAX_BODY))
        if path.startswith("/v1/cache/blobs/"):
            match = _BLOB_PATH.match(path)
            if match is None:
                return 400, {"error": "expected /v1/cache/blobs/sha256:<64 hex digits>"}
            if method != "DELETE":
                return 405, {"error": "DELETE only"}
            return self._removal(match.group(1), await self.janitor.remove(match.group(1)))
        return 404, {"error": "not found"}

    async def _prune(self, raw: bytes) -> dict[str, Any]:
        everything, unused_for = parse_prune(raw)
        result = await self.janitor.prune(everything=everything, unused_for=unused_for)
        return result.view()

    @staticmethod
    def _removal(digest: str, removal: Removal) -> tuple[int, dict[str, Any]]:
        if removal.status == "unknown":
            return 404, {"error": f"{digest} is not in the cache"}
        if removal.status == "in_use":
            return 409, {
                "error": f"{digest} is in use (a client is pulling it, or it is being "
                "downloaded); it was left in place, try again when the pull is done",
                "pins": removal.pins,
            }
        return 200, {"digest": digest, "removed": removal.status, "bytes": removal.bytes}

    async def listing(self) -> dict[str, Any]:
        """What ``p2p-agent cache ls`` shows."""
        cache, downloads = self.cache, self.downloads

        def read() -> tuple[Any, Any, Any]:
            return cache.snapshot(), cache.partials(), self.janitor.disk()

        snapshot, partials, disk = await trio.to_thread.run_sync(read)
        now = time.time()
        seeded = set(getattr(downloads, "info_hashes", {}))
        active = dict(getattr(downloads, "active", {}))
        blobs = []
        for blob in snapshot.blobs:
            pins = snapshot.pins.get(blob.digest, 0)
            seeding = blob.digest in seeded
            state = "in use" if pins else "seeding" if seeding else "cached"
            blobs.append(
                {
                    "digest": blob.digest,
                    "size": blob.size,
                    "last_used_at": round(blob.last_used, 3),
                    "unused_seconds": round(max(0.0, now - blob.last_used), 1),
                    "state": state,
                    "pins": pins,
                    "seeding": seeding,
                }
            )
        partial_views = []
        for partial in partials:
            download = active.get(partial.digest)
            partial_views.append(
                {
                    "digest": partial.digest,
                    "bytes_on_disk": partial.bytes,
                    "size": None if download is None else download.size,
                    "modified_at": round(partial.modified, 3),
                    "state": "downloading" if download is not None else "resumable",
                }
            )
        return {
            "now": round(now, 3),
            "data_dir": str(cache.root),
            "policy": policy_view(self.janitor),
            "disk": None
            if disk is None
            else {
                "total_bytes": disk.total,
                "used_bytes": disk.used,
                "used_percent": round(100 * disk.used / disk.total, 2) if disk.total else None,
            },
            "used_bytes": sum(b.size for b in snapshot.blobs),
            "reserved_bytes": snapshot.reserved,
            "blobs": blobs,
            "partials": partial_views,
        }
