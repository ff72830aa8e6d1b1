"""A keep-alive connection its client closes while idle is closed by the server at once.

Hypercorn 0.18's trio worker kept such a connection open (CLOSE-WAIT, one descriptor) until
``keep_alive_timeout``: 60 s on the agent and the proxy, 10 s on the tracker. 200 clients that
pulled from an agent and went away held 182 of its descriptors for a minute
(tests/integration/test_load.py). Both servers (``serve_app`` for the agent and the proxy, the
tracker's own ``serve``) now close it when the client does (p2p_common.asgi.ClosingTCPServer).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio
import trio.testing

from p2p_common.asgi import Receive, Scope, Send, lifespan, send_bytes, serve_app
from p2p_tracker.service import serve as serve_tracker
from p2p_tracker.settings import TrackerSettings

CLIENTS = 5
ESTABLISHED, CLOSE_WAIT = "01", "08"


def server_sockets(port: int, state: str) -> int:
    """TCP sockets on local ``port`` in ``state`` (``/proc/net/tcp`` codes)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and int(fields[1].rpartition(":")[2], 16) == port:
                count += 1
    return count


async def answered(stream: trio.SocketStream) -> bytes:
    """One whole response (``Content-Length`` bodies only)."""
    received = b""
    while b"\r\n\r\n" not in received:
        data = await stream.receive_some(65536)
        assert data, "closed before the response head"
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.partition(b":")[2])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        data = await stream.receive_some(65536)
        assert data, "closed in the middle of the body"
        body += data
    return head


async def idle_then_closed(port: int, target: str) -> None:
    """Every client gets an answer, stays connected (the server then waits, idle, for the next
    request), and closes; the server must close its side too, long before its keep-alive
    timeout."""
    streams = []
    for _ in range(CLIENTS):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        head = await answered(stream)
        assert head.startswith(b"HTTP/1.1 200 "), head
        streams.append(stream)
    await trio.testing.wait_all_tasks_blocked()  # every connection is idle on the server
    assert server_sockets(port, ESTABLISHED) == CLIENTS  # kept alive: the case under test
    for stream in streams:
        await stream.aclose()
    with trio.fail_after(5):  # keep-alive timeouts are 10 s (tracker) and 60 s (agent, proxy)
        while True:
            if not server_sockets(port, CLOSE_WAIT) and not server_sockets(port, ESTABLISHED):
                break
            await trio.sleep(0.01)


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http":
        await send_bytes(send, 200, b"{}")


async def test_serve_app_closes_a_connection_its_client_closed_while_idle(
    nursery: trio.Nursery,
) -> None:
    port = await nursery.start(partial(serve_app, hello, "127.0.0.1:0"))
    await idle_then_closed(port, "/v2/")


async def test_tracker_closes_a_connection_its_client_closed_while_idle(
    nursery: trio.Nursery,
) -> None:
    settings = TrackerSettings.load(None, environ={}, listen="127.0.0.1:0")
    port = await nursery.start(serve_tracker, settings)
    await idle_then_closed(port, "/healthz")
