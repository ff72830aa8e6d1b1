"""Tag lists and referrers through the agent and the proxy (OCI distribution 1.1), for signature
tools (cosign, notation): ``GET /v2/<name>/tags/list`` with ``n``/``last`` and the ``Link``
header, ``GET /v2/<name>/referrers/<digest>`` with ``artifactType``.

The CNCF distribution registry 2.8 on these machines has no referrers API (it answers
``404 page not found``) and ignores ``n``/``last`` (it never paginates), so pagination and
referrers are tested against a small origin here (:class:`ListingOrigin`), and the real registry
gives the tag list (with token auth), the referrers 404 that clients need to fall back to the tag
schema, and skopeo lists tags through the agent as a real client (following the agent's ``Link``
headers across the pages of the small origin too).
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2p_common.asgi import Receive, Request, Scope, Send, lifespan, send_bytes, serve_app
from p2p_common.oci import OCI_INDEX, ErrorCode, error_body
from tests.cluster import AgentHandle, ProxyHandle, basic, metric, run_agent, run_proxy
from tests.realparts import images
from tests.realparts.registry import DEFAULT_USERS, Registry, run_registry

pytestmark = pytest.mark.realparts

SUBJECT = "sha256:" + "5a" * 32
COSIGN = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"
ALICE = ("alice", "alice-secret")
PAGE = 2


def descriptor(n: int, artifact_type: str) -> dict[str, Any]:
    return {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:" + f"{n:02x}" * 32,
        "size": 500 + n,
        "artifactType": artifact_type,
    }


REFERRERS = [descriptor(1, COSIGN), descriptor(2, SBOM), descriptor(3, COSIGN), descriptor(4, SBOM)]


@dataclass
class ListingOrigin:
    """A registry with tag pagination (pages of 2 unless ``n`` says otherwise; ``Link`` absolute
    for ``team/app``, relative with an opaque cursor for ``team/cursor``), the referrers API
    (filtered by ``artifactType``, two per page), Basic auth for ``private/*`` (alice), and the
    requests it got."""

    tags: dict[str, list[str]] = field(
        default_factory=lambda: {
            "team/app": ["a", "b", "c", "d", "e"],
            "team/cursor": ["1.0", "1.1", "2.0"],
            "private/app": ["secret-1"],
        }
    )
    requests: list[Request] = field(default_factory=list)
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        request = Request.from_scope(scope)
        self.requests.append(request)
        status, body, headers = self.answer(request)
        content_type = next((v for k, v in headers if k == "Content-Type"), "application/json")
        headers = [(k, v) for k, v in headers if k != "Content-Type"]
        await send_bytes(send, status, body, content_type=content_type, headers=headers)

    def answer(self, request: Request) -> tuple[int, bytes, list[tuple[str, str]]]:
        parts = request.path.removeprefix("/v2/").split("/")
        name = "/".join(parts[:-2])
        alice = "Basic " + base64.b64encode(":".join(ALICE).encode()).decode()
        if name.startswith("private/") and request.header("authorization") != alice:
            challenge = [("WWW-Authenticate", 'Basic realm="listing-origin"')]
            return 401, error_body(ErrorCode.UNAUTHORIZED), challenge
        if parts[-2:] == ["tags", "list"]:
            return self.tag_page(name, request)
        if parts[-2] == "referrers":
            return self.referrers(parts[-1], request)
        return 404, error_body(ErrorCode.UNSUPPORTED), []

    def tag_page(self, name: str, request: Request) -> tuple[int, bytes, list[tuple[str, str]]]:
        if name not in self.tags:
            return 404, error_body(ErrorCode.NAME_UNKNOWN), []
        tags = self.tags[name]
        if name == "team/cursor":
            start = int(request.param("next_page") or 0)
        else:
            last = request.param("last")
            start = tags.index(last) + 1 if last in tags else 0
        size = int(request.param("n") or PAGE)
        page = tags[start : start + size]
        headers = []
        if start + size < len(tags):
            if name == "team/cursor":
                link = f"/v2/{name}/tags/list?next_page={start + size}"
            else:
                link = f"http://{self.host}/v2/{name}/tags/list?n={size}&last={page[-1]}"
            headers.append(("Link", f'<{link}>; rel="next"'))
        return 200, json.dumps({"name": name, "tags": page}).encode(), headers

    def referrers(self, digest: str, request: Request) -> tuple[int, bytes, list[tuple[str, str]]]:
        wanted = request.param("artifactType")
        found = [d for d in REFERRERS if wanted is None or d["artifactType"] == wanted]
        start = int(request.param("page") or 0)
        headers = [("Content-Type", OCI_INDEX)]
        if wanted is not None:
            headers.append(("OCI-Filters-Applied", "artifactType"))
        if start + PAGE < len(found):
            query = urllib.parse.urlencode(
                {"page": start + PAGE, **({"artifactType": wanted} if wanted else {})}
            )
            headers.append(("Link", f'</v2/team/app/referrers/{digest}?{query}>; rel="next"'))
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": found[start : start + PAGE],
        }
        if digest != SUBJECT:
            index["manifests"] = []
        return 200, json.dumps(index).encode(), headers


@dataclass
class Chain:
    origin: ListingOrigin
    proxy: ProxyHandle
    agent: AgentHandle


@asynccontextmanager
async def chain(tmp_path: Path, *registries: str) -> AsyncIterator[Chain]:
    """The small origin (listed first), then proxy and agent for it and ``registries``."""
    origin = ListingOrigin()
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        origin.port = await nursery.start(partial(serve_app, origin, "127.0.0.1:0"))
        served = [f"http://{origin.host}", *registries]
        proxy = await stack.enter_async_context(
            run_proxy(tmp_path / "proxy", served, ["http://127.0.0.1:9/announce"])
        )
        agent = await stack.enter_async_context(run_agent(tmp_path / "agent", served, [proxy.url]))
        yield Chain(origin, proxy, agent)
        nursery.cancel_scope.cancel()


async def all_pages(
    http: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> tuple[list[Any], list[httpx.Response]]:
    """Follow ``Link: rel="next"`` from ``path``; returns the entries and every response."""
    entries: list[Any] = []
    responses = []
    url: str | None = path
    while url is not None:
        response = await http.get(url, headers=headers)
        assert response.status_code == 200, response.text
        responses.append(response)
        doc = response.json()
        entries += doc["tags"] if "tags" in doc else doc["manifests"]
        url = response.links.get("next", {}).get("url")
        assert len(responses) < 10
    return entries, responses


async def test_tag_pages_follow_the_agents_links_in_rewrite_and_mirror_mode(
    tmp_path: Path,
) -> None:
    async with chain(tmp_path) as c:
        tags, pages = await all_pages(c.agent.http, "/v2/team/app/tags/list")
        assert tags == c.origin.tags["team/app"]
        assert len(pages) == 3
        # The origin's absolute link became a relative one to the agent (rewrite mode: no ns).
        assert pages[0].headers["link"] == '</v2/team/app/tags/list?n=2&last=b>; rel="next"'
        assert "link" not in pages[-1].headers
        # Mirror mode: the link keeps the registry, so the next page is for it too.
        mirror, pages = await all_pages(
            c.agent.http, f"/v2/team/app/tags/list?n=3&ns={c.origin.host}"
        )
        assert mirror == c.origin.tags["team/app"]
        assert pages[0].headers["link"] == (
            f'</v2/team/app/tags/list?n=3&last=c&ns={c.origin.host}>; rel="next"'
        )
        # A registry's own cursor parameter passes through.
        cursor, pages = await all_pages(c.agent.http, "/v2/team/cursor/tags/list")
        assert cursor == c.origin.tags["team/cursor"]
        assert pages[0].headers["link"] == '</v2/team/cursor/tags/list?next_page=2>; rel="next"'
        # The origin never saw our ns, and got every page's parameters.
        queries = [r.query for r in c.origin.requests]
        assert all("ns" not in q for q in queries)
        assert {"n": ["3"], "last": ["c"]} in queries
        assert await metric(c.proxy.http, "p2p_proxy_listing_requests_total", kind="tags") == 7


async def test_referrers_with_the_artifact_type_filter_and_pages(tmp_path: Path) -> None:
    async with chain(tmp_path) as c:
        found, pages = await all_pages(c.agent.http, f"/v2/team/app/referrers/{SUBJECT}")
        assert found == REFERRERS
        assert pages[0].headers["content-type"] == OCI_INDEX
        assert "oci-filters-applied" not in pages[0].headers
        signatures, pages = await all_pages(
            c.agent.http,
            f"/v2/team/app/referrers/{SUBJECT}?"
            + urllib.parse.urlencode({"artifactType": COSIGN, "ns": c.origin.host}),
        )
        assert signatures == [d for d in REFERRERS if d["artifactType"] == COSIGN]
        assert pages[0].headers["oci-filters-applied"] == "artifactType"
        assert c.origin.requests[-1].query["artifactType"] == [COSIGN]
        # No referrers: an empty index, not an error.
        empty = await c.agent.http.get(f"/v2/team/app/referrers/sha256:{'00' * 32}")
        assert (empty.status_code, empty.json()["manifests"]) == (200, [])
        first = await c.agent.http.get(f"/v2/team/app/referrers/{SUBJECT}")
        head = await c.agent.http.head(f"/v2/team/app/referrers/{SUBJECT}")
        assert (head.status_code, head.content) == (200, b"")
        assert int(head.headers["content-length"]) == len(first.content)
        assert head.headers["link"] == first.headers["link"]


async def test_credentials_errors_and_bad_requests(tmp_path: Path) -> None:
    async with chain(tmp_path) as c:
        http = c.agent.http
        # The origin decides, with the caller's credentials, as for manifests.
        anonymous = await http.get("/v2/private/app/tags/list")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == 'Basic realm="p2p-agent"'
        wrong = await http.get("/v2/private/app/tags/list", headers=basic("alice", "nope"))
        assert wrong.status_code == 401
        alice = await http.get("/v2/private/app/tags/list", headers=basic(*ALICE))
        assert alice.json() == {"name": "private/app", "tags": ["secret-1"]}
        assert c.origin.requests[-1].header("authorization") == basic(*ALICE)["Authorization"]
        # Registry errors in the OCI JSON format with their status.
        unknown = await http.get("/v2/team/nothing/tags/list")
        assert (unknown.status_code, unknown.json()["errors"][0]["code"]) == (404, "NAME_UNKNOWN")
        asked = len(c.origin.requests)
        for path, status, code in (
            ("/v2/team/app/tags/list?n=-1", 400, "UNSUPPORTED"),
            ("/v2/team/app/referrers/latest", 400, "DIGEST_INVALID"),
            ("/v2/team/app/referrers/" + SUBJECT + "?artifactType=x", 400, "UNSUPPORTED"),
            ("/v2/Team/app/tags/list", 400, "NAME_INVALID"),
            ("/v2/team/app/tags/list?ns=elsewhere.example", 404, "NAME_UNKNOWN"),
            # A registry not accelerated here: 404 before the path is even looked at (the
            # catch-all sends containerd here for every registry; it must fall back at once).
            ("/v2/Team/app/manifests/1.0?ns=elsewhere.example", 404, "NAME_UNKNOWN"),
            ("/v2/_catalog?ns=elsewhere.example", 404, "NAME_UNKNOWN"),
        ):
            refused = await http.get(path)
            assert (refused.status_code, refused.json()["errors"][0]["code"]) == (status, code)
        assert len(c.origin.requests) == asked  # none of those reached the origin


# --- the real registry, and skopeo as a real client ---------------------------------------------


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    base = tmp_path_factory.mktemp("listing-registry")
    with run_registry(base / "registry", auth="token") as registry:
        layout = base / "layout"
        image = images.build_image(layout, tag="1.0", seed="listing", layer_sizes=(1000,))
        creds = ("alice", DEFAULT_USERS["alice"])
        for repository in ("public/app", "private/app"):
            images.push_image(layout, image, registry.host, repository, creds=creds)
        images.skopeo(
            [
                "copy",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                f"--src-creds={creds[0]}:{creds[1]}",
                f"--dest-creds={creds[0]}:{creds[1]}",
                f"docker://{registry.host}/public/app:1.0",
                f"docker://{registry.host}/public/app:2.0",
            ]
        )
        yield registry, image.digest


async def test_the_real_registry_through_the_agent(
    token_registry: tuple[Registry, str], tmp_path: Path
) -> None:
    registry, digest = token_registry
    async with chain(tmp_path, registry.url) as c:
        http = c.agent.http
        ns = {"ns": registry.host}
        public = await http.get("/v2/public/app/tags/list", params=ns)
        assert public.status_code == 200
        assert sorted(public.json()["tags"]) == ["1.0", "2.0"]
        private = await http.get("/v2/private/app/tags/list", params=ns)
        assert private.status_code == 401
        assert private.headers["www-authenticate"] == 'Basic realm="p2p-agent"'
        bob = await http.get(
            "/v2/private/app/tags/list", params=ns, headers=basic("bob", "bob-secret")
        )
        assert bob.status_code in (401, 403)
        alice = await http.get(
            "/v2/private/app/tags/list", params=ns, headers=basic("alice", DEFAULT_USERS["alice"])
        )
        assert alice.json()["tags"] == ["1.0"]
        # distribution 2.8 has no referrers API: its 404 reaches the client as a 404, which is
        # what makes cosign and notation fall back to the tag schema.
        referrers = await http.get(f"/v2/public/app/referrers/{digest}", params=ns)
        assert referrers.status_code == 404
        assert referrers.json()["errors"][0]["code"] == "UNSUPPORTED"


def skopeo_tags(host: str, repository: str, *creds: str) -> list[str]:
    args = ["list-tags", "--tls-verify=false"]
    if creds:
        args.append(f"--creds={creds[0]}:{creds[1]}")
    done = images.skopeo([*args, f"docker://{host}/{repository}"])
    tags: list[str] = json.loads(done.stdout)["Tags"]
    return tags


async def test_skopeo_lists_tags_through_the_agent(tmp_path: Path) -> None:
    async with chain(tmp_path) as c:
        agent = c.agent.host
        # The small origin is the agent's first registry (rewrite mode): three pages, followed
        # through the agent's Link headers.
        tags = await trio.to_thread.run_sync(skopeo_tags, agent, "team/app")
        assert tags == c.origin.tags["team/app"]
        private = await trio.to_thread.run_sync(skopeo_tags, agent, "private/app", *ALICE)
        assert private == ["secret-1"]
