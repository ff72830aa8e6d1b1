"""Preheat's parsers (p2p_proxy.preheat): the request, an index, an image manifest."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2p_common.dockerconfig import UsageError, authorization, credentials, split_image
from p2p_common.errors import P2PError
from p2p_common.oci import ErrorCode, OCIError
from p2p_proxy.preheat import MAX_JOBS, Preheater, image_blobs, manifest_children, parse_request

D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")


def test_image_names() -> None:
    assert parse_request(b'{"image": "team/app:1.0"}') == ("team/app", "1.0", [])
    assert parse_request(b'{"image": "team/app"}') == ("team/app", "latest", [])
    assert parse_request(f'{{"image": "team/app@{D1}"}}'.encode()) == ("team/app", D1, [])
    assert parse_request(b'{"image": "localhost:5000/app:2", "platforms": ["linux/arm64"]}') == (
        "localhost:5000/app",
        "2",
        ["linux/arm64"],
    )
    for bad in (b'{"image": "team/app@sha256:zz"}', b'{"image": ":x"}', b"[]", b"{"):
        with pytest.raises(P2PError):
            parse_request(bad)


def test_an_index_gives_the_manifests_of_the_platforms_asked_for() -> None:
    index = json.dumps(
        {
            "manifests": [
                {"digest": D1, "size": 10, "platform": {"os": "linux", "architecture": "amd64"}},
                {
                    "digest": D2,
                    "size": 10,
                    "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
                },
                {"digest": D3, "size": 10},  # an attestation, say: no platform
            ]
        }
    ).encode()
    assert manifest_children(index, []) == [D1, D2, D3]
    assert manifest_children(index, ["linux/amd64"]) == [D1]
    assert manifest_children(index, ["linux/arm/v7"]) == [D2]
    assert manifest_children(index, ["linux/arm"]) == [D2]
    assert manifest_children(index, ["windows/amd64"]) == []


def test_a_manifest_gives_its_config_then_its_layers() -> None:
    manifest = json.dumps(
        {
            "config": {"digest": D1, "size": 5},
            "layers": [{"digest": D2, "size": 6}, {"digest": D3, "size": 7}],
        }
    ).encode()
    assert image_blobs(manifest) == [(D1, 5), (D2, 6), (D3, 7)]
    for bad in (
        {"layers": []},
        {"config": {"digest": D1, "size": -1}, "layers": []},
        {"config": {"digest": "md5:x", "size": 1}, "layers": []},
        {"config": {"digest": D1, "size": 1}},
    ):
        with pytest.raises(P2PError):
            image_blobs(json.dumps(bad).encode())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.one_of(st.binary(max_size=200), JSON.map(lambda doc: json.dumps(doc).encode())))
def test_any_input_is_parsed_or_refused_with_a_registry_error(body: bytes) -> None:
    for parse in (parse_request, image_blobs, lambda b: manifest_children(b, ["linux/amd64"])):
        with contextlib.suppress(P2PError):
            parse(body)


def test_an_image_names_its_registry_only_when_it_looks_like_a_host() -> None:
    assert split_image("registry.example.com/team/app:1") == ("registry.example.com", "team/app:1")
    assert split_image("127.0.0.1:5000/app") == ("127.0.0.1:5000", "app")
    assert split_image("localhost/app") == ("localhost", "app")
    assert split_image("team/app:1") == (None, "team/app:1")
    assert split_image("app") == (None, "app")


def test_credentials_come_from_the_environment_or_the_docker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"alice:s3:cret").decode()
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://r.example": {"auth": auth},
                    "other.example": {"username": "bob", "password": "pw"},
                }
            }
        )
    )
    monkeypatch.delenv("P2P_PREHEAT_USERNAME", raising=False)
    monkeypatch.delenv("P2P_PREHEAT_PASSWORD", raising=False)
    assert credentials("r.example", config) == ("alice", "s3:cret")
    assert credentials("other.example", config) == ("bob", "pw")
    assert credentials("unknown.example", config) is None
    assert credentials(None, config) is None
    monkeypatch.setenv("P2P_PREHEAT_USERNAME", "carol")
    monkeypatch.setenv("P2P_PREHEAT_PASSWORD", "x")
    assert credentials("r.example", config) == ("carol", "x")
    monkeypatch.delenv("P2P_PREHEAT_USERNAME")
    config.write_text("{not json")
    with pytest.raises(UsageError, match=r"config\.json"):
        credentials("r.example", config)


async def test_unfinished_jobs_are_bounded_and_finished_ones_make_room() -> None:
    release = trio.Event()

    async def get_manifest(repo: str, ref: str, credentials: object) -> tuple[str, bytes]:
        await release.wait()
        raise OCIError(ErrorCode.MANIFEST_UNKNOWN, "gone", status=404)

    async def ensure_blob(repo: str, digest: str, size: int, credentials: object) -> bool:
        raise AssertionError("no blob is reached")

    def start(preheater: Preheater) -> object:
        return preheater.start(
            registry="r",
            repository="team/app",
            reference="1",
            platforms=[],
            credentials=None,
            get_manifest=get_manifest,  # type: ignore[arg-type]
            ensure_blob=ensure_blob,
        )

    async with trio.open_nursery() as nursery:
        preheater = Preheater(nursery)
        for _ in range(MAX_JOBS):
            start(preheater)
        with pytest.raises(OCIError) as refused:
            start(preheater)
        assert refused.value.status == 429
        assert len(preheater.jobs) == MAX_JOBS
        release.set()
        with trio.fail_after(10):
            for job in list(preheater.jobs.values()):
                await job.done_event.wait()
        start(preheater)  # a finished job made room
        assert len(preheater.jobs) == MAX_JOBS
        nursery.cancel_scope.cancel()


def test_the_authorization_header_is_basic_and_refuses_what_basic_cannot_carry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"r.example": {"username": "bob", "password": "p:w"}}}))
    monkeypatch.delenv("P2P_PREHEAT_USERNAME", raising=False)
    monkeypatch.delenv("P2P_PREHEAT_PASSWORD", raising=False)
    header = authorization("r.example", config)
    assert header == "Basic " + base64.b64encode(b"bob:p:w").decode()
    assert authorization("unknown.example", config) is None
    monkeypatch.setenv("P2P_PREHEAT_USERNAME", "team:ci")  # RFC 7617: no ':' in a user-id
    monkeypatch.setenv("P2P_PREHEAT_PASSWORD", "x")
    with pytest.raises(UsageError, match=r"the login for r\.example: .*':'"):
        authorization("r.example", config)
    monkeypatch.setenv("P2P_PREHEAT_USERNAME", "carol")
    monkeypatch.setenv("P2P_PREHEAT_PASSWORD", "line\nbreak")
    with pytest.raises(UsageError, match=r"the login for r\.example"):
        authorization("r.example", config)
