"""A TCP forwarder that can hold back what a server sends: an origin that stalls mid-blob.

``async with gated_forwarder(port) as gate`` listens on 127.0.0.1:``gate.port`` and forwards
every connection to 127.0.0.1:``port``. Requests pass freely; responses pass until
``gate.hold_after`` bytes went out in all (``None``: no limit), then wait until
``gate.release`` is set. ``gate.sent`` counts response bytes delivered, so a test can tell
that something happened *while* the origin was still sending, without timing anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio


@dataclass
class Gate:
    port: int = 0
    hold_after: int | None = None
    release: trio.Event = field(default_factory=trio.Event)
    sent: int = 0
    holding: trio.Event = field(default_factory=trio.Event)
    """Set once a response had to wait at the gate."""

    async def _pump(self, source: trio.abc.Stream, sink: trio.abc.Stream, gated: bool) -> None:
        try:
            while data := await source.receive_some(64 * 1024):
                if gated and self.hold_after is not None:
                    room = self.hold_after - self.sent
                    if room < len(data) and not self.release.is_set():
                        if room > 0:
                            await sink.send_all(data[:room])
                            self.sent += room
                            data = data[room:]
                        self.holding.set()
                        await self.release.wait()
                await sink.send_all(data)
                if gated:
                    self.sent += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await sink.aclose()

    async def _serve(self, client: trio.SocketStream, upstream_port: int) -> None:
        async with client:
            try:
                server = await trio.open_tcp_stream("127.0.0.1", upstream_port)
            except OSError:
                return
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, False)
                nursery.start_soon(self._pump, server, client, True)


@asynccontextmanager
async def gated_forwarder(upstream_port: int) -> AsyncIterator[Gate]:
    gate = Gate()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"),
            lambda stream: gate._serve(stream, upstream_port),
            0,
        )
        gate.port = listeners[0].socket.getsockname()[1]
        try:
            yield gate
        finally:
            gate.release.set()
            nursery.cancel_scope.cancel()
