"""Walking an image's manifests: which manifests of an index, which blobs of a manifest (pure).

The proxy's preheat and the agent's prefetch both resolve an image this way. A document that
is not what the distribution spec says raises :class:`~p2p_common.oci.OCIError`
``MANIFEST_INVALID`` (502: the origin sent it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from p2p_common.oci import ErrorCode, OCIError, is_valid_digest

__all__ = ["image_blobs", "invalid_document", "manifest_children"]


def invalid_document(message: str) -> OCIError:
    return OCIError(ErrorCode.MANIFEST_INVALID, message, status=502)


def _document(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise invalid_document("the origin's manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise invalid_document("the origin's manifest is not a JSON object")
    return doc


def _descriptor(entry: object, what: str) -> tuple[str, int]:
    if not isinstance(entry, dict):
        raise invalid_document(f"a {what} descriptor is not an object")
    digest, size = entry.get("digest"), entry.get("size")
    if not isinstance(digest, str) or not is_valid_digest(digest):
        raise invalid_document(f"a {what} descriptor has no valid digest")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise invalid_document(f"a {what} descriptor has no valid size")
    return digest, size


def manifest_children(body: bytes, platforms: Sequence[str]) -> list[str]:
    """The digests of an index's manifests for ``platforms`` (``os/arch[/variant]``; all of
    them when empty)."""
    doc = _document(body)
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise invalid_document("the origin's index has no manifests list")
    wanted = set(platforms)
    found = []
    for entry in entries:
        digest, _ = _descriptor(entry, "manifest")
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if wanted:
            if not isinstance(platform, dict):
                continue
            name = f"{platform.get('os')}/{platform.get('architecture')}"
            variant = platform.get("variant")
            if name not in wanted and f"{name}/{variant}" not in wanted:
                continue
        found.append(digest)
    return found


def image_blobs(body: bytes) -> list[tuple[str, int]]:
    """(digest, size) of an image manifest's config and layers, in that order."""
    doc = _document(body)
    config, layers = doc.get("config"), doc.get("layers")
    if not isinstance(layers, list):
        raise invalid_document("the origin's manifest has no layers list")
    return [_descriptor(config, "config"), *(_descriptor(layer, "layer") for layer in layers)]
