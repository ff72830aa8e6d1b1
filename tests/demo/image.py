"""The demo image: several uncompressed tar layers of deterministic pseudo-random bytes.

:func:`build_image` streams every layer straight to an OCI image layout on disk (``oci-layout``,
``index.json``, ``blobs/sha256/<hex>``) and hashes it on the way, so a 300 MB image costs no more
than 300 MB of disk and a few MB of memory. The content is a pure function of the seed and the
sizes (``random.Random(seed)``), so two builds give the same digests; generating it runs at about
400 MB/s. Layers are uncompressed tars, which is why ``skopeo copy --preserve-digests`` keeps the
digests (without it skopeo would gzip them).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_MANIFEST",
    "BlobFile",
    "DemoImage",
    "build_image",
    "layer_sizes",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

CHUNK = 4 * 1024 * 1024
"""Bytes generated, hashed and written at a time."""
LAYER_WEIGHTS = (0.36, 0.26, 0.18, 0.12, 0.08)
"""How the default five layers share the image size (biggest first, like a base image)."""
_BLOCK = 512


@dataclass(frozen=True)
class BlobFile:
    """One blob of the image, stored in the layout at :attr:`path`."""

    media_type: str
    digest: str
    size: int
    path: Path

    def descriptor(self) -> dict[str, Any]:
        """The OCI descriptor that references this blob."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class DemoImage:
    """A built image: one OCI manifest, its config and its layers, in an OCI layout."""

    repository: str
    tag: str
    layout: Path
    manifest: bytes
    config: BlobFile
    layers: tuple[BlobFile, ...]

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    @property
    def manifest_media_type(self) -> str:
        return OCI_MANIFEST

    @property
    def reference(self) -> str:
        """``repository:tag``."""
        return f"{self.repository}:{self.tag}"

    def blobs(self) -> dict[str, BlobFile]:
        """The config and every layer, by digest (what ``/v2/<name>/blobs/`` serves)."""
        return {blob.digest: blob for blob in (self.config, *self.layers)}

    @property
    def blob_bytes(self) -> int:
        """Bytes of the config and all layers: what a pull transfers besides the manifest."""
        return sum(blob.size for blob in self.blobs().values())


def layer_sizes(total: int, count: int = len(LAYER_WEIGHTS)) -> list[int]:
    """Payload sizes of ``count`` layers that add up to ``total`` bytes, biggest first.

    Five layers share it by :data:`LAYER_WEIGHTS`; any other count shares it by falling weights
    ``count, count - 1, ..., 1``. Every layer gets at least one byte.
    """
    if count < 1:
        raise ValueError("an image needs at least one layer")
    if total < count:
        raise ValueError(f"{total} bytes cannot fill {count} layers")
    weights = LAYER_WEIGHTS if count == len(LAYER_WEIGHTS) else tuple(range(count, 0, -1))
    scale = sum(weights)
    sizes = [max(1, int(total * w / scale)) for w in weights]
    sizes[0] += total - sum(sizes)
    return sizes


class _HashingWriter:
    """Writes to a file and hashes what it wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.file.write(data)
        self.size += len(data)

    def close(self) -> None:
        self.file.close()


def _publish(writer: _HashingWriter, blobs: Path, media_type: str) -> BlobFile:
    """Rename a finished temporary blob file to its digest."""
    writer.close()
    hex_digest = writer.sha256.hexdigest()
    path = blobs / hex_digest
    os.replace(writer.path, path)
    return BlobFile(media_type, "sha256:" + hex_digest, writer.size, path)


def _write_layer(blobs: Path, seed: str, number: int, size: int) -> BlobFile:
    """A tar holding one file of ``size`` pseudo-random bytes, streamed to ``blobs``."""
    info = tarfile.TarInfo(f"opt/demo/layer-{number}.bin")
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    writer = _HashingWriter(blobs / f".layer-{number}.tmp")
    try:
        writer.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        rng = random.Random(f"{seed}/layer/{number}")
        remaining = size
        while remaining:
            chunk = min(CHUNK, remaining)
            writer.write(rng.randbytes(chunk))
            remaining -= chunk
        # Pad the member to a whole block, then the two zero blocks that end an archive.
        writer.write(b"\0" * (-size % _BLOCK) + b"\0" * (2 * _BLOCK))
    except BaseException:
        writer.close()
        writer.path.unlink(missing_ok=True)
        raise
    return _publish(writer, blobs, OCI_LAYER)


def _write_json_blob(blobs: Path, media_type: str, doc: dict[str, Any]) -> BlobFile:
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blobs / digest.removeprefix("sha256:")
    path.write_bytes(data)
    return BlobFile(media_type, digest, len(data), path)


def build_image(
    layout: Path,
    *,
    size: int,
    layers: int = len(LAYER_WEIGHTS),
    seed: str = "p2p-demo",
    repository: str = "demo/app",
    tag: str = "1.0",
) -> DemoImage:
    """Build the demo image (``size`` payload bytes over ``layers`` layers) into ``layout``.

    ``layout`` becomes an OCI image layout whose ``index.json`` names the manifest with the
    annotation ``org.opencontainers.image.ref.name: <tag>`` (what ``oci:LAYOUT:TAG`` finds).
    Blocking: run it in a worker thread from async code.
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    built = tuple(
        _write_layer(blobs, seed, number, payload)
        for number, payload in enumerate(layer_sizes(size, layers), start=1)
    )
    config = _write_json_blob(
        blobs,
        OCI_CONFIG,
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Cmd": ["/bin/true"],
                "Labels": {"org.opencontainers.image.title": "p2p demo image", "p2p.demo": seed},
            },
            # Uncompressed layers: each diff_id is the layer's own digest.
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in built]},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": f"p2p demo layer {n}"}
                for n in range(1, len(built) + 1)
            ],
        },
    )
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in built],
    }
    manifest = _write_json_blob(blobs, OCI_MANIFEST, manifest_doc)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**manifest.descriptor(), "annotations": {"org.opencontainers.image.ref.name": tag}}
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return DemoImage(repository, tag, layout, manifest.path.read_bytes(), config, built)
