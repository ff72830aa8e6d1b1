"""A small ASGI toolkit shared by the agent and the proxy (served by hypercorn on trio).

Not a framework: a parsed :class:`Request`, a few ways to answer (bytes, an OCI
error, a file range with bounded memory, an async byte stream), the lifespan
protocol, and :func:`serve_app`, which runs an app on hypercorn (on ``host:port``, or on a
private unix socket, ``unix:PATH``) and reports the bound port. Applications route by hand in
their own ``__call__``.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.trio.tcp_server import TCPServer

from p2p_common.listen import hypercorn_binds
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.sendmem import SEND_MEMORY
from p2p_common.settings import split_listen, unmapped
from p2p_common.storage import StorageError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_HEADER_BYTES = 16 * 1024
FILE_CHUNK = 4 * 1024 * 1024
"""Bytes read and sent per body chunk of a file response. 4 MiB sends a cached 1 GiB blob at
2.8 GB/s here against 2.3-2.4 GB/s with 1 MiB (hypercorn's per-chunk cost); memory stays
bounded at one chunk per response in flight."""
API_VERSION_HEADER = (b"docker-distribution-api-version", b"registry/2.0")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    """The raw path as sent (percent-encoding kept), so routers can refuse encodings."""
    query: dict[str, list[str]]
    headers: dict[str, list[str]]
    """Lower-case names; every line of a repeated header is kept."""
    client: tuple[str, int] | None
    """(address, port); an IPv4 client of a dual-stack socket with its IPv4 address."""

    @classmethod
    def from_scope(cls, scope: Scope) -> Request:
        headers: dict[str, list[str]] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = urllib.parse.parse_qs(
            scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        client = scope.get("client")
        return cls(
            method=scope["method"],
            path=raw_path.decode("latin-1").split("?", 1)[0],
            query=query,
            headers=headers,
            client=(unmapped(str(client[0])), int(client[1])) if client else None,
        )

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


def _headers(pairs: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: str | None = "application/json",
    headers: Iterable[tuple[str, str]] = (),
    head: bool = False,
    content_length: int | None = None,
) -> None:
    """A complete response. ``head`` sends the headers only (with the body's length)."""
    pairs = [API_VERSION_HEADER, *_headers(headers)]
    if content_type is not None:
        pairs.append((b"content-type", content_type.encode("latin-1")))
    length = len(body) if content_length is None else content_length
    pairs.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def send_error(send: Send, error: OCIError, *, head: bool = False) -> None:
    """An OCI JSON error: its status, its extra headers, exactly one Content-Type."""
    extra = [(k, v) for k, v in error.headers.items() if k.lower() != "content-type"]
    await send_bytes(
        send,
        error.status,
        error.body(),
        content_type="application/json; charset=utf-8",
        headers=extra,
        head=head,
    )


async def start_stream(
    send: Send, status: int, *, headers: Iterable[tuple[str, str]], content_length: int
) -> None:
    pairs = [API_VERSION_HEADER, *_headers(headers)]
    pairs.append((b"content-length", str(content_length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": pairs})


async def send_chunk(send: Send, data: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def send_file_range(
    send: Send,
    fd: int,
    offset: int,
    length: int,
    *,
    sent: Callable[[int], object] | None = None,
) -> None:
    """Body bytes ``[offset, offset+length)`` of an open file, read in worker threads;
    ``sent`` is told the size of every chunk that went out (for metrics)."""
    end = offset + length
    while offset < end:
        size = SEND_MEMORY.chunk(min(FILE_CHUNK, end - offset))
        data = await trio.to_thread.run_sync(os.pread, fd, size, offset)
        if len(data) != size:
            raise StorageError(f"short read at {offset}")
        offset += size
        if sent is not None:  # counted before sending: a cancelled last send still went out
            sent(size)
        await send_chunk(send, data, more=offset < end)
    if length == 0:
        await send_chunk(send, b"", more=False)


class TrackedSend:
    """``send`` that remembers whether the response has started (after which an error can
    no longer be answered: the response must be left unfinished instead)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body":
            # Counted while the server holds it (p2p_common.sendmem): a client that does not
            # read keeps this send waiting.
            size = len(message.get("body", b""))
            SEND_MEMORY.hold(size)
            try:
                await self._send(message)
            finally:
                SEND_MEMORY.release(size)
            return
        await self._send(message)


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > limit:
            raise OCIError(ErrorCode.SIZE_INVALID, "request body too large", status=413)
        if not message.get("more_body"):
            break
    return bytes(body)


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer the ASGI lifespan protocol (nothing to set up: services do it in serve())."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


SEND_TIMEOUT = 30.0
"""Default seconds a response may wait for a client that takes none of its bytes."""


class ClosingTCPServer(TCPServer):
    """Hypercorn's trio connection handler, closing a connection as soon as its client has.

    Hypercorn 0.18's handler leaves a keep-alive connection that the client closes while idle
    (the usual way HTTP clients end) open until ``keep_alive_timeout``: the end of the stream
    reaches the protocol, which has no request to end, while the idle timer keeps the
    connection's task group, and so the socket, alive (CLOSE-WAIT, one descriptor each). 200
    clients that pulled from an agent and went away held 182 descriptors for the agent's 60 s
    keep-alive (tests/integration/test_load.py). Once reading has ended (end of stream, reset,
    read timeout) nothing more can arrive, so the idle timer is stopped there; a request still
    being answered ends as before.
    """

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


def use_closing_tcp_server() -> None:
    """Make hypercorn's trio worker use :class:`ClosingTCPServer` for every connection (it
    names the class at serve time). Called by :func:`serve_app` and p2p-tracker's ``serve``."""
    hypercorn.trio.run.TCPServer = ClosingTCPServer  # type: ignore[attr-defined]


class _Config(Config):
    """Hypercorn's configuration, with a send timeout on its listening sockets.

    Hypercorn shields its socket writes from cancellation, so a client that stops reading
    holds its response (and a graceful stop) for ever; no timeout in the ASGI app can end it.
    TCP_USER_TIMEOUT can: set on the listening socket it is inherited by every accepted
    connection, and the kernel aborts a connection whose sent data stays unacknowledged, or
    unsent behind a zero window, that long. The blocked write then fails and hypercorn closes
    the connection. Idle keep-alive connections are not affected (``keep_alive_timeout``);
    hypercorn's ``read_timeout`` is left unset because it would also cut long responses
    whose clients have nothing to send.

    A unix socket (``unix:PATH``) is made private: mode :data:`UNIX_SOCKET_MODE`, set after
    it is bound and before it listens, so that no other user can connect in between
    (connecting takes write permission, and a socket that does not listen yet refuses).
    """

    send_timeout: float = SEND_TIMEOUT

    def create_sockets(self) -> Any:
        sockets = super().create_sockets()
        for sock in sockets.insecure_sockets + sockets.secure_sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.send_timeout * 1000)
                )
            elif sock.family == socket.AF_UNIX:
                os.chmod(sock.getsockname(), UNIX_SOCKET_MODE)
        return sockets


UNIX_SOCKET_MODE = 0o600
"""Permissions of a unix socket :func:`serve_app` listens on: its owner only."""


def hypercorn_config(
    listen: str,
    *,
    graceful_timeout: float = 30.0,
    send_timeout: float = SEND_TIMEOUT,
    tls: tuple[os.PathLike[str], os.PathLike[str]] | None = None,
) -> Config:
    """Hypercorn's settings for one service port; ``tls`` (certificate chain, key: PEM files)
    makes it serve HTTPS only (HTTP/1.1 and HTTP/2 by ALPN, TLS 1.2 or later)."""
    config = _Config()
    config.send_timeout = send_timeout
    if tls is not None:
        config.certfile = os.fspath(tls[0])
        config.keyfile = os.fspath(tls[1])
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.keep_alive_timeout = 60
    config.graceful_timeout = graceful_timeout
    return config


async def serve_app(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    listen: str,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    graceful_timeout: float = 30.0,
    send_timeout: float = SEND_TIMEOUT,
    tls: tuple[os.PathLike[str], os.PathLike[str]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` (``host:port``, ``[v6]:port`` or ``:port`` for every address,
    see :mod:`p2p_common.listen`; port 0 picks one) and report the port; or on a unix socket,
    ``unix:PATH`` (mode 0600, replacing a stale socket at ``PATH``), and report 0.

    Returns after ``shutdown_trigger`` returns and in-flight requests finished (bounded by
    ``graceful_timeout``, and for a client that stopped reading by ``send_timeout``);
    cancellation stops at once (but for such clients, again within ``send_timeout``).
    """
    config = hypercorn_config(
        listen, graceful_timeout=graceful_timeout, send_timeout=send_timeout, tls=tls
    )
    config.bind = hypercorn_binds(listen)  # p2p_common.listen: IPv4, IPv6, dual-stack
    use_closing_tcp_server()

    async def trigger() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: hypercorn_serve(
                cast(Any, app), config, shutdown_trigger=trigger, task_status=task_status
            )
        )
        address = binds[0].partition("://")[2]
        task_status.started(0 if address.startswith("unix:") else split_listen(address)[1])


async def stream_to(send: Send, chunks: AsyncIterator[bytes]) -> None:
    """Send every chunk of ``chunks`` as body, then end the body."""
    async for chunk in chunks:
        if chunk:
            await send_chunk(send, chunk)
    await send_chunk(send, b"", more=False)


async def until_disconnect(receive: Receive, body: Callable[[], Awaitable[None]]) -> bool:
    """Run ``body`` (which sends a response) unless the client goes away first.

    Returns False when the client disconnected and ``body`` was cancelled, so that a long
    response does not keep streaming (and keep a graceful stop waiting) for nobody.
    """
    finished = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await body()
        finished = True
        nursery.cancel_scope.cancel()
    return finished
