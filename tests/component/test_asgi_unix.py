"""serve_app on a unix socket (``unix:PATH``): private (mode 0600), replaces a stale socket,
answers HTTP, reports port 0."""

from __future__ import annotations

import os
import socket
import stat
from functools import partial
from pathlib import Path

import httpx
import trio

from p2p_common.asgi import Receive, Scope, Send, lifespan, send_bytes, serve_app


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    await send_bytes(send, 200, b'{"hello": "unix"}')


async def test_a_unix_socket_is_private_and_answers(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX)  # left by an agent that crashed
    stale.bind(str(path))
    stale.close()
    old_umask = os.umask(0)  # even a permissive umask gives a private socket
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_app, hello, f"unix:{path}"))
            assert port == 0
            assert stat.S_ISSOCK(path.stat().st_mode)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            transport = httpx.AsyncHTTPTransport(uds=str(path))
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                response = await client.get("/anything")
            assert response.json() == {"hello": "unix"}
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old_umask)
