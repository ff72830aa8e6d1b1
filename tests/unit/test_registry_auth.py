"""p2p_common.registry_auth: challenges, Basic, token URLs and responses, the token cache."""

from __future__ import annotations

import base64
import contextlib
import json
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_common import registry_auth as ra
from p2p_common.errors import ProtocolError
from p2p_common.registry_auth import AuthSyntaxError, Challenge, Credentials

# --- WWW-Authenticate -----------------------------------------------------------------------------


def test_distribution_bearer_challenge() -> None:
    header = (
        'Bearer realm="http://127.0.0.1:5001/token",service="registry",'
        'scope="repository:team/app:pull",error="insufficient_scope"'
    )
    [challenge] = ra.parse_www_authenticate(header)
    assert challenge.scheme == "bearer"
    assert challenge.realm == "http://127.0.0.1:5001/token"
    assert challenge.service == "registry"
    assert challenge.scope == "repository:team/app:pull"
    assert challenge.error == "insufficient_scope"


def test_basic_challenge_and_case_insensitivity() -> None:
    [challenge] = ra.parse_www_authenticate('BASIC Realm="Registry Realm"')
    assert challenge == Challenge("basic", {"realm": "Registry Realm"})


def test_several_challenges_in_one_header_and_in_several_lines() -> None:
    header = 'Basic realm="a, b", Bearer realm="https://auth.example/token",service=reg, Negotiate'
    challenges = ra.parse_www_authenticate(header)
    assert [c.scheme for c in challenges] == ["basic", "bearer", "negotiate"]
    assert challenges[0].realm == "a, b"
    assert challenges[1].params == {"realm": "https://auth.example/token", "service": "reg"}
    lines = ['Basic realm="x"', 'Bearer realm="https://t/"']
    assert [c.scheme for c in ra.parse_www_authenticate(lines)] == ["basic", "bearer"]


def test_quoted_strings_with_escapes_and_blanks() -> None:
    header = r'Bearer realm = "https://t/?a=1,b=2" , service="a \"quoted\" \\ name" ,scope=x'
    [challenge] = ra.parse_www_authenticate(header)
    assert challenge.realm == "https://t/?a=1,b=2"
    assert challenge.service == 'a "quoted" \\ name'
    assert challenge.scope == "x"


def test_token68() -> None:
    [first, second] = ra.parse_www_authenticate("Negotiate abc+/==, Basic realm=x")
    assert first == Challenge("negotiate", {}, "abc+/==")
    assert second.realm == "x"
    [only] = ra.parse_www_authenticate("Basic YWxhZGRpbjpvcGVuc2VzYW1l")
    assert only.token68 == "YWxhZGRpbjpvcGVuc2VzYW1l"
    # A parameter needs a value: "realm=" alone reads as a token68, with no realm.
    [bare] = ra.parse_www_authenticate("Bearer realm=")
    assert bare == Challenge("bearer", {}, "realm=")
    assert ra.pick_challenge([bare]) is None


@pytest.mark.parametrize(
    "header",
    [
        'Bearer realm="unterminated',
        'Bearer realm="x" service="y"',
        'Bearer realm="x", realm="y"',
        '"Bearer"',
        'Bearer realm="a\x01b"',
        "Négociation",
        "Negotiate abc== trailing",
        "Bearer =x",
    ],
)
def test_malformed_challenges(header: str) -> None:
    with pytest.raises(AuthSyntaxError):
        ra.parse_www_authenticate(header)


def test_challenges_are_bounded() -> None:
    with pytest.raises(AuthSyntaxError, match="too long"):
        ra.parse_www_authenticate("Basic realm=" + "x" * ra.MAX_CHALLENGE_LENGTH)
    with pytest.raises(AuthSyntaxError, match="too many challenges"):
        ra.parse_www_authenticate(", ".join(["Basic"] * (ra.MAX_CHALLENGES + 1)))
    params = ",".join(f"p{i}=v" for i in range(ra.MAX_PARAMS + 1))
    with pytest.raises(AuthSyntaxError, match="too many"):
        ra.parse_www_authenticate("Bearer " + params)


def test_empty_header_has_no_challenges() -> None:
    assert ra.parse_www_authenticate("") == []
    assert ra.parse_www_authenticate([]) == []
    assert ra.parse_www_authenticate(" , ") == []


def test_pick_challenge_prefers_bearer_with_a_realm() -> None:
    basic = Challenge("basic", {"realm": "r"})
    bearer = Challenge("bearer", {"realm": "https://t/"})
    assert ra.pick_challenge([basic, bearer]) == bearer
    assert ra.pick_challenge([Challenge("bearer"), basic]) == basic
    assert ra.pick_challenge([Challenge("negotiate")]) is None
    assert ra.pick_challenge([]) is None


_quoted_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters="\x7f"),
    max_size=30,
)
_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-._~!#$&'*+^`|", min_size=1)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(
    st.lists(
        st.tuples(
            _token.filter(lambda t: t[0].isalpha()),
            st.dictionaries(_token.map(str.lower), _quoted_text, max_size=5),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_round_trip_of_built_challenges(spec: list[tuple[str, dict[str, str]]]) -> None:
    header = ", ".join(
        scheme + (" " + ", ".join(f"{k}={_quote(v)}" for k, v in params.items()) if params else "")
        for scheme, params in spec
    )
    parsed = ra.parse_www_authenticate(header)
    assert [(c.scheme, dict(c.params)) for c in parsed] == [
        (scheme.lower(), params) for scheme, params in spec
    ]


@given(st.text(max_size=300))
def test_challenge_parser_raises_only_its_own_error(text: str) -> None:
    try:
        challenges = ra.parse_www_authenticate(text)
    except AuthSyntaxError:
        return
    assert len(challenges) <= ra.MAX_CHALLENGES


@given(st.lists(st.text(alphabet=' ,="\\abcBearerBasicrealm=\t', max_size=40), max_size=4))
def test_challenge_parser_on_near_misses(lines: list[str]) -> None:
    with contextlib.suppress(AuthSyntaxError):
        ra.parse_www_authenticate(lines)


# --- Basic ----------------------------------------------------------------------------------------


def test_basic_round_trip() -> None:
    creds = Credentials("alice", "pä:ss wörd")
    header = ra.basic_authorization(creds)
    assert header.startswith("Basic ")
    assert ra.parse_basic_authorization(header) == creds
    assert ra.parse_basic_authorization("basic   " + header[6:] + " ") == creds


@pytest.mark.parametrize(
    "header",
    [
        "Bearer abc",
        "Basic",
        "Basic ",
        "Basic !!!",
        "Basic YWxpY2U",  # bad padding
        "Basic " + base64.b64encode(b"alice").decode(),  # no colon
        "Basic " + base64.b64encode(b":pw").decode(),  # empty user
        "Basic " + base64.b64encode(b"\xff\xfe:pw").decode(),  # not UTF-8
        "Basic " + base64.b64encode(b"al\nice:pw").decode(),
        "Basic " + base64.b64encode(b"alice:p\x00w").decode(),
        "Basic YWxp Y2U6cHc=",
        "Basic " + "A" * (ra.MAX_AUTHORIZATION_LENGTH + 1),
    ],
)
def test_malformed_basic(header: str) -> None:
    with pytest.raises(AuthSyntaxError):
        ra.parse_basic_authorization(header)


def test_basic_refuses_to_build_ambiguous_credentials() -> None:
    with pytest.raises(AuthSyntaxError):
        ra.basic_authorization(Credentials("a:b", "pw"))
    with pytest.raises(AuthSyntaxError):
        ra.basic_authorization(Credentials("alice", "pw\r\n"))


@given(st.text(max_size=200))
def test_basic_parser_raises_only_its_own_error(text: str) -> None:
    try:
        creds = ra.parse_basic_authorization(text)
    except AuthSyntaxError:
        return
    assert creds.username
    assert ":" not in creds.username


@given(
    st.text(min_size=1, max_size=40).filter(
        lambda u: ":" not in u and all(0x20 <= ord(c) != 0x7F for c in u)
    ),
    st.text(max_size=40).filter(lambda p: all(0x20 <= ord(c) != 0x7F for c in p)),
)
def test_basic_round_trip_property(username: str, password: str) -> None:
    try:
        username.encode()
        password.encode()
    except UnicodeEncodeError:
        return  # lone surrogates cannot be sent
    creds = Credentials(username, password)
    assert ra.parse_basic_authorization(ra.basic_authorization(creds)) == creds


def test_credentials_hide_the_password() -> None:
    creds = Credentials("alice", "hunter2")
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in str(creds)
    assert "hunter2" not in creds.fingerprint()
    assert creds.fingerprint() == Credentials("alice", "hunter2").fingerprint()
    assert creds.fingerprint() != Credentials("alice", "hunter3").fingerprint()
    assert creds.fingerprint() != Credentials("alic", "ehunter2").fingerprint()
    assert ra.fingerprint(None) == ra.ANONYMOUS


# --- token URL and response -----------------------------------------------------------------------


def test_token_request_url() -> None:
    url = ra.token_request_url(
        "https://auth.example/token",
        service="registry.example",
        scopes=[ra.pull_scope("team/app")],
        account="alice",
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "auth.example", "/token")
    assert parse_qs(parts.query) == {
        "service": ["registry.example"],
        "scope": ["repository:team/app:pull"],
        "account": ["alice"],
    }
    kept = ra.token_request_url("http://t:8080/token?x=1", service=None, scopes=["a b"])
    assert kept == "http://t:8080/token?x=1&scope=a+b"
    assert ra.token_request_url("http://t/token", service=None, scopes=[]) == "http://t/token"


@pytest.mark.parametrize(
    "realm",
    [
        "ftp://t/token",
        "file:///etc/passwd",
        "/token",
        "token",
        "http://",
        "https://user:pw@t/token",
        "http://t:99999/token",
        "http://t/token#frag",
        "http://t/to ken",
        "http://t/töken",
        "javascript:alert(1)",
    ],
)
def test_token_realm_must_be_plain_http(realm: str) -> None:
    with pytest.raises(AuthSyntaxError):
        ra.token_request_url(realm, service="s", scopes=["x"])


@given(st.text(max_size=100))
def test_validate_realm_raises_only_its_own_error(text: str) -> None:
    try:
        assert ra.validate_realm(text) == text
    except AuthSyntaxError:
        return
    assert urlsplit(text).scheme in ("http", "https")


def test_parse_token_response() -> None:
    body = json.dumps(
        {
            "token": "abc.def.ghi",
            "access_token": "abc.def.ghi",
            "expires_in": 300,
            "issued_at": "2026-01-01T00:00:00Z",
        }
    ).encode()
    answer = ra.parse_token_response(body)
    assert (answer.token, answer.expires_in, answer.issued_at) == (
        "abc.def.ghi",
        300,
        "2026-01-01T00:00:00Z",
    )
    assert "abc.def.ghi" not in repr(answer)
    only_oauth = ra.parse_token_response(b'{"access_token": "xyz"}')
    assert (only_oauth.token, only_oauth.expires_in) == ("xyz", ra.DEFAULT_TOKEN_LIFETIME)
    assert ra.parse_token_response(b'{"token": "a", "access_token": "b"}').token == "a"
    assert ra.parse_token_response(b'{"token": "a", "expires_in": 1e9}').expires_in == (
        ra.MAX_TOKEN_LIFETIME
    )
    assert ra.parse_token_response(b'{"token": "a", "expires_in": 59.9}').expires_in == 59


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",
        b'{"token": ""}',
        b'{"token": 5}',
        b'{"token": "a b"}',
        b'{"token": "a\\r\\nX-Evil: 1"}',
        b'{"token": "a", "expires_in": -1}',
        b'{"token": "a", "expires_in": "60"}',
        b'{"token": "a", "expires_in": true}',
        b'{"token": "a", "expires_in": NaN}',
        b'{"token": "a", "expires_in": Infinity}',
        b"[" * 50_000,
        b'{"token": "' + b"a" * (ra.MAX_TOKEN_LENGTH + 1) + b'"}',
        b" " * (ra.MAX_TOKEN_RESPONSE + 1),
    ],
)
def test_malformed_token_responses(body: bytes) -> None:
    with pytest.raises(AuthSyntaxError):
        ra.parse_token_response(body)


@given(st.binary(max_size=300))
def test_token_response_parser_raises_only_its_own_error(data: bytes) -> None:
    try:
        answer = ra.parse_token_response(data)
    except AuthSyntaxError:
        return
    assert 0 <= answer.expires_in <= ra.MAX_TOKEN_LIFETIME


@given(
    st.dictionaries(
        st.sampled_from(["token", "access_token", "expires_in", "issued_at", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    )
)
def test_token_response_parser_on_json_objects(doc: dict[str, object]) -> None:
    with contextlib.suppress(AuthSyntaxError):
        ra.parse_token_response(json.dumps(doc).encode())


def test_errors_are_protocol_errors() -> None:
    assert issubclass(AuthSyntaxError, ProtocolError)


# --- the cache ------------------------------------------------------------------------------------


def test_token_cache_expires_shortly_before_the_token() -> None:
    cache = ra.TokenCache()
    key = ("fp", "repository:a:pull")
    cache.put(key, ra.TokenResponse("t", 300), now=1000.0)
    assert cache.get(key, 1000.0) == "t"
    assert cache.get(key, 1269.9) == "t"
    assert cache.get(key, 1270.0) is None  # 30 s early for long tokens
    assert len(cache) == 0
    cache.put(key, ra.TokenResponse("short", 60), now=0.0)
    assert cache.get(key, 53.9) == "short"
    assert cache.get(key, 54.0) is None  # a tenth early for short ones
    cache.put(key, ra.TokenResponse("dead", 0), now=0.0)
    assert cache.get(key, 0.0) is None


def test_a_token_is_reused_no_longer_than_the_credential_decisions() -> None:
    """A token stands for the password shown to get it: with ``max_age`` (authCacheTtl) a
    changed password stops working then, however long the token server lets it live."""
    cache = ra.TokenCache(max_age=60.0)
    key = ("fp", "repository:a:pull")
    cache.put(key, ra.TokenResponse("t", 86400), now=0.0)
    assert cache.get(key, 59.9) == "t"
    assert cache.get(key, 60.0) is None
    cache.put(key, ra.TokenResponse("short", 20), now=0.0)
    assert cache.get(key, 17.9) == "short"  # the token's own life is shorter: it rules
    assert cache.get(key, 18.0) is None
    off = ra.TokenCache(max_age=0.0)
    off.put(key, ra.TokenResponse("t", 300), now=0.0)
    assert off.get(key, 0.0) is None


def test_token_cache_is_bounded_and_keys_are_separate() -> None:
    cache = ra.TokenCache(max_entries=2)
    cache.put(("a", "s"), ra.TokenResponse("ta", 300), 0.0)
    cache.put(("b", "s"), ra.TokenResponse("tb", 300), 0.0)
    assert cache.get(("a", "s"), 1.0) == "ta"  # a is now the most recent
    cache.put(("c", "s"), ra.TokenResponse("tc", 300), 0.0)
    assert cache.get(("b", "s"), 1.0) is None
    assert cache.get(("a", "s"), 1.0) == "ta"
    assert cache.get(("a", "other"), 1.0) is None
    cache.discard(("a", "s"))
    assert cache.get(("a", "s"), 1.0) is None
