"""Helpers shared by the benchmarks."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.realparts import images


def default_workdir() -> str | None:
    """tmpfs when there is one: this machine kind's disk throttles gigabyte writes so much that
    disk-backed rounds vary fivefold (docs/benchmarks.md); the benchmarks measure software."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def warm_memory(workdir: Path, size: int) -> None:
    """Write and delete ``size`` bytes in ``workdir`` first. On this machine kind the first write
    to memory the VM never touched costs several times a recycled page (1 GiB into tmpfs: 3.3 s
    cold, 0.45 s warm); without this a benchmark's first rounds measure the hypervisor."""
    scratch = workdir / f"warm-{os.getpid()}"
    block = bytes(64 << 20)
    try:
        with scratch.open("wb") as handle:
            for _ in range(max(1, size // len(block))):
                handle.write(block)
    finally:
        scratch.unlink(missing_ok=True)


@dataclass(frozen=True)
class RandomImage:
    """An image of random layers: the manifest's digest and every blob's size by digest."""

    manifest_digest: str
    blobs: dict[str, int]
    """Config and layers: size by digest."""
    layers: tuple[str, ...] = ()
    """The layers' digests, in manifest order."""

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


def random_image_layout(directory: Path, total: int, layers: int, tag: str) -> RandomImage:
    """An OCI image layout of ``layers`` layers of random bytes, ``total`` bytes together, tagged
    ``tag``, streamed to disk in chunks (the test image builder keeps layers in memory)."""
    blobs_dir = directory / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True)
    sizes = [total // layers] * layers
    sizes[-1] += total - sum(sizes)
    descriptors: list[dict[str, Any]] = []
    for size in sizes:
        scratch = directory / "layer"
        digest = hashlib.sha256()
        with scratch.open("wb") as handle:
            remaining = size
            while remaining:
                chunk = os.urandom(min(remaining, 16 << 20))
                digest.update(chunk)
                handle.write(chunk)
                remaining -= len(chunk)
        scratch.rename(blobs_dir / digest.hexdigest())
        descriptors.append(
            {"mediaType": images.OCI_LAYER, "digest": "sha256:" + digest.hexdigest(), "size": size}
        )

    def add(doc: dict[str, Any]) -> tuple[str, int]:
        data = json.dumps(doc, sort_keys=True).encode()
        name = hashlib.sha256(data).hexdigest()
        (blobs_dir / name).write_bytes(data)
        return "sha256:" + name, len(data)

    config, config_size = add(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
        }
    )
    manifest, manifest_size = add(
        {
            "schemaVersion": 2,
            "mediaType": images.OCI_MANIFEST,
            "config": {"mediaType": images.OCI_CONFIG, "digest": config, "size": config_size},
            "layers": descriptors,
        }
    )
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": images.OCI_MANIFEST,
                        "digest": manifest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                    }
                ],
            }
        )
    )
    blobs = {config: config_size, **{str(d["digest"]): int(d["size"]) for d in descriptors}}
    return RandomImage(manifest, blobs, tuple(str(d["digest"]) for d in descriptors))
