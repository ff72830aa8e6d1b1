"""The agent's admin API (p2p_agent.admin) called as an ASGI app: routes, answers, bad requests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from p2p_agent.admin import AdminApp, BadRequestError, parse_prune
from p2p_agent.janitor import Janitor, PolicyInForce
from p2p_common.blobcache import BlobCache
from p2p_common.cachepolicy import CachePolicy


async def call(app: AdminApp, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    await app(scope, receive, send)
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def app_with_blob(tmp_path: Path) -> tuple[AdminApp, BlobCache, str]:
    cache = BlobCache(tmp_path)
    content = b"layer"
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    scratch = cache.scratch_file("t")
    scratch.write_bytes(content)
    cache.adopt(scratch, digest)
    janitor = Janitor(cache, tmp_path, PolicyInForce(CachePolicy(), "test"))
    downloads = SimpleNamespace(active={}, info_hashes={digest: b"x"})
    return AdminApp(janitor=janitor, cache=cache, downloads=downloads), cache, digest


async def test_the_listing_shows_blobs_policy_and_disk(tmp_path: Path) -> None:
    app, _, digest = app_with_blob(tmp_path)
    status, doc = await call(app, "GET", "/v1/cache")
    assert status == 200
    (blob,) = doc["blobs"]
    assert (blob["digest"], blob["size"], blob["state"]) == (digest, 5, "seeding")
    assert doc["policy"]["source"] == "test"
    assert doc["disk"]["total_bytes"] > 0
    assert doc["partials"] == []


async def test_rm_removes_a_blob_and_then_knows_it_not(tmp_path: Path) -> None:
    app, cache, digest = app_with_blob(tmp_path)
    with cache.pinned(digest):
        status, doc = await call(app, "DELETE", f"/v1/cache/blobs/{digest}")
    assert status == 409
    assert "in use" in doc["error"]
    assert await call(app, "DELETE", f"/v1/cache/blobs/{digest}") == (
        200,
        {"digest": digest, "removed": "removed", "bytes": 5},
    )
    status, doc = await call(app, "DELETE", f"/v1/cache/blobs/{digest}")
    assert status == 404


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/cache", 405),
        ("GET", "/v1/cache/prune", 405),
        ("GET", "/v1/cache/blobs/sha256:" + "a" * 64, 405),
        ("DELETE", "/v1/cache/blobs/sha256:abc", 400),
        ("DELETE", "/v1/cache/blobs/../../etc", 400),
        ("GET", "/metrics", 404),
    ],
)
async def test_other_requests_are_refused(
    tmp_path: Path, method: str, path: str, status: int
) -> None:
    app, _, _ = app_with_blob(tmp_path)
    answered, doc = await call(app, method, path)
    assert answered == status
    assert doc["error"]


async def test_prune_bodies(tmp_path: Path) -> None:
    app, _, digest = app_with_blob(tmp_path)
    assert (await call(app, "POST", "/v1/cache/prune", b"{}"))[1]["evicted"] == []
    status, doc = await call(app, "POST", "/v1/cache/prune", b'{"unused_for": "1d"}')
    assert status == 400
    status, doc = await call(app, "POST", "/v1/cache/prune", b'{"all": true}')
    assert status == 200
    assert doc["evicted"] == [{"digest": digest, "size": 5, "reason": "operator"}]
    status, doc = await call(app, "POST", "/v1/cache/prune", b"x" * 5000)
    assert status == 413


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", (False, None)),
        (b"{}", (False, None)),
        (b'{"all": true}', (True, None)),
        (b'{"unused_for": 172800}', (False, 172800.0)),
        (b'{"unused_for": 0.5}', (False, 0.5)),
    ],
)
def test_parse_prune_accepts(body: bytes, expected: tuple[bool, float | None]) -> None:
    assert parse_prune(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"everything": true}',
        b'{"all": "yes"}',
        b'{"unused_for": -1}',
        b'{"unused_for": "2d"}',
        b'{"unused_for": true}',
        b'{"all": true, "unused_for": 5}',
    ],
)
def test_parse_prune_refuses(body: bytes) -> None:
    with pytest.raises(BadRequestError):
        parse_prune(body)
