"""The demo's origin registry: the CNCF distribution registry, or a small built-in one.

:class:`DistributionOrigin` runs ``docker-registry serve CONFIG`` (CNCF distribution 2.8) on
127.0.0.1 with its access log captured in its log file; the demo pushes the image into it with
``skopeo copy --preserve-digests``. What it sent is read back from the access log.

:class:`BuiltinOrigin` is used when the registry or skopeo is not installed (or when asked): a
read-only OCI distribution pull API for exactly one image, served from the image's OCI layout on
disk by hypercorn on trio inside the demo process. It answers ``GET /v2/``, manifests by tag and by
digest (``GET``/``HEAD``, with ``Content-Type`` and ``Docker-Content-Digest``) and blobs
(``GET``/``HEAD``, single byte ``Range`` → 206), and counts the body bytes it sends per blob.

Both report :class:`BlobStats`: per digest, the blob GETs answered 200/206 and the bytes sent.
It is deliberately independent of ``p2p_common`` (its own routing and ``Range`` parsing): it
stands in for a third-party registry, so it must not share bugs with the code under test.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from tests.demo.image import OCI_MANIFEST, DemoImage
from tests.realparts.procs import ManagedProcess, clean_env, free_port

__all__ = [
    "BlobStats",
    "BuiltinOrigin",
    "DistributionOrigin",
    "OriginError",
    "parse_range",
    "push_with_skopeo",
    "serve_builtin",
    "launch_distribution",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("p2p.demo.origin")

FILE_CHUNK = 1024 * 1024
"""Blob bytes read (in a worker thread) and sent at a time."""
API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_ROUTE = re.compile(rf"^/v2/(?P<name>{_NAME})/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class OriginError(RuntimeError):
    """The origin could not be started, filled or read."""


@dataclass
class BlobStats:
    """What an origin served: per blob digest, GETs answered 200/206 and body bytes sent; and
    how many manifest GETs it answered 200."""

    gets: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes: collections.Counter[str] = field(default_factory=collections.Counter)
    manifest_gets: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_gets(self) -> int:
        return sum(self.gets.values())

    def since(self, earlier: BlobStats) -> BlobStats:
        """What was served after ``earlier`` was taken."""
        return BlobStats(
            self.gets - earlier.gets,
            self.bytes - earlier.bytes,
            self.manifest_gets - earlier.manifest_gets,
        )


# --- the built-in origin ------------------------------------------------------------------------


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` (inclusive) of a single ``bytes=`` range within ``size`` bytes.

    ``None`` means "the whole blob": no header, or one that is not a single byte range (RFC 9110
    lets a server ignore those). Raises :class:`ValueError` for a range that selects nothing of
    the blob (the caller answers 416).
    """
    if header is None:
        return None
    match = _RANGE.match(header.strip().replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise ValueError(f"range {header!r} selects nothing")
        return max(0, size - suffix), size - 1
    start = int(first)
    if last != "" and int(last) < start:
        return None  # not a valid range: ignored
    if start >= size:
        raise ValueError(f"range {header!r} starts beyond {size} bytes")
    end = size - 1 if last == "" else int(last)
    return start, min(end, size - 1)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


class BuiltinOrigin:
    """An ASGI app serving one :class:`DemoImage` read-only (see the module docstring)."""

    def __init__(
        self, image: DemoImage, access_log: Path | None = None, *, rate: float | None = None
    ) -> None:
        """``rate`` caps the blob bytes per second sent altogether (a slow origin)."""
        self.image = image
        self.rate = rate
        self._next_send = 0.0
        self._blobs = image.blobs()
        self.stats = BlobStats()
        self.manifest_gets = 0
        self._log: TextIO | None = None
        if access_log is not None:
            access_log.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(access_log, "a", encoding="utf-8")  # noqa: SIM115 (close())

    def close(self) -> None:
        """Close the access log."""
        if self._log is not None:
            self._log.close()
            self._log = None

    async def blob_stats(self, sizes: dict[str, int] | None = None) -> BlobStats:
        """A copy of the counters (``sizes`` is unused: the counters are exact)."""
        return BlobStats(
            collections.Counter(self.stats.gets),
            collections.Counter(self.stats.bytes),
            self.manifest_gets,
        )

    def _access(self, scope: Scope, status: int, sent: int) -> None:
        if self._log is None:
            return
        client = scope.get("client") or ("-", 0)
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        self._log.write(f'{client[0]} - - [{stamp}] "{scope["method"]} {target}" {status} {sent}\n')
        self._log.flush()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status, sent = await self._route(scope, send)
        self._access(scope, status, sent)

    async def _respond(
        self,
        send: Send,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        *,
        head: bool = False,
        length: int | None = None,
    ) -> int:
        pairs = [API_VERSION, *((k.encode(), v.encode()) for k, v in headers)]
        pairs.append((b"content-length", str(len(body) if length is None else length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": pairs})
        await send({"type": "http.response.body", "body": b"" if head else body})
        return 0 if head else len(body)

    async def _error(
        self,
        send: Send,
        status: int,
        code: str,
        message: str,
        *,
        head: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> tuple[int, int]:
        headers = [("content-type", "application/json; charset=utf-8"), *(extra or [])]
        sent = await self._respond(send, status, headers, _error_body(code, message), head=head)
        return status, sent

    async def _route(self, scope: Scope, send: Send) -> tuple[int, int]:
        method = scope["method"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return await self._error(
                send, 405, "UNSUPPORTED", "this origin is read-only", head=False
            )
        path = scope["path"]
        if path in ("/v2", "/v2/"):
            headers = [("content-type", "application/json; charset=utf-8")]
            return 200, await self._respond(send, 200, headers, b"{}", head=head)
        match = _ROUTE.match(path)
        if match is None:
            return await self._error(send, 404, "UNSUPPORTED", "no such endpoint", head=head)
        if match["name"] != self.image.repository:
            return await self._error(
                send, 404, "NAME_UNKNOWN", "repository name not known to registry", head=head
            )
        if match["kind"] == "manifests":
            return await self._manifest(scope, send, match["ref"], head=head)
        return await self._blob(scope, send, match["ref"], head=head)

    async def _manifest(
        self, scope: Scope, send: Send, reference: str, *, head: bool
    ) -> tuple[int, int]:
        image = self.image
        if reference not in (image.tag, image.manifest_digest):
            return await self._error(send, 404, "MANIFEST_UNKNOWN", "manifest unknown", head=head)
        accepted = [
            item.split(";")[0].strip().lower()
            for name, value in scope.get("headers", [])
            if name.lower() == b"accept"
            for item in value.decode("latin-1").split(",")
        ]
        if accepted and not {OCI_MANIFEST, "*/*"} & set(accepted):
            # What distribution answers a client that does not accept OCI manifests.
            return await self._error(
                send,
                404,
                "MANIFEST_UNKNOWN",
                "OCI manifest found, but accept header does not support OCI manifests",
                head=head,
            )
        if not head:
            self.manifest_gets += 1
        headers = [
            ("content-type", image.manifest_media_type),
            ("docker-content-digest", image.manifest_digest),
            ("etag", f'"{image.manifest_digest}"'),
        ]
        return 200, await self._respond(send, 200, headers, image.manifest, head=head)

    async def _pace(self, size: int) -> None:
        """With a ``rate``, wait for this chunk's turn: chunks of all requests go out one after
        another, each taking ``size / rate`` seconds."""
        if not self.rate:
            return
        when = max(self._next_send, trio.current_time())
        self._next_send = when + size / self.rate
        await trio.sleep_until(when)

    async def _blob(self, scope: Scope, send: Send, digest: str, *, head: bool) -> tuple[int, int]:
        blob = self._blobs.get(digest)
        if blob is None:
            return await self._error(
                send, 404, "BLOB_UNKNOWN", "blob unknown to registry", head=head
            )
        range_header = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"range"),
            None,
        )
        try:
            wanted = parse_range(range_header, blob.size)
        except ValueError as exc:
            return await self._error(
                send,
                416,
                "RANGE_INVALID",
                str(exc),
                head=head,
                extra=[("content-range", f"bytes */{blob.size}")],
            )
        first, last = (0, blob.size - 1) if wanted is None else wanted
        length = last - first + 1 if blob.size else 0
        status = 200 if wanted is None else 206
        headers = [
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", blob.digest),
            ("accept-ranges", "bytes"),
            ("etag", f'"{blob.digest}"'),
        ]
        if wanted is not None:
            headers.append(("content-range", f"bytes {first}-{last}/{blob.size}"))
        if head:
            await self._respond(send, status, headers, head=True, length=length)
            return status, 0
        pairs = [API_VERSION, *((k.encode(), v.encode()) for k, v in headers)]
        pairs.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": status, "headers": pairs})
        self.stats.gets[blob.digest] += 1
        sent = 0
        fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            offset, end = first, first + length
            while offset < end:
                size = min(FILE_CHUNK, end - offset)
                data = await trio.to_thread.run_sync(os.pread, fd, size, offset)
                if len(data) != size:
                    raise OriginError(f"{blob.path}: short read at {offset}")
                offset += size
                await self._pace(size)
                # Counted when handed to the server: the client may have it all before the
                # send returns.
                sent += size
                self.stats.bytes[blob.digest] += size
                await send({"type": "http.response.body", "body": data, "more_body": offset < end})
            if length == 0:
                await send({"type": "http.response.body", "body": b""})
        finally:
            os.close(fd)
        return status, sent


async def serve_builtin(
    origin: BuiltinOrigin,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``origin`` with hypercorn until cancelled; reports the bound port."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = log
    config.include_server_header = False
    config.keep_alive_timeout = 60
    config.graceful_timeout = 1

    async def started(task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(
            cast(Any, origin), config, shutdown_trigger=trio.sleep_forever, task_status=task_status
        )

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(started)
        task_status.started(int(binds[0].rpartition(":")[2]))


# --- the CNCF distribution registry -------------------------------------------------------------

_QUOTED = r'"((?:[^"\\]|\\.)*)"'
_COMBINED = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<target>\S+) (?P<proto>[^"]+)" '
    r"(?P<status>\d{3}) (?P<size>\d+|-) " + _QUOTED + " " + _QUOTED + r"\s*$"
)
_BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[a-f0-9]{64})$")
_MANIFEST_PATH = re.compile(r"^/v2/.+/manifests/[^/]+$")


def blob_stats_from_access_log(text: str, sizes: dict[str, int] | None = None) -> BlobStats:
    """Blob GETs answered 200/206 and their bytes, and manifest GETs answered 200, from
    combined-format access log lines.

    The logged response size is used; where it is ``-``, the blob's size from ``sizes``.
    """
    stats = BlobStats()
    for line in text.splitlines():
        match = _COMBINED.match(line)
        if match is None or match["method"] != "GET" or match["status"] not in ("200", "206"):
            continue
        path = match["target"].partition("?")[0]
        if _MANIFEST_PATH.match(path) and match["status"] == "200":
            stats.manifest_gets += 1
        blob = _BLOB_PATH.match(path)
        if blob is None:
            continue
        digest = blob["digest"]
        stats.gets[digest] += 1
        logged = match["size"]
        stats.bytes[digest] += int(logged) if logged != "-" else (sizes or {}).get(digest, 0)
    return stats


@dataclass
class DistributionOrigin:
    """A running ``docker-registry`` (CNCF distribution 2.8)."""

    port: int
    daemon: ManagedProcess
    version: str

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    async def blob_stats(self, sizes: dict[str, int] | None = None) -> BlobStats:
        """Blob GETs served so far, from the access log.

        The registry logs a request just after answering it: a marker request is sent and the
        log is read once the marker shows up, so every earlier request is in it.
        """
        marker = uuid.uuid4().hex
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            await client.get(f"{self.url}/v2/", params={"p2p-demo-log-marker": marker})
        with trio.move_on_after(5):
            while marker not in self._log_text():  # noqa: ASYNC110 (polling a file)
                await trio.sleep(0.02)
        return blob_stats_from_access_log(self._log_text(), sizes)

    def _log_text(self) -> str:
        return self.daemon.log_path.read_text(errors="replace")

    async def wait_ready(self) -> None:
        """Wait until ``/v2/`` answers 200 (the caller bounds the wait); :class:`OriginError`
        if the registry exits first."""
        async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
            while True:
                if self.daemon.returncode is not None:
                    raise OriginError(
                        f"docker-registry exited with status {self.daemon.returncode} at "
                        f"start-up (log: {self.daemon.log_path})"
                    )
                try:
                    if (await client.get(f"{self.url}/v2/")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


def distribution_config(root: Path, port: int) -> dict[str, Any]:
    """A minimal registry configuration: filesystem storage, 127.0.0.1, access log on."""
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # draintimeout: SIGTERM drains connections and exits 0 (without it, SIGTERM kills).
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex, "draintimeout": "2s"},
        "health": {"storagedriver": {"enabled": False}},
    }


def distribution_version(binary: str) -> str:
    """``2.8.2+ds1`` from ``docker-registry --version`` (``?`` if it cannot be told)."""
    try:
        out = subprocess.run(
            [binary, "--version"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
            env=clean_env(),
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.split()[-1].removeprefix("v") if out.split() else "?"


def launch_distribution(workdir: Path, log_path: Path) -> DistributionOrigin:
    """Start ``docker-registry serve`` on a free port (does not wait: see
    :meth:`DistributionOrigin.wait_ready`). The caller owns the daemon and must stop it."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise OriginError("docker-registry is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    port = free_port()
    config = workdir / "registry.yml"
    config.write_text(json.dumps(distribution_config(root, port), indent=2))  # JSON is YAML
    daemon = ManagedProcess([binary, "serve", str(config)], log_path, name="docker-registry")
    daemon.start()
    return DistributionOrigin(port, daemon, distribution_version(binary))


async def push_with_skopeo(image: DemoImage, origin: DistributionOrigin) -> None:
    """``skopeo copy --preserve-digests oci:LAYOUT:TAG docker://HOST/REPO:TAG``, then check that
    the tag resolves to the image's manifest digest."""
    binary = shutil.which("skopeo")
    if binary is None:
        raise OriginError("skopeo is not installed")
    argv = [
        binary,
        "--insecure-policy",  # no dependency on /etc/containers/policy.json
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{image.layout}:{image.tag}",
        f"docker://{origin.host}/{image.reference}",
    ]
    done = await trio.run_process(
        argv, capture_stdout=True, capture_stderr=True, check=False, env=clean_env()
    )
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise OriginError(
            f"skopeo copy failed (status {done.returncode}): {reason[-1] if reason else '?'}"
        )
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        response = await client.head(
            f"{origin.url}/v2/{image.repository}/manifests/{image.tag}",
            headers={"accept": OCI_MANIFEST},
        )
    got = response.headers.get("docker-content-digest")
    if response.status_code != 200 or got != image.manifest_digest:
        raise OriginError(
            f"after the push, {image.reference} resolves to {got} (HTTP {response.status_code}), "
            f"not {image.manifest_digest}"
        )
