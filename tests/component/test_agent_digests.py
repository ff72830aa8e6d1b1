"""The agent's answers for digests it cannot cache (sha512) and for proxy refusals it cannot
explain: registry JSON errors, never a bare 500.

The proxy here is a stand-in that grants every blob (as a proxy whose origin holds sha512
blobs would) and records what it was asked.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from p2p_common.asgi import Receive, Request, Scope, Send, lifespan, send_bytes, serve_app
from p2p_common.oci import OCI_MANIFEST, compute_digest
from tests.cluster import basic, run_agent

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
MANIFEST_SHA512 = compute_digest(MANIFEST, "sha512")
BLOB_SHA512 = "sha512:" + "5a" * 64
REFUSED = "sha256:" + "40" * 32
"""A blob the stand-in refuses with a bare 400 (no code: a HEAD answer has no body)."""


@dataclass
class StandInProxy:
    requests: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        request = Request.from_scope(scope)
        self.requests.append((request.method, request.path))
        head = request.method == "HEAD"
        if request.path.endswith(f"/blobs/{REFUSED}"):
            await send_bytes(send, 400, b"", content_type=None, head=True)
        elif "/blobs/" in request.path:
            await send_bytes(send, 200, b"", head=True, content_length=1234)
        elif request.path.endswith(f"/manifests/{MANIFEST_SHA512}"):
            headers = [("Docker-Content-Digest", MANIFEST_SHA512)]
            await send_bytes(send, 200, MANIFEST, content_type=OCI_MANIFEST, headers=headers)
        else:
            await send_bytes(send, 404, b'{"errors":[]}', head=head)

    def asked_for(self, digest: str) -> list[tuple[str, str]]:
        return [(method, path) for method, path in self.requests if digest in path]


@asynccontextmanager
async def stand_in_proxy() -> AsyncIterator[tuple[StandInProxy, str]]:
    app = StandInProxy()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_app, app, "127.0.0.1:0"))
        yield app, f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def test_a_sha512_blob_is_a_404_registry_error_and_nothing_is_asked(tmp_path: Path) -> None:
    async with (
        stand_in_proxy() as (proxy, url),
        run_agent(tmp_path / "agent", ["registry.example.com"], [url]) as agent,
    ):
        path = f"/v2/team/app/blobs/{BLOB_SHA512}"
        for headers in ({}, basic("alice", "secret")):
            got = await agent.http.get(path, headers=headers)
            assert got.status_code == 404  # containerd falls back to the origin (mirror mode)
            assert got.headers["content-type"].startswith("application/json")
            (error,) = got.json()["errors"]
            assert error["code"] == "UNSUPPORTED"
            assert "sha256" in error["message"]
            head = await agent.http.head(path, headers=headers)
            assert (head.status_code, head.content) == (404, b"")
        assert proxy.asked_for(BLOB_SHA512) == []


async def test_a_manifest_by_sha512_digest_goes_through(tmp_path: Path) -> None:
    async with (
        stand_in_proxy() as (proxy, url),
        run_agent(tmp_path / "agent", ["registry.example.com"], [url]) as agent,
    ):
        got = await agent.http.get(f"/v2/team/app/manifests/{MANIFEST_SHA512}")
        assert (got.status_code, got.content) == (200, MANIFEST)
        assert got.headers["docker-content-digest"] == MANIFEST_SHA512
        assert proxy.asked_for(MANIFEST_SHA512) == [
            ("GET", f"/v2/team/app/manifests/{MANIFEST_SHA512}")
        ]


async def test_a_proxy_refusal_without_a_code_is_a_502_registry_error(tmp_path: Path) -> None:
    async with (
        stand_in_proxy() as (proxy, url),
        run_agent(tmp_path / "agent", ["registry.example.com"], [url]) as agent,
    ):
        got = await agent.http.get(f"/v2/team/app/blobs/{REFUSED}")
        assert got.status_code == 502
        assert got.json()["errors"][0]["code"] == "UNKNOWN"
        assert proxy.asked_for(REFUSED) == [("HEAD", f"/v2/team/app/blobs/{REFUSED}")]
