"""The agent's download records (p2p_agent.downloads) and the credentials they carry."""

from __future__ import annotations

from p2p_agent.downloads import BlobRequest
from p2p_common.registry_auth import Credentials, basic_authorization

DIGEST = "sha256:" + "ab" * 32


def test_a_blob_request_never_shows_its_credentials() -> None:
    authorization = basic_authorization(Credentials("alice", "pull-secret-s3cret"))
    encoded = authorization.split()[1]
    request = BlobRequest("registry.example.com", "team/app", DIGEST, 1234, authorization)
    for text in (repr(request), str(request), f"{request!r}", repr([request]), repr({1: request})):
        assert encoded not in text
        assert "s3cret" not in text
        assert "<redacted>" in text
        assert "team/app" in text
        assert DIGEST in text
    assert request.authorization == authorization  # still there for the proxy


def test_an_anonymous_blob_request_says_so() -> None:
    request = BlobRequest("registry.example.com", "team/app", DIGEST, 1234, None)
    assert "authorization=None" in repr(request)
    assert "<redacted>" not in repr(request)
