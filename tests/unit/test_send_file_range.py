"""``asgi.send_file_range``: a file range as ASGI body messages, a bounded chunk at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from p2p_common import asgi
from p2p_common.asgi import Message, send_file_range
from p2p_common.storage import StorageError

CHUNK = 1000


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asgi, "FILE_CHUNK", CHUNK)


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    content = os.urandom(10 * CHUNK + 123)
    path = tmp_path / "blob"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, content
    finally:
        os.close(fd)


@pytest.mark.parametrize(("offset", "length"), [(0, 10 * CHUNK + 123), (17, 3 * CHUNK), (5, 1)])
async def test_the_range_goes_out_in_order_with_more_body_until_the_last_chunk(
    small_chunks: None, blob: tuple[int, bytes], offset: int, length: int
) -> None:
    fd, content = blob
    messages: list[Message] = []
    counted: list[int] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await send_file_range(send, fd, offset, length, sent=counted.append)
    assert b"".join(m["body"] for m in messages) == content[offset : offset + length]
    assert [m["more_body"] for m in messages] == [True] * (len(messages) - 1) + [False]
    assert all(len(m["body"]) <= CHUNK for m in messages)
    assert counted == [len(m["body"]) for m in messages]


async def test_an_empty_range_is_one_final_empty_body(blob: tuple[int, bytes]) -> None:
    fd, _ = blob
    messages: list[Message] = []

    async def send(message: Message) -> None:
        messages.append(message)

    await send_file_range(send, fd, 0, 0)
    assert messages == [{"type": "http.response.body", "body": b"", "more_body": False}]


async def test_a_file_shorter_than_the_range_raises_a_storage_error(
    small_chunks: None, blob: tuple[int, bytes]
) -> None:
    fd, content = blob
    sent: list[bytes] = []

    async def send(message: Message) -> None:
        sent.append(message["body"])

    with pytest.raises(StorageError, match="short read"):
        await send_file_range(send, fd, 0, len(content) + CHUNK)
    assert b"".join(sent) == content[: len(sent) * CHUNK]


async def test_a_failing_send_raises_its_own_error(
    small_chunks: None, blob: tuple[int, bytes]
) -> None:
    fd, _ = blob

    async def send(message: Message) -> None:
        raise trio.BrokenResourceError("client gone")

    with pytest.raises(trio.BrokenResourceError, match="client gone"):
        await send_file_range(send, fd, 0, 5 * CHUNK)
