"""The rollout benchmark's test image: random layers written straight into an OCI layout."""

from __future__ import annotations

from pathlib import Path

from tests.bench.common import RandomImage, random_image_layout

REPOSITORY, TAG = "bench/rollout", "1.0"


def build_layout(directory: Path, total: int, layers: int) -> RandomImage:
    """The image every node pulls: ``layers`` random layers, ``total`` bytes, tagged :data:`TAG`."""
    return random_image_layout(directory, total, layers, TAG)
