"""aria2 (``aria2c`` 1.36) as a real BitTorrent peer, watched over its JSON-RPC interface.

aria2 cannot be told to connect to a peer: it finds peers only through the torrent's trackers
(DHT, LPD and PEX are off), so an aria2 peer always needs a tracker, e.g.
:func:`tests.realparts.opentracker.opentracker`.

Command line (see :func:`aria2_seed` / :func:`aria2_leech`; ``{...}`` filled in per peer)::

    aria2c --no-conf=true --no-netrc=true --enable-rpc=true --rpc-listen-all=false
      --rpc-listen-port={rpc_port} --rpc-secret={random} --stop-with-process={pytest pid}
      --enable-dht=false --enable-dht6=false --bt-enable-lpd=false --enable-peer-exchange=false
      --listen-port={listen_port} --interface={host} --disable-ipv6=true
      --dir={directory} --gid={gid} --file-allocation=none --auto-file-renaming=false
      --show-console-readout=false --enable-color=false
      --summary-interval=0 --console-log-level=warn --log=- --log-level={log_level}
      [--bt-tracker-interval={announce_interval}]
      (seed)  --check-integrity=true --seed-ratio=0.0
      (leech) --seed-time=0 --allow-overwrite=true
      {extra_args...} {workdir}/{name}.torrent

``--interface=127.0.0.1`` binds aria2's BitTorrent listen socket and its outgoing connections
(peers and tracker) to 127.0.0.1; ``--disable-ipv6`` avoids a failing ``[::]`` listen attempt; the
RPC listener is on loopback only (``--rpc-listen-all=false``). ``--seed-ratio=0.0`` alone means
"seed until stopped". ``--stop-with-process`` makes aria2 exit if pytest dies.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.realparts.procs import (
    Completion,
    ManagedProcess,
    ProcessFailedError,
    free_port,
    port_accepts,
    require,
)

__all__ = ["Aria2Peer", "Aria2PeerInfo", "Aria2Status", "LogLevel", "aria2_leech", "aria2_seed"]

LogLevel = Literal["debug", "info", "notice", "warn", "error"]

_RPC_TIMEOUT = 10.0


@dataclass(frozen=True)
class Aria2Status:
    """A snapshot of ``aria2.tellStatus`` for the torrent (lengths in bytes, speeds in B/s)."""

    status: str
    """``active``, ``waiting``, ``paused``, ``error``, ``complete`` or ``removed``."""
    total_length: int
    completed_length: int
    upload_length: int
    download_speed: int
    upload_speed: int
    connections: int
    num_seeders: int
    seeder: bool
    verified_length: int | None
    """Bytes checked so far while aria2 verifies existing data; ``None`` when not checking."""
    error_code: str | None
    error_message: str | None

    @property
    def progress(self) -> float:
        return self.completed_length / self.total_length if self.total_length else 0.0


@dataclass(frozen=True)
class Aria2PeerInfo:
    """One connected peer, from ``aria2.getPeers``."""

    ip: str
    port: int
    seeder: bool
    download_speed: int
    upload_speed: int
    am_choking: bool
    peer_choking: bool


class Aria2Peer:
    """A running ``aria2c``. Build it with :func:`aria2_seed` or :func:`aria2_leech`."""

    def __init__(
        self,
        process: ManagedProcess,
        *,
        seed: bool,
        host: str,
        listen_port: int,
        rpc_port: int,
        secret: str,
        gid: str,
    ) -> None:
        self.process = process
        self.seed = seed
        self.host = host
        self.listen_port = listen_port
        self.rpc_port = rpc_port
        self.gid = gid
        self._secret = secret
        self.ready_at = 0.0
        self.cpu_at_ready = 0.0

    def rpc(self, method: str, *params: Any, timeout: float = _RPC_TIMEOUT) -> Any:
        """Call an aria2 JSON-RPC method (the secret token is added) and return its result."""
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": "h",
                "method": method,
                "params": [f"token:{self._secret}", *params],
            }
        )
        conn = http.client.HTTPConnection("127.0.0.1", self.rpc_port, timeout=timeout)
        try:
            conn.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.process.check_alive()
            self.process.fail(f"RPC {method} failed: {exc!r}")
        finally:
            conn.close()
        if "error" in reply:
            raise RuntimeError(f"aria2 RPC {method}: {reply['error']}")
        return reply["result"]

    def status(self) -> Aria2Status:
        """A snapshot of the torrent's progress and counters."""
        s = self.rpc("aria2.tellStatus", self.gid)
        return Aria2Status(
            status=s["status"],
            total_length=int(s["totalLength"]),
            completed_length=int(s["completedLength"]),
            upload_length=int(s["uploadLength"]),
            download_speed=int(s["downloadSpeed"]),
            upload_speed=int(s["uploadSpeed"]),
            connections=int(s["connections"]),
            num_seeders=int(s.get("numSeeders", 0)),
            seeder=s.get("seeder") == "true",
            verified_length=int(s["verifiedLength"]) if "verifiedLength" in s else None,
            error_code=s.get("errorCode"),
            error_message=s.get("errorMessage"),
        )

    def peers(self) -> list[Aria2PeerInfo]:
        """The connected peers (empty once the download is no longer active)."""
        try:
            raw = self.rpc("aria2.getPeers", self.gid)
        except RuntimeError:  # not active any more
            return []
        return [
            Aria2PeerInfo(
                ip=p["ip"],
                port=int(p["port"]),
                seeder=p["seeder"] == "true",
                download_speed=int(p["downloadSpeed"]),
                upload_speed=int(p["uploadSpeed"]),
                am_choking=p["amChoking"] == "true",
                peer_choking=p["peerChoking"] == "true",
            )
            for p in raw
        ]

    def _check(self, status: Aria2Status) -> None:
        if status.status in ("error", "removed"):
            self.process.fail(
                f"download {status.status}: code {status.error_code}: {status.error_message}"
            )

    def wait_ready(self, timeout: float) -> None:
        """Wait for the RPC port, then (seed) the integrity check, then the peer listen port."""
        self.process.wait_port(self.rpc_port, timeout=timeout)

        def ready() -> bool:
            status = self.status()
            self._check(status)
            if status.verified_length is not None:
                return False  # still checking the seed's data
            listening = port_accepts(self.listen_port, self.host)
            if self.seed and not status.seeder:
                if listening:
                    # aria2 opens its peer port after the check: the check found missing pieces.
                    self.process.fail(
                        f"seed data incomplete or wrong: {status.progress:.1%} of it verifies"
                    )
                return False
            return listening

        self.process.wait_until(ready, timeout, "aria2 to be ready", max_interval=0.1)
        self.ready_at = time.monotonic()
        self.cpu_at_ready = self.process.cpu_seconds()

    def wait_peers(self, count: int = 1, timeout: float = 15.0) -> Aria2Status:
        """Wait until aria2 has at least ``count`` peer connections."""

        def enough() -> Aria2Status | None:
            status = self.status()
            self._check(status)
            return status if status.connections >= count else None

        return self.process.wait_until(enough, timeout, f"{count} aria2 connection(s)")

    def wait_complete(self, timeout: float = 60.0) -> Completion:
        """Wait until aria2 reports the download ``complete`` (all pieces verified, files closed).

        Elapsed and CPU seconds count from when this peer was ready; completion is seen by polling
        every 20 ms, so ``elapsed`` is that much coarser than libtorrent's.
        """
        if self.seed:
            raise RuntimeError("a seed is complete from the start")
        last: list[Aria2Status] = []

        def complete() -> bool:
            status = self.status()
            last[:] = [status]
            self._check(status)
            return status.status == "complete"

        try:
            self.process.wait_until(complete, timeout, "aria2 to complete", max_interval=0.02)
        except ProcessFailedError as exc:
            raise ProcessFailedError(f"{exc}\nlast status: {last}") from None
        finished_at = time.monotonic()
        return Completion(
            elapsed=finished_at - self.ready_at,
            cpu_seconds=self.process.cpu_seconds() - self.cpu_at_ready,
            finished_at=finished_at,
        )

    def cpu_seconds(self) -> float:
        """The aria2c process's CPU seconds so far (from /proc; all threads)."""
        return self.process.cpu_seconds()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop aria2 with SIGTERM (it exits within about a second), SIGKILL after ``timeout``.

        Idempotent. SIGTERM rather than the ``aria2.shutdown``/``aria2.forceShutdown`` RPC
        methods: those schedule the shutdown 3 s later, so they take about 4 s.
        """
        self.process.stop(timeout)

    def __repr__(self) -> str:
        role = "seed" if self.seed else "leech"
        return f"<Aria2Peer {role} {self.host}:{self.listen_port} {self.process!r}>"


def aria2_command(
    binary: str,
    torrent: Path,
    directory: Path,
    *,
    seed: bool,
    host: str,
    listen_port: int,
    rpc_port: int,
    secret: str,
    gid: str,
    log_level: LogLevel,
    announce_interval: int | None,
    extra_args: Sequence[str],
) -> list[str]:
    """The full ``aria2c`` command line (documented in the module docstring)."""
    argv = [
        binary,
        "--no-conf=true",
        "--no-netrc=true",
        "--enable-rpc=true",
        "--rpc-listen-all=false",
        f"--rpc-listen-port={rpc_port}",
        f"--rpc-secret={secret}",
        f"--stop-with-process={os.getpid()}",
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        f"--listen-port={listen_port}",
        f"--interface={host}",
        "--disable-ipv6=true",
        f"--dir={directory}",
        f"--gid={gid}",
        "--file-allocation=none",
        "--auto-file-renaming=false",
        "--show-console-readout=false",
        "--enable-color=false",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--log=-",
        f"--log-level={log_level}",
    ]
    if announce_interval is not None:
        argv.append(f"--bt-tracker-interval={announce_interval}")
    if seed:
        argv += ["--check-integrity=true", "--seed-ratio=0.0"]
    else:
        argv += ["--seed-time=0", "--allow-overwrite=true"]
    argv += [*extra_args, str(torrent)]
    return argv


@contextmanager
def _aria2_peer(
    workdir: Path,
    metainfo: bytes,
    directory: Path,
    *,
    seed: bool,
    name: str,
    host: str,
    listen_port: int | None,
    log_level: LogLevel,
    announce_interval: int | None,
    extra_args: Sequence[str],
    start_timeout: float,
) -> Iterator[Aria2Peer]:
    binary = require("aria2c")
    workdir.mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    torrent = workdir / f"{name}.torrent"
    torrent.write_bytes(metainfo)
    port = listen_port or free_port(host)
    rpc_port = free_port()
    secret = secrets.token_hex(16)
    gid = secrets.token_hex(8)
    argv = aria2_command(
        binary,
        torrent,
        directory.resolve(),
        seed=seed,
        host=host,
        listen_port=port,
        rpc_port=rpc_port,
        secret=secret,
        gid=gid,
        log_level=log_level,
        announce_interval=announce_interval,
        extra_args=extra_args,
    )
    process = ManagedProcess(argv, workdir / f"{name}.log", name=name)
    peer = Aria2Peer(
        process,
        seed=seed,
        host=host,
        listen_port=port,
        rpc_port=rpc_port,
        secret=secret,
        gid=gid,
    )
    with process:
        try:
            peer.wait_ready(start_timeout)
            yield peer
        finally:
            peer.stop()


@contextmanager
def aria2_seed(
    workdir: Path,
    metainfo: bytes,
    data_dir: Path,
    *,
    name: str = "aria2-seed",
    host: str = "127.0.0.1",
    listen_port: int | None = None,
    log_level: LogLevel = "notice",
    announce_interval: int | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = 30.0,
) -> Iterator[Aria2Peer]:
    """Seed ``metainfo`` from ``data_dir`` (which already holds the content) with aria2.

    Ready once aria2 has verified every piece (``--check-integrity``) and listens; fails if the
    data does not verify. It announces to the torrent's trackers about a second after it is
    ready: wait for it with ``OpenTracker.wait_peers`` before starting leechers.
    ``log_level="info"`` logs every BitTorrent message (large logs on big transfers).
    """
    with _aria2_peer(
        workdir,
        metainfo,
        data_dir,
        seed=True,
        name=name,
        host=host,
        listen_port=listen_port,
        log_level=log_level,
        announce_interval=announce_interval,
        extra_args=extra_args,
        start_timeout=start_timeout,
    ) as peer:
        yield peer


@contextmanager
def aria2_leech(
    workdir: Path,
    metainfo: bytes,
    download_dir: Path,
    *,
    name: str = "aria2-leech",
    host: str = "127.0.0.1",
    listen_port: int | None = None,
    log_level: LogLevel = "notice",
    announce_interval: int | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = 30.0,
) -> Iterator[Aria2Peer]:
    """Download ``metainfo`` into ``download_dir`` with aria2 (``--seed-time=0``: no seeding).

    Ready once aria2 listens; it finds peers through the torrent's trackers only, so seeds must
    have announced first (or pass ``announce_interval`` to make aria2 re-announce).
    """
    with _aria2_peer(
        workdir,
        metainfo,
        download_dir,
        seed=False,
        name=name,
        host=host,
        listen_port=listen_port,
        log_level=log_level,
        announce_interval=announce_interval,
        extra_args=extra_args,
        start_timeout=start_timeout,
    ) as peer:
        yield peer
