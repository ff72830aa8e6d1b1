"""Shared helpers for tests that run the peer engine."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from p2p_common import metainfo as mi
from p2p_common.engine import Engine


def make_content(size: int, seed: int = 1) -> bytes:
    """Deterministic pseudo-random bytes (fast enough for tens of MB)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 2048  # 64 KiB pattern
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(block[:64] + counter.to_bytes(8, "big")).digest() * 1024
        counter += 1
    return bytes(out[:size])


def metainfo_for(
    content: bytes, trackers: list[str] | None = None, *, piece_length: int | None = None
) -> mi.Metainfo:
    piece_length = piece_length or mi.piece_length_for(len(content))
    hasher = mi.PieceHasher(piece_length)
    hasher.update(content)
    pieces, digest = hasher.finish()
    return mi.build(digest, len(content), pieces, trackers or [], piece_length=piece_length)


def write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@asynccontextmanager
async def running_engines(count: int, **kwargs: object) -> AsyncIterator[list[Engine]]:
    """``count`` engines listening on 127.0.0.1, cancelled on exit."""
    kwargs.setdefault("host", "127.0.0.1")
    async with trio.open_nursery() as nursery:
        engines = []
        for _ in range(count):
            engine = Engine(**kwargs)  # type: ignore[arg-type]
            await nursery.start(engine.serve)
            engines.append(engine)
        yield engines
        nursery.cancel_scope.cancel()


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


async def wait_until(predicate: Callable[[], bool], *, poll: float = 0.02) -> None:
    """Poll ``predicate`` until it holds (callers bound the time with ``trio.fail_after``)."""
    while not predicate():  # noqa: ASYNC110 - polling state owned by other tasks
        await trio.sleep(poll)
