"""p2p-proxy's pure parts: settings, credentials, registry selection, query parameters,
ranges, storage error mapping, stored-metainfo checks."""

from __future__ import annotations

import base64
import errno
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from p2p_common.blobcache import CacheFullError
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.ranges import ByteRange
from p2p_common.registry_auth import Credentials
from p2p_common.settings import ConfigError
from p2p_proxy.api import (
    blob_digest,
    credentials_from,
    metainfo_query,
    requested_range,
    select_registry,
)
from p2p_proxy.fetch import storage_error
from p2p_proxy.settings import ProxySettings

DIGEST = "sha256:" + "a" * 64


def basic(text: str) -> dict[str, list[str]]:
    return {"authorization": ["Basic " + base64.b64encode(text.encode()).decode()]}


def code_of(call: object, *args: object) -> ErrorCode:
    with pytest.raises(OCIError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.code


# --- settings ---------------------------------------------------------------------------------


def test_registry_is_one_or_a_list_and_the_first_is_the_default() -> None:
    one = ProxySettings.load(None, environ={}, registry="registry.example.com")
    assert one.registry == ["https://registry.example.com"]
    assert one.default_registry == "https://registry.example.com"
    several = ProxySettings.load(
        None, environ={}, registry=["http://127.0.0.1:5000", "ghcr.example.org"]
    )
    assert several.registry == ["http://127.0.0.1:5000", "https://ghcr.example.org"]
    assert several.default_registry == "http://127.0.0.1:5000"
    from_env = ProxySettings.load(
        None, environ={"P2P_PROXY_REGISTRY": "a.example.com,http://b.example.com:80"}
    )
    assert from_env.registry == ["https://a.example.com", "http://b.example.com:80"]


def test_defaults() -> None:
    settings = ProxySettings.load(None, environ={}, registry="r.example.com")
    assert settings.listen == ":5005"
    assert settings.peer_port == 6882
    assert settings.data_dir == Path("/p2p_proxy_data")
    assert settings.cache_size == 50 * 10**9
    assert settings.auth_cache_ttl == 60
    assert settings.shutdown_timeout == 90
    assert settings.trackers == []


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({}, "registry"),
        ({"registry": []}, "registry"),
        ({"registry": ["r.example.com", "https://R.example.com"]}, "registry"),
        ({"registry": "ftp://r.example.com"}, "registry"),
        ({"registry": "r.example.com/path"}, "registry"),
        ({"registry": "r.example.com", "peerPort": 0}, "peerPort"),
        ({"registry": "r.example.com", "shutdownTimeout": -1}, "shutdownTimeout"),
        ({"registry": "r.example.com", "cacheSize": "lots"}, "cacheSize"),
        ({"registry": "r.example.com", "registries": ["x"]}, "registries"),
    ],
)
def test_bad_settings_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        ProxySettings.load(None, environ={}, **values)
    assert str(info.value).startswith(key + ":"), str(info.value)
    assert "\n" not in str(info.value)


# --- credentials ------------------------------------------------------------------------------


def test_credentials() -> None:
    assert credentials_from({}) is None
    assert credentials_from(basic("alice:s3cret:with:colons")) == Credentials(
        "alice", "s3cret:with:colons"
    )
    for headers in (
        {"authorization": ["Bearer abc"]},
        {"authorization": ["Basic !!!"]},
        basic("no-colon"),
        basic(":empty-user"),
        {"authorization": [*basic("a:b")["authorization"], *basic("c:d")["authorization"]]},
    ):
        assert code_of(credentials_from, headers) is ErrorCode.UNAUTHORIZED


def test_credential_errors_do_not_echo_the_header() -> None:
    secret = "Basic " + base64.b64encode(b"alice-with-no-colon-but-secret").decode()
    with pytest.raises(OCIError) as info:
        credentials_from({"authorization": [secret]})
    assert secret.split()[1] not in info.value.message
    assert "secret" not in info.value.message


# --- registries -------------------------------------------------------------------------------


def test_select_registry() -> None:
    served = ["127.0.0.1:5000", "registry.example.com"]
    assert select_registry({}, served) == "127.0.0.1:5000"
    assert select_registry({"ns": ["registry.example.com"]}, served) == "registry.example.com"
    assert select_registry({"ns": ["Registry.Example.COM"]}, served) == "registry.example.com"
    assert select_registry({"ns": ["127.0.0.1:5000", "127.0.0.1:5000"]}, served) == served[0]
    for ns in (
        ["other.example.com"],
        [""],
        ["127.0.0.1"],
        ["127.0.0.1:5000", "registry.example.com"],
    ):
        with pytest.raises(OCIError) as info:
            select_registry({"ns": ns}, served)
        assert (info.value.code, info.value.status) == (ErrorCode.NAME_UNKNOWN, 404)
        assert info.value.message == "registry not served by this proxy"


# --- queries, digests, ranges -----------------------------------------------------------------


def test_metainfo_query() -> None:
    assert metainfo_query({"name": ["team/app"], "digest": [DIGEST]}) == ("team/app", DIGEST)
    assert code_of(metainfo_query, {"digest": [DIGEST]}) is ErrorCode.NAME_INVALID
    assert code_of(metainfo_query, {"name": [""], "digest": [DIGEST]}) is ErrorCode.NAME_INVALID
    assert code_of(metainfo_query, {"name": ["a"]}) is ErrorCode.DIGEST_INVALID
    assert code_of(metainfo_query, {"name": ["A"], "digest": [DIGEST]}) is ErrorCode.NAME_INVALID
    assert code_of(metainfo_query, {"name": ["a/../b"], "digest": [DIGEST]}) is (
        ErrorCode.NAME_INVALID
    )
    assert code_of(metainfo_query, {"name": ["a", "b"], "digest": [DIGEST]}) is (
        ErrorCode.NAME_INVALID
    )
    assert code_of(metainfo_query, {"name": ["a"], "digest": ["sha256:12"]}) is (
        ErrorCode.DIGEST_INVALID
    )


def test_blob_digest_is_sha256_only() -> None:
    assert blob_digest(DIGEST) == DIGEST
    assert code_of(blob_digest, "sha512:" + "b" * 128) is ErrorCode.DIGEST_INVALID
    assert code_of(blob_digest, DIGEST.upper()) is ErrorCode.DIGEST_INVALID


def test_requested_range() -> None:
    assert requested_range(None, 100) is None
    assert requested_range("bytes=0-9", 100) == ByteRange(0, 9)
    assert requested_range("bytes=90-", 100) == ByteRange(90, 99)
    assert requested_range("bytes=-10", 100) == ByteRange(90, 99)
    assert requested_range("bytes=0-1,4-5", 100) is None
    assert requested_range("items=0-1", 100) is None
    for header in ("bytes=100-", "bytes=150-", "bytes=100-200", "bytes=-0"):
        with pytest.raises(OCIError) as info:
            requested_range(header, 100)
        assert (info.value.code, info.value.status) == (ErrorCode.RANGE_INVALID, 416)
        assert info.value.headers == {"Content-Range": "bytes */100"}


# --- storage errors, stored metainfo ----------------------------------------------------------


def test_storage_errors_are_5xx() -> None:
    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), "writing")
    assert (full.code, full.status) == (ErrorCode.UNKNOWN, 507)
    quota = storage_error(CacheFullError("quota"), "making room")
    assert quota.status == 507
    other = storage_error(OSError(errno.EIO, "I/O error"), "reading")
    assert other.status == 500
    assert "I/O error" in other.message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(0, 10**12))
@example("bytes=\u0663-", 2)
def test_requested_range_is_inside_the_blob_none_or_range_invalid(header: str, size: int) -> None:
    error: OCIError | None = None
    try:
        got = requested_range(header, size)
    except OCIError as exc:
        error, got = exc, None
    if error is not None:
        assert (error.code, error.status) == (ErrorCode.RANGE_INVALID, 416)
        assert error.headers == {"Content-Range": f"bytes */{size}"}
    elif got is not None:
        assert 0 <= got.start <= got.end < size


_VALUES = st.lists(st.text(max_size=20), max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "digest", "ns", "x"]), _VALUES))
@example({"name": ["library/app"], "digest": ["sha256:" + "a" * 64]})
@example({"name": ["library/app"], "digest": ["sha256:" + "a" * 64, "sha256:" + "b" * 64]})
def test_metainfo_query_is_validated_or_a_400(query: dict[str, list[str]]) -> None:
    try:
        name, digest = metainfo_query(query)
    except OCIError as exc:
        error = exc
    else:
        assert query["name"] == [name]
        assert query["digest"] == [digest]
        assert digest.startswith("sha256:")
        return
    assert error.status == 400
    assert error.code in (ErrorCode.NAME_INVALID, ErrorCode.DIGEST_INVALID)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3))
@example([" Registry.Example.com "], ["10.0.0.1:5000", "registry.example.com"])
@example(["a", "b"], ["a", "b"])
def test_select_registry_picks_a_served_one_or_404(ns: list[str], served: list[str]) -> None:
    try:
        chosen = select_registry({"ns": ns}, served)
    except OCIError as exc:
        error = exc
    else:
        assert chosen in served
        assert {value.strip().lower() for value in ns} == {chosen.lower()}
        return
    assert (error.code, error.status) == (ErrorCode.NAME_UNKNOWN, 404)
