"""The rollout benchmark's test image: random layers written straight into an OCI layout."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.realparts import images

REPOSITORY, TAG = "bench/rollout", "1.0"


@dataclass(frozen=True)
class TestImage:
    """What was pushed: the manifest's digest and every blob's size by digest."""

    manifest_digest: str
    blobs: dict[str, int]

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


def build_layout(directory: Path, total: int, layers: int) -> TestImage:
    """An OCI image layout of ``layers`` layers of random bytes, ``total`` bytes together,
    streamed to disk in chunks (the test image builder keeps layers in memory)."""
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
                        "annotations": {"org.opencontainers.image.ref.name": TAG},
                    }
                ],
            }
        )
    )
    blobs = {config: config_size, **{str(d["digest"]): int(d["size"]) for d in descriptors}}
    return TestImage(manifest, blobs)
