"""The CNCF distribution registry 2.8 (``docker-registry``) as a real origin for tests.

:func:`run_registry` starts ``docker-registry serve CONFIG.yml`` on 127.0.0.1 (a free
port) with a fresh storage root in one of three auth modes:

- ``none``: anyone may pull and push;
- ``htpasswd``: HTTP Basic against a bcrypt file made with ``htpasswd -Bbn``;
- ``token``: the Docker bearer-token flow against a :class:`TokenServer` started here
  (or passed in).

Optionally with TLS (``tls=True``): a throw-away CA signs a certificate for 127.0.0.1;
:attr:`Registry.ca_file` is that CA. In token mode the token server then serves https with the
same certificate (an https registry's realm must be https for the p2p proxy).

The registry writes an Apache "combined" access log line to stdout for every request
(its own JSON log goes to stderr; both land in ``registry.log``);
:meth:`Registry.access_log` parses it and :meth:`Registry.blob_gets` counts, per digest,
the blob GETs the registry served, so a test can assert that each blob left the
origin exactly once.

Processes are :class:`tests.realparts.procs.ManagedProcess`: stopped by PID (process
group) when the ``with`` block ends.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ipaddress
import json
import re
import ssl
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.realparts.procs import ManagedProcess, clean_env, free_port, require
from tests.realparts.tokenserver import Rights, TokenServer

__all__ = [
    "DEFAULT_RIGHTS",
    "DEFAULT_USERS",
    "AccessEntry",
    "AuthMode",
    "Registry",
    "count_blob_gets",
    "free_port",
    "make_tls_files",
    "parse_access_log",
    "registry_config",
    "require",
    "run_registry",
    "write_htpasswd",
]

AuthMode = Literal["none", "htpasswd", "token"]

DEFAULT_USERS: Mapping[str, str] = {"alice": "alice-secret", "bob": "bob-secret"}
"""alice may pull and push ``private/*``; bob may only pull ``public/*`` (token mode)."""
DEFAULT_RIGHTS: Rights = {
    "alice": {"private/*": {"pull", "push"}, "public/*": {"pull", "push"}},
    "bob": {"public/*": {"pull"}},
    "": {"public/*": {"pull"}},
}


def wait_for_http(
    daemon: ManagedProcess,
    port: int,
    path: str = "/",
    *,
    tls_context: ssl.SSLContext | None = None,
    timeout: float = 20.0,
) -> None:
    """Wait until something answers HTTP on 127.0.0.1:port (any status)."""

    def answers() -> bool:
        conn = _connection(port, tls_context)
        try:
            conn.request("GET", path)
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    daemon.wait_until(answers, timeout, f"HTTP on 127.0.0.1:{port}")


def _connection(port: int, tls_context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if tls_context is not None:
        return http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=tls_context)
    return http.client.HTTPConnection("127.0.0.1", port, timeout=5)


# --- TLS material -------------------------------------------------------------------------------


def make_tls_files(
    workdir: Path, *, dns_names: Sequence[str] = ("localhost",), ip: str | None = "127.0.0.1"
) -> tuple[Path, Path, Path]:
    """(ca/ca.crt, server-cert.pem, server-key.pem): a CA and a certificate it signed for
    ``ip`` (127.0.0.1) and ``dns_names`` (localhost)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2p test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip or dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *([x509.IPAddress(ipaddress.ip_address(ip))] if ip else []),
                    *(x509.DNSName(name) for name in dns_names),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    # The CA alone in its directory, named *.crt: skopeo's --*-cert-dir reads *.crt as
    # CAs and *.cert/*.key as client certificate pairs.
    (workdir / "ca").mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = (
        workdir / "ca" / "ca.crt",
        workdir / "server-cert.pem",
        workdir / "server-key.pem",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


# --- the access log -----------------------------------------------------------------------------

_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_COMBINED_RE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<target>\S+) (?P<proto>[^"]+)" '
    r"(?P<status>\d{3}) (?P<size>\d+|-) " + _QUOTED + " " + _QUOTED + r"\s*$"
)
_BLOB_PATH_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[A-Za-z0-9=_-]+)$")


@dataclass(frozen=True)
class AccessEntry:
    """One line of the registry's access log."""

    method: str
    path: str
    query: str
    status: int
    size: int
    user_agent: str


def parse_access_log(text: str) -> list[AccessEntry]:
    """Parse the combined-format lines of ``text``; other lines are ignored."""
    entries = []
    for line in text.splitlines():
        match = _COMBINED_RE.match(line)
        if not match:
            continue
        path, _, query = match["target"].partition("?")
        size = match["size"]
        entries.append(
            AccessEntry(
                method=match["method"],
                path=path,
                query=query,
                status=int(match["status"]),
                size=0 if size == "-" else int(size),
                user_agent=match[10],
            )
        )
    return entries


def count_blob_gets(
    entries: Iterable[AccessEntry],
    repository: str | None = None,
    statuses: Iterable[int] | None = (200, 206),
) -> Counter[str]:
    """Blob GETs per digest, of ``repository`` (or any), with one of ``statuses`` (or any)."""
    wanted = None if statuses is None else set(statuses)
    counts: Counter[str] = Counter()
    for entry in entries:
        if entry.method != "GET" or (wanted is not None and entry.status not in wanted):
            continue
        match = _BLOB_PATH_RE.match(entry.path)
        if match and (repository is None or match["repo"] == repository):
            counts[match["digest"]] += 1
    return counts


# --- the registry -------------------------------------------------------------------------------


@dataclass
class Registry:
    """A running registry: ``url`` is ``http(s)://127.0.0.1:PORT``, ``host`` ``127.0.0.1:PORT``."""

    port: int
    auth: AuthMode
    root: Path
    daemon: ManagedProcess
    users: Mapping[str, str] = field(default_factory=dict)
    token_server: TokenServer | None = None
    ca_file: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca_dir(self) -> Path | None:
        """The directory holding only the CA (for skopeo's ``--src/dest-cert-dir``)."""
        return None if self.ca_file is None else self.ca_file.parent

    @property
    def scheme(self) -> str:
        return "https" if self.ca_file is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.ca_file is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file))

    def sync_log(self, timeout: float = 5.0) -> None:
        """Make sure the log holds every request answered so far.

        The registry writes a request's log line just after the response; a marker
        request, sent after the earlier responses were read, shows up after them.
        """
        marker = uuid.uuid4().hex
        conn = _connection(self.port, self._tls_context())
        try:
            conn.request("GET", f"/v2/?p2p-log-marker={marker}")
            conn.getresponse().read()
        finally:
            conn.close()
        self.daemon.wait_until(
            lambda: marker in self._log_text(), timeout, "the marker request in the access log"
        )

    def _log_text(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")

    def access_log(self, *, sync: bool = True) -> list[AccessEntry]:
        """Every request the registry logged (after :meth:`sync_log` unless told not to)."""
        if sync:
            self.sync_log()
        return parse_access_log(self._log_text())

    def blob_gets(
        self, repository: str | None = None, statuses: Iterable[int] | None = (200, 206)
    ) -> Counter[str]:
        """Per digest, how many blob GETs the registry served (2xx by default)."""
        return count_blob_gets(self.access_log(), repository, statuses)

    def basic_auth_header(self, user: str) -> str:
        raw = f"{user}:{self.users[user]}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    """A bcrypt htpasswd file made by ``htpasswd -Bbn`` (the only kind distribution accepts)."""
    htpasswd = require("htpasswd")
    lines = []
    for user, password in users.items():
        out = subprocess.run(
            [htpasswd, "-Bbn", "-C", "5", user, password],
            check=True,
            capture_output=True,
            text=True,
            env=clean_env(),
        ).stdout
        lines.append(out.strip())
    path.write_text("\n".join(lines) + "\n")


def registry_config(
    root: Path,
    port: int,
    auth: Mapping[str, Any] | None,
    tls: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """The registry's configuration (written as JSON, which its YAML parser reads)."""
    http_section: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex}
    if tls is not None:
        http_section["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http_section,
        "health": {"storagedriver": {"enabled": False}},
    }
    if auth is not None:
        config["auth"] = dict(auth)
    return config


@contextmanager
def run_registry(
    workdir: Path,
    *,
    auth: AuthMode = "none",
    users: Mapping[str, str] | None = None,
    rights: Rights | None = None,
    token_server: TokenServer | None = None,
    tls: bool = False,
) -> Iterator[Registry]:
    """Start a registry under ``workdir``; stop it (by PID) on exit.

    ``users`` default to :data:`DEFAULT_USERS`; in token mode a :class:`TokenServer` with
    ``rights`` (default :data:`DEFAULT_RIGHTS`) is started unless one is passed.
    """
    binary = require("docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    users = dict(DEFAULT_USERS if users is None else users)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    port = free_port()
    ca_file: Path | None = None
    tls_files: tuple[Path, Path] | None = None
    if tls:
        ca_file, cert, key = make_tls_files(workdir)
        tls_files = (cert, key)

    with _token_server(workdir, auth, users, rights, token_server, tls_files) as tokens:
        auth_section: dict[str, Any] | None = None
        if auth == "htpasswd":
            htpasswd = workdir / "htpasswd"
            write_htpasswd(htpasswd, users)
            auth_section = {"htpasswd": {"realm": "p2p-test-registry", "path": str(htpasswd)}}
        elif auth == "token":
            assert tokens is not None
            auth_section = tokens.registry_auth_config()
        config = workdir / "registry.yml"
        config.write_text(
            json.dumps(registry_config(root, port, auth_section, tls_files), indent=2)
        )
        daemon = ManagedProcess([binary, "serve", str(config)], workdir / "registry.log")
        registry = Registry(port, auth, root, daemon, users, tokens, ca_file)
        with daemon:
            wait_for_http(daemon, port, "/v2/", tls_context=registry._tls_context())
            yield registry


@contextmanager
def _token_server(
    workdir: Path,
    auth: AuthMode,
    users: Mapping[str, str],
    rights: Rights | None,
    given: TokenServer | None,
    tls_files: tuple[Path, Path] | None = None,
) -> Iterator[TokenServer | None]:
    if auth != "token":
        yield None
    elif given is not None:
        yield given
    else:
        server = TokenServer(
            users=users, rights=DEFAULT_RIGHTS if rights is None else rights, tls_files=tls_files
        )
        with server.running(workdir / "token-server"):
            yield server
