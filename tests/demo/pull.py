"""A small OCI pull client: what containerd does against an agent's ``localhost:5004``.

:func:`pull` asks for the manifest by tag (with the ``Accept`` types a container runtime sends),
checks it against ``Docker-Content-Digest``, then fetches the config and every layer by digest, a
few at a time, streaming each to a file named by its digest. Every blob's size and sha256 are
checked against its descriptor as it is written; hashing and writing run in worker threads
(hashlib releases the GIL), so the event loop keeps receiving. :func:`verify_files` re-reads the
files afterwards and compares them with the image that was pushed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import trio

__all__ = [
    "MANIFEST_ACCEPT",
    "PullError",
    "PullResult",
    "PulledBlob",
    "hash_file",
    "pull",
    "verify_files",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST])
"""What containerd sends when it resolves a tag (in one line)."""

MAX_MANIFEST = 4 * 1024 * 1024
FLUSH_BYTES = 4 * 1024 * 1024
"""Received bytes are hashed and written in batches of this size, in a worker thread."""
MAX_ERROR_BODY = 300


class PullError(RuntimeError):
    """A pull went wrong; the message says which request and what came back."""


@dataclass(frozen=True)
class PulledBlob:
    digest: str
    size: int
    path: Path
    first_byte: float = 0.0
    """``time.monotonic()`` when the first body byte arrived (the end, for an empty blob)."""


@dataclass(frozen=True)
class PullResult:
    """One image pulled through one registry endpoint."""

    manifest: bytes
    manifest_digest: str
    blobs: tuple[PulledBlob, ...]
    started: float
    finished: float
    """``time.monotonic()`` at start and end."""

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def blob_bytes(self) -> int:
        return sum(blob.size for blob in self.blobs)


def _describe(response: httpx.Response, body: bytes) -> str:
    text = body[:MAX_ERROR_BODY].decode("utf-8", "replace").strip().replace("\n", " ")
    return f"{response.request.method} {response.request.url} answered {response.status_code}" + (
        f": {text}" if text else ""
    )


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptors(manifest: bytes, content_type: str) -> list[dict[str, Any]]:
    """The config and layer descriptors of an image manifest (refuses an index)."""
    try:
        doc = json.loads(manifest)
    except ValueError as exc:
        raise PullError(f"the manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PullError("the manifest is not a JSON object")
    media_type = doc.get("mediaType") or content_type
    if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
        raise PullError("the tag names an index; the demo pulls single-platform images")
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise PullError("the manifest has no config or no layers")
    found = [config, *layers]
    for descriptor in found:
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not (isinstance(digest, str) and digest.startswith("sha256:")) or not isinstance(
            size, int
        ):
            raise PullError(f"bad descriptor in the manifest: {descriptor!r}")
    return found


def _open_for_writing(path: Path) -> BinaryIO:
    return open(path, "wb")


def _write(hasher: Any, file: BinaryIO, data: bytearray) -> None:
    hasher.update(data)
    file.write(data)


async def _fetch_blob(
    client: httpx.AsyncClient,
    url: str,
    digest: str,
    size: int,
    path: Path,
    on_bytes: Callable[[int], None],
) -> PulledBlob:
    try:
        return await _fetch_blob_or_raise(client, url, digest, size, path, on_bytes)
    except httpx.HTTPError as exc:
        raise PullError(f"GET {url}: {exc or type(exc).__name__}") from exc


async def _fetch_blob_or_raise(
    client: httpx.AsyncClient,
    url: str,
    digest: str,
    size: int,
    path: Path,
    on_bytes: Callable[[int], None],
) -> PulledBlob:
    hasher = hashlib.sha256()
    received = 0
    first_byte = 0.0
    async with client.stream("GET", url) as response:
        if response.status_code != 200:
            body = b""
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_ERROR_BODY:
                    break
            raise PullError(_describe(response, body))
        file = await trio.to_thread.run_sync(_open_for_writing, path)
        try:
            buffer = bytearray()
            async for chunk in response.aiter_raw():
                if not received and chunk:
                    first_byte = time.monotonic()
                received += len(chunk)
                if received > size:
                    raise PullError(f"GET {url}: more than the {size} bytes of the descriptor")
                buffer += chunk
                on_bytes(len(chunk))
                if len(buffer) >= FLUSH_BYTES:
                    full, buffer = buffer, bytearray()
                    await trio.to_thread.run_sync(_write, hasher, file, full)
            if buffer:
                await trio.to_thread.run_sync(_write, hasher, file, buffer)
        finally:
            file.close()
    if received != size:
        raise PullError(f"GET {url}: {received} bytes, the descriptor says {size}")
    got = "sha256:" + hasher.hexdigest()
    if got != digest:
        raise PullError(f"GET {url}: the bytes hash to {got}")
    return PulledBlob(digest, size, path, first_byte or time.monotonic())


async def pull(
    client: httpx.AsyncClient,
    base_url: str,
    repository: str,
    tag: str,
    out: Path,
    *,
    on_total: Callable[[int], None] = lambda total: None,
    on_bytes: Callable[[int], None] = lambda count: None,
    concurrency: int = 3,
) -> PullResult:
    """Pull ``repository:tag`` from the registry at ``base_url`` into ``out``.

    ``on_total`` gets the image's blob bytes once the manifest is known; ``on_bytes`` every
    received chunk's size. ``concurrency`` blobs are fetched at once (containerd's default is 3).
    Raises :class:`PullError` (HTTP failures included) naming the request that failed.
    """
    started = time.monotonic()
    await trio.Path(out).mkdir(parents=True, exist_ok=True)
    url = f"{base_url}/v2/{repository}/manifests/{tag}"
    try:
        response = await client.get(url, headers={"accept": MANIFEST_ACCEPT})
    except httpx.HTTPError as exc:
        raise PullError(f"GET {url}: {exc or type(exc).__name__}") from exc
    if response.status_code != 200:
        raise PullError(_describe(response, response.content))
    manifest = response.content
    if len(manifest) > MAX_MANIFEST:
        raise PullError(f"GET {url}: a manifest of {len(manifest)} bytes")
    manifest_digest = _sha256(manifest)
    announced = response.headers.get("docker-content-digest")
    if announced is not None and announced != manifest_digest:
        raise PullError(f"GET {url}: Docker-Content-Digest {announced}, body {manifest_digest}")
    await trio.Path(out / "manifest.json").write_bytes(manifest)
    descriptors = _descriptors(manifest, response.headers.get("content-type", ""))
    on_total(sum(int(d["size"]) for d in descriptors))

    pulled: dict[str, PulledBlob] = {}
    limiter = trio.CapacityLimiter(concurrency)

    async def fetch(descriptor: dict[str, Any]) -> None:
        digest, size = str(descriptor["digest"]), int(descriptor["size"])
        async with limiter:
            pulled[digest] = await _fetch_blob(
                client,
                f"{base_url}/v2/{repository}/blobs/{digest}",
                digest,
                size,
                out / digest.removeprefix("sha256:"),
                on_bytes,
            )

    try:
        async with trio.open_nursery() as nursery:
            for descriptor in descriptors:
                if descriptor["digest"] not in pulled:
                    nursery.start_soon(fetch, descriptor)
    except ExceptionGroup as group:
        failures, others = group.split(PullError)
        if failures is None or others is not None:
            raise
        raise _first(failures) from group  # the first failed blob speaks for the pull
    blobs = tuple(pulled[str(d["digest"])] for d in descriptors)
    return PullResult(manifest, manifest_digest, blobs, started, time.monotonic())


def _first(group: BaseExceptionGroup[PullError]) -> PullError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, PullError)
    return leaf


def hash_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    """``sha256:<hex>`` of a file's bytes (blocking)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while data := file.read(chunk):
            hasher.update(data)
    return "sha256:" + hasher.hexdigest()


async def verify_files(
    result: PullResult,
    manifest: bytes,
    expected: dict[str, int],
    *,
    limiter: trio.CapacityLimiter | None = None,
) -> list[str]:
    """Problems found comparing a pull with the pushed image (empty: byte-identical).

    ``expected`` maps every blob digest of the image to its size. The manifest must be the
    pushed bytes, the set of blobs the image's, and every file must hash to its digest.
    """
    problems: list[str] = []
    if result.manifest != manifest:
        problems.append(f"manifest {result.manifest_digest} differs from the pushed one")
    got = {blob.digest for blob in result.blobs}
    problems += [f"blob {d} not pulled" for d in sorted(set(expected) - got)]
    problems += [f"blob {d} is not in the image" for d in sorted(got - set(expected))]

    def check_one(blob: PulledBlob) -> str | None:
        size = blob.path.stat().st_size
        if size != expected.get(blob.digest, size):
            return f"{blob.path}: {size} bytes, expected {expected[blob.digest]}"
        digest = hash_file(blob.path)
        if digest != blob.digest:
            return f"{blob.path}: hashes to {digest}, not {blob.digest}"
        return None

    async def check(blob: PulledBlob) -> None:
        problem = await trio.to_thread.run_sync(check_one, blob, limiter=limiter)
        if problem is not None:
            problems.append(problem)

    async with trio.open_nursery() as nursery:
        for blob in result.blobs:
            nursery.start_soon(check, blob)
    return problems
