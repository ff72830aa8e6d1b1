"""Rendezvous (highest-random-weight) hashing.

Every agent ranks the same candidates for the same key in the same order without
talking to anyone, and when a candidate disappears only the keys it ranked first
move. Used to pick the proxy that fetches a blob from the origin (key: digest)
and the tracker that holds a swarm (key: infohash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(key: bytes, candidate: str) -> int:
    digest = hashlib.blake2b(key + b"\x00" + candidate.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: bytes, candidates: Iterable[str]) -> list[str]:
    """Candidates ordered from most to least preferred for ``key`` (duplicates removed)."""
    return sorted(set(candidates), key=lambda c: (weight(key, c), c), reverse=True)
