"""The agent's reading of a proxy's error answers (p2p_agent.proxies)."""

from __future__ import annotations

import json

import httpx
from hypothesis import example, given
from hypothesis import strategies as st

from p2p_agent.api import AuthCache
from p2p_agent.proxies import _error_from, _max_age
from p2p_common.oci import ErrorCode

CODES = [code.value for code in ErrorCode]

error_bodies = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda code, message: json.dumps({"errors": [{"code": code, "message": message}]}).encode(),
        st.one_of(st.sampled_from(CODES), st.text(max_size=12)),
        st.text(max_size=20),
    ),
)


@given(status=st.integers(400, 999), body=error_bodies, what=st.sampled_from(["blob", "manifest"]))
@example(status=400, body=b"", what="blob")  # a HEAD answer: no body, no code
@example(status=404, body=b'{"errors":[{"code":"UNKNOWN","message":"?"}]}', what="blob")
def test_every_proxy_error_becomes_a_registry_error(status: int, body: bytes, what: str) -> None:
    error = _error_from(httpx.Response(status, content=body), what)
    assert 400 <= error.status <= 599
    assert error.code is not ErrorCode.UNKNOWN or error.status >= 500
    if status <= 599 and error.code is not ErrorCode.UNKNOWN:
        assert error.status == status  # what the proxy said stands when it can be explained
    assert json.loads(error.body())["errors"][0]["code"] == error.code.value


def test_known_refusals_keep_their_code_and_status() -> None:
    denied = _error_from(httpx.Response(403, content=b""), "blob")
    assert (denied.code, denied.status) == (ErrorCode.DENIED, 403)
    missing = _error_from(httpx.Response(404, content=b""), "manifest")
    assert (missing.code, missing.status) == (ErrorCode.MANIFEST_UNKNOWN, 404)
    body = b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such repository"}]}'
    named = _error_from(httpx.Response(404, content=body), "blob")
    assert (named.code, named.status, named.message) == (
        ErrorCode.NAME_UNKNOWN,
        404,
        "no such repository",
    )
    unexplained = _error_from(httpx.Response(400, content=b""), "blob")
    assert (unexplained.code, unexplained.status) == (ErrorCode.UNKNOWN, 502)


@given(st.text(max_size=40))
@example("12.5")
@example("nan")
@example("-1")
@example("inf")
def test_a_proxy_max_age_is_a_finite_non_negative_number_or_nothing(value: str) -> None:
    seconds = _max_age(value)
    if seconds is not None:
        assert 0 <= seconds < float("inf")
        assert seconds == float(value)
    assert _max_age("12.5") == 12.5
    assert _max_age(None) is None


def test_the_agent_keeps_a_grant_no_longer_than_the_proxy_may() -> None:
    cache = AuthCache(ttl=60.0)
    key = ("fp", "reg", "repo", "sha256:" + "1" * 64)
    cache.put(key, 5, now=0.0, max_age=10.0)  # the proxy's grant had 10 s left
    assert cache.get(key, 9.9) == 5
    assert cache.get(key, 10.0) is None
    cache.put(key, 5, now=0.0, max_age=None)  # an older proxy that does not say: our own TTL
    assert cache.get(key, 59.9) == 5
    cache.put(key, 6, now=100.0, max_age=1000.0)  # never longer than our own TTL
    assert cache.get(key, 160.0) is None
    cache.put(key, 7, now=200.0, max_age=0.0)  # a proxy that does not cache: neither do we
    assert cache.get(key, 200.0) is None
