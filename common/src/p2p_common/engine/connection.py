"""One peer connection's I/O: a reader task and a writer task around a pure session.

The reader receives into the wire protocol's buffer (asking the transport to wait for the rest
of a block rather than waking for every segment), feeds each event to the
:class:`~p2p_common.session.PeerSession`, and hands every complete piece to the torrent's
verifier. The writer sends what the session queued (control messages joined into one write)
and uploads the blocks it names (``sendfile`` where possible), each paid for in the
process-wide upload bucket. HAVEs that waited for company leave with the next block, or at
the flusher's call: straight into the socket if the writer is parked (a few bytes, no task
switch), else through the writer. Any :class:`~p2p_common.errors.RemoteError` ends this connection
only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from p2p_common import wire
from p2p_common.engine.flusher import Flusher
from p2p_common.engine.transport import PeerGoneError, Transport
from p2p_common.errors import RemoteError, collapse
from p2p_common.ratelimit import RateLimiter
from p2p_common.session import PeerSession, PieceReady
from p2p_common.storage import PieceStore

RECEIVE_CHUNK = 256 * 1024


class Connection:
    """Runs one established connection until either side ends it."""

    def __init__(
        self,
        session: PeerSession,
        transport: Transport,
        protocol: wire.PeerProtocol,
        *,
        store: PieceStore,
        verify: Callable[[PieceReady], Awaitable[None]],
        download_limiter: RateLimiter,
        upload_limiter: RateLimiter,
        uploaded: Callable[[int], None],
        flusher: Flusher,
    ) -> None:
        self.session = session
        self.transport = transport
        self.protocol = protocol
        self.store = store
        self._verify = verify
        self._download_limiter = download_limiter
        self._upload_limiter = upload_limiter
        self._uploaded = uploaded
        self._wake = trio.Event()
        self._due = False
        self._parked = False
        """The writer waits for :meth:`wake` (it is not inside a send)."""
        self._rest = b""
        """Bytes of a direct send (:meth:`flush`) that the socket did not take: sent first."""
        self._cancel_scope: trio.CancelScope | None = None
        session.notify = self.wake
        session.notify_later = lambda: flusher.later(self.flush)

    def wake(self) -> None:
        self._wake.set()

    def flush(self) -> None:
        """Send what is queued, HAVEs included (the flusher's call)."""
        session = self.session
        if not session.has_output:
            return
        if self._parked and not self._wake.is_set() and not session.wants_write:
            # Only control messages, nothing is being written, and the writer was not woken
            # (it may owe the socket an earlier rest): send them here. A HAVE per stored
            # piece to every peer made the writer's wake-up (task switch, trio's checkpoints)
            # cost more than the send itself, per piece and connection.
            data = session.take_output(trio.current_time())
            sent = self.transport.send_now(data)
            if sent == len(data):
                return
            self._rest = data[sent:]
        self._due = True
        self._wake.set()

    def close(self) -> None:
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def run(self) -> None:
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise collapse(group, dropping=(trio.Cancelled,)) from None

    async def _writer(self) -> None:
        session = self.session
        transport = self.transport
        limiter = self._upload_limiter
        while True:
            if not (session.wants_write or self._due):
                self._wake = trio.Event()
                self._parked = True
                try:
                    await self._wake.wait()
                finally:
                    self._parked = False
            if session.error is not None:
                raise RemoteError(session.error)
            self._due = False
            if self._rest:
                rest, self._rest = self._rest, b""
                await transport.send_all(rest)
            upload = session.next_upload()
            data = session.take_output(trio.current_time())
            if upload is None or (data and limiter.rate):
                # (A limited upload may have to wait: control messages do not wait with it.)
                if data:
                    await transport.send_all(data)
                    data = b""
                if upload is None:
                    continue
            await limiter.acquire(upload.length)
            # Control messages leave in front of the block, in the same segments.
            header = data + upload.header if data else upload.header
            await transport.send_block(header, self.store, upload.offset, upload.length)
            session.block_sent(upload, trio.current_time())
            self._uploaded(upload.length)

    async def _reader(self) -> None:
        protocol = self.protocol
        transport = self.transport
        session = self.session
        limiter = self._download_limiter
        verify = self._verify
        counted = session.downloaded
        while True:
            event = protocol.next_event()
            if event is not None:
                now = trio.current_time()
                while event is not None:
                    ready = session.receive(event, now)
                    if ready is not None:
                        await verify(ready)
                    event = protocol.next_event()
                if session.block_limit != protocol.max_block:
                    protocol.set_max_block(session.block_limit)
                # downloadRate pays for the blocks we asked for, not for what a peer sends
                # unasked (that is bounded by the session and ends the connection).
                if session.downloaded != counted:
                    await limiter.acquire(session.downloaded - counted)
                    counted = session.downloaded
            buffer = protocol.receive_buffer(RECEIVE_CHUNK)
            received = await transport.recv_into(buffer[:RECEIVE_CHUNK], protocol.needed())
            if not received:
                raise PeerGoneError("connection closed by peer")
            protocol.commit(received)
