"""p2p_common.oci: names, tags, digests, paths, errors, Accept merging."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_common import oci
from p2p_common.errors import P2PError
from p2p_common.oci import ErrorCode, OCIError

SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "0123456789abcdef" * 8

# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "library/ubuntu",
        "team/app",
        "a/b/c/d",
        "my.app",
        "my_app",
        "my__app",
        "my---app",
        "0abc/x9",
        "a" * 255,
        "/".join(["ab"] * 85),
    ],
)
def test_valid_names(name: str) -> None:
    assert oci.is_valid_name(name)
    assert oci.validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "A",
        "Team/app",
        "team//app",
        "/team/app",
        "team/app/",
        "team/../app",
        "..",
        "../etc",
        "team/%2e%2e/app",
        "%2e%2e",
        "team\\app",
        "team/.app",
        "team/app.",
        "team/a___b",
        "team/a..b",
        "team/-a",
        "team/a-",
        "team/a_.b",
        "team app",
        "team/app\x00",
        "team/app:tag",
        "a" * 256,
        "ü",
    ],
)
def test_invalid_names(name: str) -> None:
    assert not oci.is_valid_name(name)
    with pytest.raises(OCIError) as info:
        oci.validate_name(name)
    assert info.value.code is ErrorCode.NAME_INVALID
    assert info.value.status == 400


def test_traversal_message_names_the_problem() -> None:
    with pytest.raises(OCIError, match="traversal"):
        oci.validate_name("team/../../etc")
    with pytest.raises(OCIError, match="traversal"):
        oci.validate_name("team/%2E%2E/etc")


# --- tags, digests, references --------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["latest", "1.0", "v1.2.3-rc.1", "_x", "A" * 128, "a_B-c.D"])
def test_valid_tags(tag: str) -> None:
    assert oci.is_valid_tag(tag)
    assert oci.validate_reference(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "A" * 129, "a/b", "a b", "..", "a%2e", "é"])
def test_invalid_tags(tag: str) -> None:
    assert not oci.is_valid_tag(tag)
    with pytest.raises(OCIError) as info:
        oci.validate_tag(tag)
    assert info.value.status == 400


@pytest.mark.parametrize("digest", [SHA256, SHA512])
def test_valid_digests(digest: str) -> None:
    assert oci.is_valid_digest(digest)
    parsed = oci.parse_digest(digest)
    assert str(parsed) == digest
    assert parsed.algorithm == digest.partition(":")[0]
    assert oci.validate_reference(digest) == digest


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "0" * 63,
        "sha256:" + "0" * 65,
        "sha256:" + "A" * 64,
        "sha512:" + "0" * 64,
        "sha384:" + "0" * 96,
        "md5:" + "0" * 32,
        "SHA256:" + "0" * 64,
        "sha256" + "0" * 64,
        "sha256:" + "0" * 63 + "g",
        "sha256:../" + "0" * 61,
        "",
        ":",
    ],
)
def test_invalid_digests(digest: str) -> None:
    assert not oci.is_valid_digest(digest)
    with pytest.raises(OCIError) as info:
        oci.parse_digest(digest)
    assert info.value.code is ErrorCode.DIGEST_INVALID


def test_compute_digest() -> None:
    assert oci.compute_digest(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert oci.compute_digest(b"", "sha512").startswith("sha512:cf83e1357eefb8bd")


@given(st.text(max_size=300))
def test_validators_never_raise_anything_else(text: str) -> None:
    for check in (oci.validate_name, oci.validate_tag, oci.validate_digest, oci.validate_reference):
        try:
            result = check(text)
        except OCIError as exc:
            status = exc.status
        else:
            assert result == text
            status = 400
        assert 400 <= status < 500


@given(st.text(alphabet="abc./_-%\\:0123456789", max_size=40))
def test_accepted_names_never_contain_traversal(text: str) -> None:
    if oci.is_valid_name(text):
        assert ".." not in text
        assert "%" not in text
        assert "\\" not in text
        assert "//" not in text
        assert not text.startswith("/")
        assert not text.endswith("/")


# --- paths ----------------------------------------------------------------------------------------


def test_parse_api_path_routes() -> None:
    assert oci.parse_api_path("/v2/") == oci.ApiRoute("ping")
    assert oci.parse_api_path("/v2") == oci.ApiRoute("ping")
    assert oci.parse_api_path("/v2/team/app/manifests/1.0") == oci.ApiRoute(
        "manifest", "team/app", "1.0"
    )
    assert oci.parse_api_path(f"/v2/a/b/c/manifests/{SHA256}") == oci.ApiRoute(
        "manifest", "a/b/c", SHA256
    )
    assert oci.parse_api_path(f"/v2/team/app/blobs/{SHA512}") == oci.ApiRoute(
        "blob", "team/app", SHA512
    )
    assert oci.parse_api_path("/v2/team/app/tags/list") == oci.ApiRoute("tags", "team/app")
    assert oci.parse_api_path(f"/v2/team/app/referrers/{SHA256}") == oci.ApiRoute(
        "referrers", "team/app", SHA256
    )
    with pytest.raises(OCIError) as refused:
        oci.parse_api_path("/v2/team/app/referrers/latest")
    assert refused.value.code is ErrorCode.DIGEST_INVALID
    # A repository may be called "manifests" or "blobs".
    assert oci.parse_api_path("/v2/blobs/manifests/latest") == oci.ApiRoute(
        "manifest", "blobs", "latest"
    )


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/team/../app/manifests/latest", ErrorCode.NAME_INVALID),
        ("/v2/team/%2e%2e/app/manifests/latest", ErrorCode.NAME_INVALID),
        ("/v2/team/%2E%2E/app/blobs/" + SHA256, ErrorCode.NAME_INVALID),
        ("/v2/team//app/manifests/latest", ErrorCode.NAME_INVALID),
        ("/v2/team/./app/manifests/latest", ErrorCode.NAME_INVALID),
        ("/v2/team\\app/manifests/latest", ErrorCode.NAME_INVALID),
        ("/v2/Team/app/manifests/latest", ErrorCode.NAME_INVALID),
        ("/v2/team/app/manifests/", ErrorCode.NAME_INVALID),
        ("/v2/team/app/manifests/-bad", ErrorCode.TAG_INVALID),
        ("/v2/team/app/manifests/sha256:abc", ErrorCode.DIGEST_INVALID),
        ("/v2/team/app/blobs/latest", ErrorCode.DIGEST_INVALID),
        ("/v2/team/app/blobs/uploads/", ErrorCode.NAME_INVALID),
        ("/v2/_catalog", ErrorCode.UNSUPPORTED),
        ("/v2/team/app/referrers/", ErrorCode.NAME_INVALID),
        ("/v1/team/app", ErrorCode.UNSUPPORTED),
        ("/v2/team/app/manifests/latest\x00", ErrorCode.NAME_INVALID),
        ("/v2/" + "a/" * 600 + "manifests/latest", ErrorCode.UNSUPPORTED),
    ],
)
def test_parse_api_path_refuses(path: str, code: ErrorCode) -> None:
    with pytest.raises(OCIError) as info:
        oci.parse_api_path(path)
    assert info.value.code is code


@given(st.text(max_size=200))
def test_parse_api_path_raises_only_oci_errors(text: str) -> None:
    try:
        route = oci.parse_api_path("/v2/" + text)
    except OCIError:
        return
    if route.kind != "ping":
        assert oci.is_valid_name(route.name)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.BLOB_UNKNOWN, 404),
        (ErrorCode.MANIFEST_UNKNOWN, 404),
        (ErrorCode.NAME_UNKNOWN, 404),
        (ErrorCode.NAME_INVALID, 400),
        (ErrorCode.DIGEST_INVALID, 400),
        (ErrorCode.UNAUTHORIZED, 401),
        (ErrorCode.DENIED, 403),
        (ErrorCode.UNSUPPORTED, 405),
        (ErrorCode.TOOMANYREQUESTS, 429),
        (ErrorCode.UNKNOWN, 500),
    ],
)
def test_error_codes_and_statuses(code: ErrorCode, status: int) -> None:
    error = OCIError(code)
    assert error.status == status
    assert isinstance(error, P2PError)
    doc = json.loads(error.body())
    assert doc == {"errors": [{"code": str(code), "message": code.default_message, "detail": None}]}


def test_error_body_with_message_detail_and_headers() -> None:
    error = OCIError(
        ErrorCode.UNAUTHORIZED,
        "login first",
        detail={"name": "team/app"},
        headers={"WWW-Authenticate": 'Basic realm="p2p"'},
    )
    assert json.loads(error.body())["errors"][0] == {
        "code": "UNAUTHORIZED",
        "message": "login first",
        "detail": {"name": "team/app"},
    }
    assert error.response_headers() == {
        "Content-Type": "application/json; charset=utf-8",
        "WWW-Authenticate": 'Basic realm="p2p"',
    }
    assert "UNAUTHORIZED (401): login first" in str(error)


def test_unknown_errors_are_5xx() -> None:
    assert OCIError(ErrorCode.UNKNOWN, "origin down", status=502).status == 502
    with pytest.raises(ValueError, match="5xx"):
        OCIError(ErrorCode.UNKNOWN, status=404)
    with pytest.raises(ValueError, match="4xx or 5xx"):
        OCIError(ErrorCode.DENIED, status=200)


def test_parse_error_body() -> None:
    body = b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known","detail":{}}]}'
    entries = oci.parse_error_body(body)
    assert entries == [oci.ErrorEntry("NAME_UNKNOWN", "repository name not known")]
    assert oci.known_code(entries) is ErrorCode.NAME_UNKNOWN
    assert oci.known_code([oci.ErrorEntry("WHATEVER", ""), *entries]) is ErrorCode.NAME_UNKNOWN
    assert oci.parse_error_body(b"<html>") == []
    assert oci.parse_error_body(b'{"errors": 5}') == []
    assert oci.parse_error_body(b"[" * 100_000) == []
    assert oci.parse_error_body(b" " * (oci.MAX_ERROR_BODY + 1)) == []


@given(st.binary(max_size=500))
def test_parse_error_body_never_raises(data: bytes) -> None:
    for entry in oci.parse_error_body(data):
        assert isinstance(entry.code, str)


# --- media types and Accept -----------------------------------------------------------------------


def test_media_types() -> None:
    assert oci.is_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
    assert oci.is_manifest_media_type(oci.DOCKER_MANIFEST + "; charset=utf-8")
    assert oci.is_index_media_type("Application/VND.OCI.Image.Index.v1+json")
    assert oci.is_index_media_type(oci.DOCKER_MANIFEST_LIST)
    assert not oci.is_index_media_type(oci.OCI_MANIFEST)
    assert not oci.is_manifest_media_type("application/json")
    assert set(oci.DEFAULT_MANIFEST_ACCEPT.split(", ")) == oci.ALL_MANIFEST_MEDIA_TYPES


def test_merge_accept_several_lines_like_skopeo() -> None:
    lines = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json, "
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        " application/vnd.docker.distribution.manifest.v1+prettyjws ;q=0.5 ",
        "",
        " , ,",
    ]
    assert oci.merge_accept(lines) == (
        "application/vnd.oci.image.manifest.v1+json, "
        "application/vnd.docker.distribution.manifest.v2+json, "
        "application/vnd.docker.distribution.manifest.list.v2+json, "
        "application/vnd.docker.distribution.manifest.v1+prettyjws; q=0.5"
    )
    assert oci.accept_media_types(lines)[-1] == (
        "application/vnd.docker.distribution.manifest.v1+prettyjws"
    )


def test_merge_accept_keeps_quoted_commas_and_drops_control_characters() -> None:
    assert oci.merge_accept(['text/x; p="a,b"; q=0.1, */*']) == 'text/x; p="a,b"; q=0.1, */*'
    assert oci.merge_accept(["a/b\r\nHost: evil", "c/d"]) == "c/d"
    assert oci.merge_accept([]) == ""
    assert oci.accept_media_types([]) == []


def test_merge_accept_is_bounded() -> None:
    many = [f"application/x-{i}" for i in range(500)]
    merged = oci.merge_accept(many)
    assert len(merged.split(", ")) == oci.MAX_ACCEPT_ITEMS
    huge = ["application/" + "x" * 5000, "application/" + "y" * 5000]
    assert len(oci.merge_accept(huge)) <= oci.MAX_ACCEPT_LENGTH


@given(st.lists(st.text(max_size=60), max_size=10))
def test_merge_accept_properties(lines: list[str]) -> None:
    merged = oci.merge_accept(lines)
    assert len(merged) <= oci.MAX_ACCEPT_LENGTH
    assert "\r" not in merged
    assert "\n" not in merged
    # Merging is idempotent.
    assert oci.merge_accept([merged]) == merged
