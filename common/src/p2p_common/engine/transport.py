"""Byte transport under one peer connection: the hot path of the engine.

:class:`SocketTransport` works on a TCP socket: it receives straight into the wire
protocol's buffer (``recv_into``), sends block payloads with ``os.sendfile`` (zero
copy from the page cache) after a header sent with ``MSG_MORE`` so both leave in
the same segments. :class:`StreamTransport` works on any trio stream (in-memory
streams in tests) with plain copies. Both raise :class:`PeerGoneError` when the
other side goes away.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Protocol

import trio

from p2p_common.errors import RemoteError
from p2p_common.logs import event
from p2p_common.storage import PieceStore

log = logging.getLogger("p2p.engine")


class PeerGoneError(RemoteError):
    """The connection broke or was closed by the peer."""


LOWAT_MAX = 128 * 1024
"""Largest ``SO_RCVLOWAT`` we ask for (the kernel grows the receive buffer to twice it)."""


class Transport(Protocol):
    async def recv_into(self, buffer: memoryview, want: int = 1) -> int:
        """Receive into ``buffer``; 0 means the peer closed the connection. ``want`` is how
        many bytes the caller needs before it can do anything with them (the rest of the
        message it is in): a transport may wait until that many have arrived."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    def send_now(self, data: bytes) -> int:
        """Send what the socket takes without waiting; how many bytes it took (0 also when
        it cannot say: the caller sends the rest the usual way, which reports any error)."""

    async def send_block(self, header: bytes, store: PieceStore, offset: int, length: int) -> None:
        """Send ``header`` followed by ``length`` bytes of ``store`` at ``offset``."""

    async def aclose(self) -> None: ...


class SocketTransport:
    """A TCP connection. Receiving honours ``want`` with ``SO_RCVLOWAT``: the kernel wakes us
    once the rest of a block has arrived instead of for every few segments, which on a slow
    link is the difference between one wake-up per block and dozens (docs/benchmarks.md)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket
        self._fd = self.sock.fileno()
        self._lowat = 1

    async def recv_into(self, buffer: memoryview, want: int = 1) -> int:
        lowat = max(1, min(want, LOWAT_MAX, len(buffer)))
        try:
            if lowat != self._lowat:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                self._lowat = lowat
            if lowat > 1:
                await trio.lowlevel.wait_readable(self.sock)
            return await self.sock.recv_into(buffer)
        except OSError as exc:
            raise PeerGoneError(f"receive failed: {exc.strerror or exc}") from None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise PeerGoneError(f"send failed: {exc}") from None

    def send_now(self, data: bytes) -> int:
        try:
            return os.write(self._fd, data)
        except OSError:  # full (BlockingIOError), or broken: send_all says which
            return 0

    async def send_block(self, header: bytes, store: PieceStore, offset: int, length: int) -> None:
        fd = store.fileno()
        if fd is None:
            await self.send_all(header + store.read(offset, length))
            return
        try:
            view = memoryview(header)
            while view:
                sent = await self.sock.send(view, socket.MSG_MORE)
                view = view[sent:]
            while length:
                try:
                    sent = os.sendfile(self._fd, fd, offset, length)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                if sent == 0:
                    # Our file ends before a piece we offer: a local fault, not the peer's,
                    # and every peer that asks for the piece would meet it.
                    event(log, "upload.short_file", logging.WARNING, offset=offset, length=length)
                    raise PeerGoneError("sendfile made no progress (file truncated?)")
                offset += sent
                length -= sent
        except OSError as exc:
            # Whatever went wrong (the peer left, ETIMEDOUT, or EIO reading the file), it ends
            # this connection only; a store that really fails shows on its next write or read.
            raise PeerGoneError(f"send failed: {exc.strerror or exc}") from None

    async def aclose(self) -> None:
        await self.stream.aclose()


class StreamTransport:
    """Any trio stream: copies, no sendfile (for in-memory streams in tests)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def recv_into(self, buffer: memoryview, want: int = 1) -> int:
        try:
            data = await self.stream.receive_some(len(buffer))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGoneError(f"receive failed: {exc}") from None
        buffer[: len(data)] = data
        return len(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGoneError(f"send failed: {exc}") from None

    def send_now(self, data: bytes) -> int:
        return 0  # a trio stream has no synchronous send

    async def send_block(self, header: bytes, store: PieceStore, offset: int, length: int) -> None:
        await self.send_all(header + store.read(offset, length))

    async def aclose(self) -> None:
        await self.stream.aclose()


def make_transport(stream: trio.abc.Stream) -> Transport:
    if isinstance(stream, trio.SocketStream):
        return SocketTransport(stream)
    return StreamTransport(stream)
