"""Registry authentication, pure: challenges, Basic credentials, the token flow, a token cache.

- :func:`parse_www_authenticate` parses ``WWW-Authenticate`` values (RFC 9110 section 11):
  several challenges in one header or in several lines, ``auth-param`` lists with tokens
  or quoted strings (with ``\\`` escapes and commas inside), or a ``token68``.
- :func:`token_request_url` builds the Docker token request for a ``Bearer`` challenge.
- :func:`parse_basic_authorization` / :func:`basic_authorization` read and write
  ``Authorization: Basic``.
- :func:`parse_token_response` reads the token server's JSON answer.
- :class:`TokenCache` keeps bearer tokens per (credentials fingerprint, scope) until
  shortly before they expire; time is passed in.

Every parser is bounded and raises only :class:`AuthSyntaxError` on bad input.
:class:`Credentials` never shows its password in ``repr`` or ``str``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from p2p_common.errors import ProtocolError
from p2p_common.ttlcache import TTLCache

MAX_CHALLENGE_LENGTH = 8192
"""Longest ``WWW-Authenticate`` value (all lines together) we parse."""
MAX_CHALLENGES = 16
MAX_PARAMS = 32
MAX_AUTHORIZATION_LENGTH = 8192
MAX_TOKEN_RESPONSE = 256 * 1024
MAX_TOKEN_LENGTH = 64 * 1024
MAX_TOKEN_LIFETIME = 24 * 3600
DEFAULT_TOKEN_LIFETIME = 60
"""Seconds a token lives when the server does not say (the Docker token spec's default)."""


class AuthSyntaxError(ProtocolError):
    """A challenge, Authorization header or token response is malformed or too large."""


# --- credentials --------------------------------------------------------------------------------

_PROCESS_KEY = os.urandom(32)


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username and password for an origin registry. Kept in memory only."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<redacted>)"

    __str__ = __repr__

    def fingerprint(self) -> str:
        """A per-process keyed hash identifying these credentials (for cache keys).

        It cannot be reversed or compared across processes, so it may appear in keys
        and debug output; the password itself never does.
        """
        mac = hmac.new(_PROCESS_KEY, digestmod=hashlib.sha256)
        mac.update(self.username.encode("utf-8", "surrogatepass"))
        mac.update(b"\x00")
        mac.update(self.password.encode("utf-8", "surrogatepass"))
        return mac.hexdigest()[:32]


ANONYMOUS = "anonymous"
"""The fingerprint used for requests without credentials."""


def fingerprint(credentials: Credentials | None) -> str:
    return ANONYMOUS if credentials is None else credentials.fingerprint()


def _check_credential_text(value: str, what: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise AuthSyntaxError(f"{what} contains control characters")


def basic_authorization(credentials: Credentials) -> str:
    """The ``Authorization`` header value for HTTP Basic (UTF-8, RFC 7617)."""
    if ":" in credentials.username:
        raise AuthSyntaxError("a Basic username cannot contain ':'")
    _check_credential_text(credentials.username, "the username")
    _check_credential_text(credentials.password, "the password")
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def parse_basic_authorization(value: str) -> Credentials:
    """Parse ``Basic <base64(user:password)>``.

    Refuses another scheme, missing or malformed base64 (strict alphabet and padding),
    non-UTF-8 text, a missing ``:``, an empty username and control characters.
    """
    if len(value) > MAX_AUTHORIZATION_LENGTH:
        raise AuthSyntaxError("Authorization header too long")
    scheme, _, encoded = value.strip(" \t").partition(" ")
    if scheme.lower() != "basic":
        raise AuthSyntaxError("not a Basic Authorization header")
    encoded = encoded.strip(" \t")
    if not _TOKEN68_RE.fullmatch(encoded):
        raise AuthSyntaxError("Basic credentials are not base64")
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthSyntaxError("Basic credentials are not valid base64 of UTF-8 text") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise AuthSyntaxError("Basic credentials have no ':' between user and password")
    if not username:
        raise AuthSyntaxError("Basic credentials have an empty username")
    _check_credential_text(username, "the username")
    _check_credential_text(password, "the password")
    return Credentials(username, password)


# --- WWW-Authenticate ---------------------------------------------------------------------------

_TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68_AT_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Challenge:
    """One authentication challenge: a lowercased scheme and its parameters.

    Parameter names are lowercased; ``token68`` holds a bare token68 value if any.
    """

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)
    token68: str | None = None

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")

    @property
    def error(self) -> str | None:
        """The Bearer ``error`` parameter, e.g. ``insufficient_scope`` or ``invalid_token``."""
        return self.params.get("error")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def skip_ws_commas(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t,":
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self) -> str | None:
        match = _TOKEN_RE.match(self.text, self.pos)
        if not match:
            return None
        self.pos = match.end()
        return match.group()

    def quoted(self) -> str:
        """A quoted-string starting at ``pos`` (the opening quote); returns it unescaped."""
        assert self.text[self.pos] == '"'
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\":
                self.pos += 1
                if self.pos >= len(self.text):
                    break
                char = self.text[self.pos]
            if (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
                raise AuthSyntaxError("control character in a quoted string")
            out.append(char)
            self.pos += 1
        raise AuthSyntaxError("unterminated quoted string")


def _param_ahead(scanner: _Scanner) -> bool:
    """Whether ``token BWS "="`` (an auth-param, not a token68 or a new scheme) starts here."""
    match = _TOKEN_RE.match(scanner.text, scanner.pos)
    if not match:
        return False
    pos = match.end()
    while pos < len(scanner.text) and scanner.text[pos] in " \t":
        pos += 1
    if pos >= len(scanner.text) or scanner.text[pos] != "=":
        return False
    # A value (a token or a quoted string) must follow: "abc==" and "abc=" are token68s.
    after = pos + 1
    while after < len(scanner.text) and scanner.text[after] in " \t":
        after += 1
    return after < len(scanner.text) and (
        scanner.text[after] == '"' or scanner.text[after] in _TCHAR
    )


def _parse_params(scanner: _Scanner, challenge_count: int) -> dict[str, str]:
    params: dict[str, str] = {}
    while True:
        name = scanner.token()
        assert name is not None  # _param_ahead said so
        scanner.skip_ws()
        assert scanner.peek() == "="
        scanner.pos += 1
        scanner.skip_ws()
        if scanner.peek() == '"':
            value = scanner.quoted()
        else:
            token = scanner.token()
            if token is None:
                raise AuthSyntaxError(
                    f"challenge {challenge_count}: parameter {name!r} has no value"
                )
            value = token
        key = name.lower()
        if key in params:
            raise AuthSyntaxError(f"challenge {challenge_count}: parameter {key!r} repeated")
        if len(params) >= MAX_PARAMS:
            raise AuthSyntaxError("too many challenge parameters")
        params[key] = value
        # After a parameter: the end, or a comma then another parameter or a new challenge.
        scanner.skip_ws()
        if scanner.at_end():
            return params
        if scanner.peek() != ",":
            raise AuthSyntaxError(f"challenge {challenge_count}: expected ',' after a parameter")
        scanner.skip_ws_commas()
        if scanner.at_end() or not _param_ahead(scanner):
            return params


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """Parse one or several ``WWW-Authenticate`` header values into challenges, in order."""
    lines = [values] if isinstance(values, str) else list(values)
    if sum(len(line) for line in lines) > MAX_CHALLENGE_LENGTH:
        raise AuthSyntaxError("WWW-Authenticate too long")
    challenges: list[Challenge] = []
    for line in lines:
        scanner = _Scanner(line)
        scanner.skip_ws_commas()
        while not scanner.at_end():
            scheme = scanner.token()
            if scheme is None:
                raise AuthSyntaxError(f"challenge {len(challenges) + 1}: expected a scheme")
            if len(challenges) >= MAX_CHALLENGES:
                raise AuthSyntaxError("too many challenges")
            params: dict[str, str] = {}
            token68: str | None = None
            if scanner.peek() in (" ", "\t"):
                scanner.skip_ws()
                if _param_ahead(scanner):
                    params = _parse_params(scanner, len(challenges) + 1)
                elif not scanner.at_end() and scanner.peek() != ",":
                    match = _TOKEN68_AT_RE.match(scanner.text, scanner.pos)
                    if not match:
                        raise AuthSyntaxError(f"challenge {len(challenges) + 1}: bad credentials")
                    token68 = match.group()
                    scanner.pos = match.end()
                    scanner.skip_ws()
                    if not scanner.at_end() and scanner.peek() != ",":
                        raise AuthSyntaxError("garbage after a token68")
            elif not scanner.at_end() and scanner.peek() != ",":
                raise AuthSyntaxError(f"challenge {len(challenges) + 1}: bad scheme")
            challenges.append(Challenge(scheme.lower(), params, token68))
            scanner.skip_ws_commas()
    return challenges


def pick_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer (with a realm) before Basic; ``None`` if neither."""
    for wanted in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == wanted and (wanted == "basic" or challenge.realm):
                return challenge
    return None


# --- the token flow -----------------------------------------------------------------------------


def pull_scope(repository: str) -> str:
    """``repository:<name>:pull``."""
    return f"repository:{repository}:pull"


def validate_realm(realm: str) -> str:
    """An absolute ``http(s)`` URL with a host and no credentials; raises otherwise."""
    if len(realm) > 2048 or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in realm):
        raise AuthSyntaxError("token realm is not a plain ASCII URL")
    try:
        parts = urlsplit(realm)
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise AuthSyntaxError("token realm is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise AuthSyntaxError("token realm is not an http(s) URL")
    if not parts.hostname:
        raise AuthSyntaxError("token realm has no host")
    if parts.username is not None or parts.password is not None:
        raise AuthSyntaxError("token realm carries credentials")
    if parts.fragment:
        raise AuthSyntaxError("token realm has a fragment")
    return realm


def realm_allowed(realm: str, registry_host: str, allowed: Iterable[str] = ()) -> bool:
    """May credentials for the registry at ``registry_host`` go to the token ``realm``?

    A registry names its token server in its challenge, and the caller's password goes
    there: a registry (or whoever answers in its name) could name any host. Allowed are the
    registry's own host, a host of its parent domain when that has at least two labels
    (``auth.docker.io`` for ``registry-1.docker.io``, never a whole ``.io``), and the hosts
    in ``allowed``. Ports do not matter; names compare without case and trailing dot.
    """
    try:
        host = urlsplit(realm).hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.rstrip(".").lower()
    registry = registry_host.rstrip(".").lower()
    if host == registry or host in {name.rstrip(".").lower() for name in allowed}:
        return True
    labels = registry.split(".")
    if len(labels) < 3 or _is_ip(registry):
        return False
    parent = ".".join(labels[1:])
    return host == parent or host.endswith("." + parent)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def token_request_url(
    realm: str,
    *,
    service: str | None,
    scopes: Sequence[str],
    account: str | None = None,
) -> str:
    """``realm?service=S&scope=A&scope=B[&account=U]`` (keeping a query the realm already has)."""
    validate_realm(realm)
    query: list[tuple[str, str]] = []
    if service is not None:
        query.append(("service", service))
    query.extend(("scope", scope) for scope in scopes)
    if account:
        query.append(("account", account))
    if not query:
        return realm
    separator = "&" if urlsplit(realm).query else ("" if realm.endswith("?") else "?")
    return realm + separator + urlencode(query)


@dataclass(frozen=True, repr=False)
class TokenResponse:
    """A bearer token and how long it lives (seconds from when it was received)."""

    token: str
    expires_in: int
    issued_at: str | None = None

    def __repr__(self) -> str:
        return f"TokenResponse(token=<redacted>, expires_in={self.expires_in})"


_TOKEN_CHARS_RE = re.compile(r"[\x21-\x7e]+")


def parse_token_response(body: bytes) -> TokenResponse:
    """Parse a token server's JSON: ``token`` or ``access_token``, ``expires_in``, ``issued_at``.

    ``token`` wins when both are present. ``expires_in`` defaults to 60 seconds and is
    capped at a day; the token must be printable ASCII without blanks (it goes into a header).
    """
    if len(body) > MAX_TOKEN_RESPONSE:
        raise AuthSyntaxError("token response too large")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise AuthSyntaxError("token response is not JSON") from None
    if not isinstance(doc, dict):
        raise AuthSyntaxError("token response is not a JSON object")
    token = doc.get("token") or doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise AuthSyntaxError("token response has no token")
    if len(token) > MAX_TOKEN_LENGTH or not _TOKEN_CHARS_RE.fullmatch(token):
        raise AuthSyntaxError("token is too long or has characters a header cannot carry")
    expires_in = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if expires_in is None:
        expires_in = DEFAULT_TOKEN_LIFETIME
    if isinstance(expires_in, float) and math.isfinite(expires_in):
        expires_in = int(expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in < 0:
        raise AuthSyntaxError("token response has a bad expires_in")
    issued_at = doc.get("issued_at")
    return TokenResponse(
        token,
        min(expires_in, MAX_TOKEN_LIFETIME),
        issued_at if isinstance(issued_at, str) and len(issued_at) <= 64 else None,
    )


# --- the token cache ----------------------------------------------------------------------------

AUTH_MAX_AGE_HEADER = "X-P2P-Auth-Max-Age"
"""The proxy's answer to an authorization check carries the seconds its grant may still be
reused; the agent keeps the grant no longer (its cache never adds to the proxy's)."""

MAX_EXPIRY_MARGIN = 30.0
"""A cached token is dropped this many seconds (at most) before it expires."""


def usable_lifetime(expires_in: float) -> float:
    """How long to use a token living ``expires_in`` seconds: a tenth less, at most 30 s less."""
    return max(0.0, expires_in - min(MAX_EXPIRY_MARGIN, expires_in / 10))


class TokenCache:
    """Bearer tokens by key (usually ``(credentials fingerprint, scope)``); LRU-bounded
    (a :class:`~p2p_common.ttlcache.TTLCache`).

    ``now`` is a monotonic clock value supplied by the caller. A token stands for the
    password shown when it was fetched: it is used for at most ``max_age`` seconds (the
    credential decisions' lifetime, ``authCacheTtl``) however long the token server lets it
    live, so a changed password stops working within that time.
    """

    def __init__(self, max_entries: int = 1024, *, max_age: float = math.inf) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self._entries: TTLCache[tuple[str, ...], str] = TTLCache(max_entries)

    def get(self, key: tuple[str, ...], now: float) -> str | None:
        return self._entries.get(key, now)

    def put(self, key: tuple[str, ...], token: TokenResponse, now: float) -> None:
        """Keep ``token`` for its usable lifetime, at most ``max_age`` (none: forget ``key``)."""
        lifetime = min(usable_lifetime(token.expires_in), self.max_age)
        self._entries.set(key, token.token, expires=now + lifetime, now=now)

    def discard(self, key: tuple[str, ...]) -> None:
        self._entries.pop(key)

    def __len__(self) -> int:
        return len(self._entries)
