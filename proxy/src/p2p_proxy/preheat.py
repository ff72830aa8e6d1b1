"""Preheat: fetch every blob of an image from the origin once and seed it, before a rollout.

``POST /p2p/v1/preheat`` (JSON ``{"image": "team/app:1.0", "platforms": ["linux/amd64"]}``,
the registry by ``?ns=`` as for the rest of the API, the caller's credentials in
``Authorization``) starts a job and answers 202 with it; ``GET /p2p/v1/preheat/<id>`` shows
its progress, ``GET /p2p/v1/preheat`` the recent jobs. The job resolves the image at the origin
with the caller's credentials (an index: every manifest whose platform matches, or all of them
when no platform is given), then gets each config and layer blob into the cache the way an
agent's request would (single flight, the caller's limits on origin work) and seeds it. A blob
already cached costs nothing. ``p2p-proxy preheat IMAGE`` (p2p_proxy.preheat_cli) drives it.

:func:`~p2p_common.imagewalk.manifest_children` and :func:`~p2p_common.imagewalk.image_blobs`
(pure, shared with the agent's ``prefetch``) walk the image; :class:`Preheater` is the shell.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2p_common.imagewalk import image_blobs, invalid_document, manifest_children
from p2p_common.logs import event
from p2p_common.oci import (
    DEFAULT_MANIFEST_ACCEPT,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    ErrorCode,
    OCIError,
    base_media_type,
    is_valid_digest,
)
from p2p_common.registry_auth import Credentials

__all__ = ["Job", "Preheater", "image_blobs", "manifest_children", "parse_request"]

log = logging.getLogger("p2p.proxy")

MAX_JOBS = 100
"""Jobs remembered, finished ones dropped first; with this many unfinished, a new one is
refused (429) rather than queued without bound."""
MAX_RUNNING = 4
"""Jobs running at once; more wait their turn."""
BLOBS_AT_ONCE = 3
"""Blobs one job fetches at once (what containerd does for one image)."""
MAX_REQUEST_BYTES = 16 * 1024


def parse_request(body: bytes) -> tuple[str, str, list[str]]:
    """(repository, reference, platforms) from a ``POST /p2p/v1/preheat`` body."""
    if len(body) > MAX_REQUEST_BYTES:
        raise OCIError(ErrorCode.SIZE_INVALID, "preheat request too large", status=413)
    try:
        doc = json.loads(body)
    except ValueError:
        raise OCIError(
            ErrorCode.UNSUPPORTED, "the preheat request is not JSON", status=400
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
        raise OCIError(
            ErrorCode.UNSUPPORTED, 'the preheat request needs {"image": "name:tag"}', status=400
        )
    platforms = doc.get("platforms", [])
    if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
        raise OCIError(ErrorCode.UNSUPPORTED, "platforms must be a list of os/arch", status=400)
    image: str = doc["image"]
    if "@" in image:
        repository, _, reference = image.partition("@")
        if not is_valid_digest(reference):
            raise OCIError(ErrorCode.DIGEST_INVALID, f"bad digest in {image!r}", status=400)
    else:
        slash = image.rfind("/")
        colon = image.rfind(":")
        if colon > slash:
            repository, reference = image[:colon], image[colon + 1 :]
        else:
            repository, reference = image, "latest"
    if not repository or not reference:
        raise OCIError(ErrorCode.NAME_INVALID, f"not an image name: {image!r}", status=400)
    return repository, reference, list(platforms)


@dataclass(eq=False)
class Job:
    """One preheat, as ``GET /p2p/v1/preheat/<id>`` shows it."""

    id: int
    registry: str
    repository: str
    reference: str
    platforms: list[str]
    state: str = "queued"
    """``queued``, ``resolving``, ``fetching``, ``done`` or ``failed``."""
    blobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    done_event: trio.Event = field(default_factory=trio.Event)

    def view(self) -> dict[str, Any]:
        total = sum(b["size"] for b in self.blobs.values())
        ready = sum(b["size"] for b in self.blobs.values() if b["state"] in ("cached", "fetched"))
        return {
            "id": self.id,
            "registry": self.registry,
            "image": f"{self.repository}{'@' if ':' in self.reference else ':'}{self.reference}",
            "platforms": self.platforms,
            "state": self.state,
            "blobs": [{"digest": d, **b} for d, b in self.blobs.items()],
            "bytes": total,
            "ready_bytes": ready,
            "percent": round(100.0 * ready / total, 1) if total else 0.0,
            "error": self.error,
            "created_at": round(self.created_at, 3),
            "finished_at": None if self.finished_at is None else round(self.finished_at, 3),
        }


GetManifest = Callable[[str, str, Credentials | None], Awaitable[tuple[str, bytes]]]
"""(repository, reference, credentials) -> (media type, body): the origin's manifest."""
EnsureBlob = Callable[[str, str, int, Credentials | None], Awaitable[bool]]
"""(repository, digest, size, credentials) -> whether it had to be fetched: into the cache,
and seeded."""


class Preheater:
    """Runs preheat jobs in the service's nursery (see the module docstring)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.jobs: OrderedDict[int, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._running = trio.Semaphore(MAX_RUNNING)

    def start(
        self,
        *,
        registry: str,
        repository: str,
        reference: str,
        platforms: list[str],
        credentials: Credentials | None,
        get_manifest: GetManifest,
        ensure_blob: EnsureBlob,
    ) -> Job:
        while len(self.jobs) >= MAX_JOBS:
            finished = next((j for j in self.jobs.values() if j.done_event.is_set()), None)
            if finished is None:
                raise OCIError(
                    ErrorCode.TOOMANYREQUESTS,
                    f"{MAX_JOBS} preheat jobs are queued or running; ask again later",
                    status=429,
                    headers={"Retry-After": "30"},
                )
            del self.jobs[finished.id]
        job = Job(next(self._ids), registry, repository, reference, platforms)
        self.jobs[job.id] = job
        self._nursery.start_soon(self._run, job, credentials, get_manifest, ensure_blob)
        return job

    async def _run(
        self,
        job: Job,
        credentials: Credentials | None,
        get_manifest: GetManifest,
        ensure_blob: EnsureBlob,
    ) -> None:
        try:
            async with self._running:
                job.state = "resolving"
                for digest, size in await self._resolve(job, credentials, get_manifest):
                    job.blobs.setdefault(digest, {"size": size, "state": "waiting"})
                job.state = "fetching"
                limiter = trio.CapacityLimiter(BLOBS_AT_ONCE)
                async with trio.open_nursery() as nursery:
                    for digest in list(job.blobs):
                        nursery.start_soon(
                            self._blob, job, digest, credentials, ensure_blob, limiter
                        )
                job.state = "done"
        except OCIError as exc:
            job.state, job.error = "failed", exc.message
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            job.state, job.error = "failed", getattr(first, "message", str(first))
            if not group.subgroup(OCIError):
                raise
        finally:
            job.finished_at = time.time()
            job.done_event.set()
            event(
                log,
                "proxy.preheat",
                logging.WARNING if job.state == "failed" else logging.INFO,
                registry=job.registry,
                repository=job.repository,
                reference=job.reference,
                state=job.state,
                blobs=len(job.blobs),
                error=job.error,
            )

    async def _resolve(
        self, job: Job, credentials: Credentials | None, get_manifest: GetManifest
    ) -> list[tuple[str, int]]:
        media_type, body = await get_manifest(job.repository, job.reference, credentials)
        if media_type in INDEX_MEDIA_TYPES:
            children = manifest_children(body, job.platforms)
            if not children:
                raise OCIError(
                    ErrorCode.MANIFEST_UNKNOWN,
                    f"no manifest for {', '.join(job.platforms)} in the image's index",
                    status=404,
                )
            blobs: list[tuple[str, int]] = []
            for child in children:
                child_type, child_body = await get_manifest(job.repository, child, credentials)
                if child_type not in MANIFEST_MEDIA_TYPES:
                    raise invalid_document(f"the index names a {child_type or 'typeless'} document")
                blobs.extend(image_blobs(child_body))
            return blobs
        if media_type in MANIFEST_MEDIA_TYPES:
            return image_blobs(body)
        raise invalid_document(f"the origin answered a {media_type or 'typeless'} document")

    @staticmethod
    async def _blob(
        job: Job,
        digest: str,
        credentials: Credentials | None,
        ensure_blob: EnsureBlob,
        limiter: trio.CapacityLimiter,
    ) -> None:
        entry = job.blobs[digest]
        async with limiter:
            entry["state"] = "fetching"
            fetched = await ensure_blob(job.repository, digest, entry["size"], credentials)
            entry["state"] = "fetched" if fetched else "cached"


def media_type_of(content_type: str, body: bytes) -> str:
    """The manifest's media type: its Content-Type, else its own ``mediaType`` field."""
    media_type = base_media_type(content_type) if content_type else ""
    if media_type in INDEX_MEDIA_TYPES | MANIFEST_MEDIA_TYPES:
        return media_type
    try:
        doc = json.loads(body)
    except ValueError:
        return media_type
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(declared, str):
        return declared
    if isinstance(doc, dict) and "manifests" in doc:
        return OCI_INDEX  # an OCI index may leave out its mediaType
    return media_type


ACCEPT = DEFAULT_MANIFEST_ACCEPT
