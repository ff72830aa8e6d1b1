"""How much response body a service holds for clients that have not taken it yet.

A response body chunk is read from disk, handed to the HTTP server and held until the kernel
accepts it. A client that stops reading keeps its chunk (and the kernel's socket buffer) until
its connection is cut (``sendTimeout``: TCP_USER_TIMEOUT on the listening socket, see
:func:`p2p_common.asgi.hypercorn_config`). With 4 MiB chunks, 40 clients that never read held
160 MiB of a proxy. :data:`SEND_MEMORY` counts the bytes being sent, process-wide; readers ask
it how large their next chunk may be (:meth:`SendMemory.chunk`): the full size while the total
is below its limit, :data:`MIN_CHUNK` beyond it. What stalled clients pin is then at most the
limit plus one small chunk each.
"""

from __future__ import annotations

__all__ = ["MIN_CHUNK", "SEND_MEMORY", "SendMemory"]

MIN_CHUNK = 64 * 1024
"""The chunk a reader gets when the limit is reached (a response never stops for the limit:
it only gets slower per byte, while the stalled clients that hold the memory time out)."""


class SendMemory:
    """Bytes of response bodies handed to the server and not yet taken by the kernel."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def chunk(self, want: int) -> int:
        """How many bytes the next read for a response may take (at most ``want``)."""
        free = self.limit - self.held
        if want <= free:
            return want
        return min(want, max(MIN_CHUNK, free))

    def hold(self, size: int) -> None:
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size


SEND_MEMORY = SendMemory(16 * 1024 * 1024)
"""The process's budget (16 MiB: four full chunks in flight at once, which fast clients
never approach, since the kernel takes each chunk as fast as it is read)."""
