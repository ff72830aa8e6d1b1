"""A Docker/OCI bearer-token server for the CNCF distribution registry's ``auth.token`` mode.

It runs in a thread of the test process (stdlib ``http.server``) and answers
``GET /token?service=S&scope=repository:NAME:pull[,push]&account=U`` with an ES256 JWT
that distribution 2.8 accepts:

- header ``{"typ": "JWT", "alg": "ES256", "kid": <libtrust key id>}``; the key id is the
  base32 of the first 30 bytes of sha256(SubjectPublicKeyInfo DER), in groups of four
  joined by ``:``; the registry finds the key by this id among the certificates of its
  ``rootcertbundle``;
- claims ``iss``, ``sub`` (the account, empty for anonymous), ``aud`` (the service),
  ``exp``, ``nbf``, ``iat``, ``jti`` and ``access: [{type, name, actions}]``;
- signature: raw ``r || s`` (2 x 32 bytes big-endian), not DER.

The body is ``{"token", "access_token", "expires_in", "issued_at"}``. Besides the Docker
``GET`` flow it answers the OAuth2 ``POST`` password grant (form fields ``grant_type=password``,
``username``, ``password``, ``service``, ``scope``), which containerd uses when it has credentials.

Users have passwords and per-repository rights (``fnmatch`` patterns); the account
``""`` holds what anonymous callers may do. A user asking for more than they may do
gets a token carrying only what they may do (what docker_auth and Docker Hub do), so
the registry then answers 401 ``insufficient_scope``. A wrong password gets 401 from the
token server itself. Every request is recorded in :attr:`TokenServer.requests`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import fnmatch
import hashlib
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

DEFAULT_SERVICE = "p2p-test-registry"
DEFAULT_ISSUER = "p2p-test-token-issuer"

Rights = Mapping[str, Mapping[str, frozenset[str] | set[str]]]
"""account (``""`` = anonymous) -> repository pattern (fnmatch) -> allowed actions."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key id libtrust (and so distribution) derives from a public key."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def sign_jwt(key: ec.EllipticCurvePrivateKey, kid: str, claims: Mapping[str, Any]) -> str:
    """An ES256 JWS compact serialisation with a raw r||s signature."""
    header = {"typ": "JWT", "alg": "ES256", "kid": kid}
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    )
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def self_signed_certificate(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    account: str
    """The authenticated account, ``""`` for anonymous (or for a refused password)."""
    scopes: tuple[str, ...]
    status: int
    granted: tuple[tuple[str, tuple[str, ...]], ...]
    """(repository, actions) the issued token carries; empty when refused."""
    method: str = "GET"
    """``GET`` (the Docker token flow) or ``POST`` (the OAuth2 password grant)."""


@dataclass
class TokenServer:
    """Start with :meth:`running` (context manager); see the module docstring."""

    users: Mapping[str, str]
    rights: Rights
    service: str = DEFAULT_SERVICE
    issuer: str = DEFAULT_ISSUER
    expires_in: int = 300
    """Lifetime of issued tokens in seconds; may be changed while running."""
    requests: list[TokenRequest] = field(default_factory=list)
    port: int = 0
    cert_path: Path | None = None
    tls_files: tuple[Path, Path] | None = None
    """(certificate chain, key) in PEM: serve https instead of http."""
    _key: ec.EllipticCurvePrivateKey = field(
        init=False, repr=False, default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    @property
    def realm(self) -> str:
        scheme = "http" if self.tls_files is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}/token"

    @property
    def key_id(self) -> str:
        return libtrust_key_id(self._key.public_key())

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def issued_count(self) -> int:
        """How many tokens were issued (requests answered 200)."""
        with self._lock:
            return sum(1 for r in self.requests if r.status == 200)

    def registry_auth_config(self) -> dict[str, Any]:
        """The registry's ``auth`` section for this server."""
        assert self.cert_path is not None, "start the token server first"
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert_path),
            }
        }

    # --- the decision, pure ---------------------------------------------------------------

    def allowed_actions(self, account: str, repository: str) -> set[str]:
        allowed: set[str] = set()
        for pattern, actions in self.rights.get(account, {}).items():
            if fnmatch.fnmatchcase(repository, pattern):
                allowed |= set(actions)
        return allowed

    def grant(self, account: str, scopes: list[str]) -> list[tuple[str, tuple[str, ...]]]:
        granted: list[tuple[str, tuple[str, ...]]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            allowed = self.allowed_actions(account, name)
            keep = tuple(a for a in wanted if a in allowed or "*" in allowed)
            if keep:
                granted.append((name, keep))
        return granted

    def issue(self, account: str, granted: list[tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": account,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [
                {"type": "repository", "name": name, "actions": list(actions)}
                for name, actions in granted
            ],
        }
        token = sign_jwt(self._key, self.key_id, claims)
        issued_at = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at,
        }

    def check_basic(self, header: str | None) -> tuple[bool, str]:
        """(ok, account) for an Authorization header; no header is the anonymous account."""
        if header is None:
            return True, ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, ""
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False, ""
        user, colon, password = decoded.partition(":")
        expected = self.users.get(user)
        if not colon or expected is None:
            return False, ""
        if not secrets.compare_digest(expected.encode(), password.encode()):
            return False, ""
        return True, user

    def record(self, entry: TokenRequest) -> None:
        with self._lock:
            self.requests.append(entry)

    # --- the HTTP shell -------------------------------------------------------------------

    @contextmanager
    def running(self, workdir: Path) -> Iterator[TokenServer]:
        """Serve on 127.0.0.1 (a free port) in a thread, https with ``tls_files``; writes the
        certificate bundle."""
        workdir.mkdir(parents=True, exist_ok=True)
        cert = self_signed_certificate(self._key, self.issuer)
        self.cert_path = workdir / "token-root.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        if self.tls_files is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls_files)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="token-server", daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


def _handler_for(owner: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: tests read TokenServer.requests instead

        def _send_json(self, status: int, doc: Mapping[str, Any], extra: Mapping[str, str]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            self._answer("GET", url.path, parse_qs(url.query), self.headers.get("Authorization"))

        def do_POST(self) -> None:
            """The OAuth2 password grant containerd uses when it has credentials."""
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > 65536:
                self.close_connection = True  # the unread body must not become a request
                self._send_json(413, {"errors": [{"code": "SIZE_INVALID"}]}, {})
                return
            form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            grant = form.get("grant_type", [""])[0]
            authorization = self.headers.get("Authorization")
            if grant == "password":
                raw = f"{form.get('username', [''])[0]}:{form.get('password', [''])[0]}"
                authorization = "Basic " + base64.b64encode(raw.encode()).decode()
            elif grant != "":
                owner.record(TokenRequest("", (), 400, (), "POST"))
                self._send_json(400, {"error": "unsupported_grant_type"}, {})
                return
            self._answer("POST", url.path, form, authorization)

        def _answer(
            self,
            method: str,
            path: str,
            query: dict[str, list[str]],
            authorization: str | None,
        ) -> None:
            scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
            if path != "/token":
                owner.record(TokenRequest("", scopes, 404, (), method))
                self._send_json(404, {"errors": [{"code": "NOT_FOUND"}]}, {})
                return
            ok, account = owner.check_basic(authorization)
            if not ok:
                owner.record(TokenRequest("", scopes, 401, (), method))
                self._send_json(
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                    {"WWW-Authenticate": 'Basic realm="token"'},
                )
                return
            if query.get("service", [owner.service])[0] != owner.service:
                owner.record(TokenRequest(account, scopes, 400, (), method))
                self._send_json(400, {"errors": [{"code": "UNSUPPORTED"}]}, {})
                return
            granted = owner.grant(account, list(scopes))
            owner.record(TokenRequest(account, scopes, 200, tuple(granted), method))
            self._send_json(200, owner.issue(account, granted), {})

    return Handler
