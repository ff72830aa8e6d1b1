"""A blob arriving over HTTP (p2p_common.ingest): a broken sender is resumed from the byte on
disk, and the blob's hash and its followers see every byte exactly once."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p_common.engine.disk import DiskRunner
from p2p_common.ingest import Ingest, IngestError

KiB = 1024


async def pieces(data: bytes, size: int, *, fail_after: int | None = None) -> AsyncIterator[bytes]:
    """``data`` in ``size``-byte chunks; raises once ``fail_after`` bytes went out."""
    sent = 0
    for start in range(0, len(data), size):
        if fail_after is not None and sent >= fail_after:
            raise ConnectionResetError("the sender died")
        chunk = data[start : start + size]
        sent += len(chunk)
        yield chunk


def ingest_into(path: Path, length: int) -> Ingest:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    return Ingest(fd, length, disk=DiskRunner())


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    length=st.integers(1, 3000 * KiB),
    chunk=st.integers(1 * KiB, 300 * KiB),
    breaks=st.lists(st.floats(0, 1), max_size=3),
)
def test_a_broken_sender_is_resumed_from_the_bytes_on_disk(
    tmp_path: Path, length: int, chunk: int, breaks: list[float]
) -> None:
    data = os.urandom(length)

    async def main() -> None:
        path = tmp_path / "blob"
        ingest = ingest_into(path, length)
        followed = bytearray()

        async def follow() -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                async for part in ingest.follow(fd):
                    followed.extend(part)
            finally:
                os.close(fd)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            found = None
            for fraction in [*breaks, None]:
                start = ingest.written
                fail = None if fraction is None else int(fraction * (length - start))
                try:
                    found = await ingest.run(pieces(data[start:], chunk, fail_after=fail))
                    break
                except ConnectionResetError:
                    assert ingest.written <= length
            assert found == "sha256:" + hashlib.sha256(data).hexdigest()
            ingest.end(verified=True)
        os.close(ingest.fd)
        assert path.read_bytes() == data
        assert bytes(followed) == data

    trio.run(main)


async def test_a_sender_that_stops_short_or_sends_too_much_is_an_error(tmp_path: Path) -> None:
    data = os.urandom(100 * KiB)
    ingest = ingest_into(tmp_path / "short", len(data))
    with pytest.raises(IngestError, match="stopped after"):
        await ingest.run(pieces(data[: 60 * KiB], 16 * KiB))
    # the rest, from what is on disk, completes it
    rest = await ingest.run(pieces(data[ingest.written :], 16 * KiB))
    assert rest == "sha256:" + hashlib.sha256(data).hexdigest()
    os.close(ingest.fd)
    ingest = ingest_into(tmp_path / "long", len(data))
    with pytest.raises(IngestError, match="more than"):
        await ingest.run(pieces(data + b"x", 16 * KiB))
    os.close(ingest.fd)
