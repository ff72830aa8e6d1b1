"""The agent's reading of a proxy's error answers (p2p_agent.proxies)."""

from __future__ import annotations

import json

import httpx
from hypothesis import example, given
from hypothesis import strategies as st

from p2p_agent.proxies import _error_from
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
