"""libtorrent 2.1 (the PyPI wheel) as a real BitTorrent peer, one torrent per worker process.

Each peer is a subprocess (:mod:`tests.realparts.lt_worker`) with one libtorrent session and one
torrent, so a benchmark can read its CPU time apart from pytest's and a libtorrent crash cannot
take pytest down. The parent talks to it over pipes (JSON lines); see the worker's docstring.

Session settings, always (on top of libtorrent's defaults, or of the "fast" profile):

- ``listen_interfaces = "HOST:PORT"`` (HOST 127.0.0.1 unless told otherwise; PORT 0 lets
  libtorrent choose, the chosen port is :attr:`LibtorrentPeer.listen_port`);
- ``enable_dht``, ``enable_lsd``, ``enable_upnp``, ``enable_natpmp``, ``enable_ip_notifier`` =
  False, passed to the session constructor so that nothing is ever sent off the host;
- ``allow_multiple_connections_per_ip = True`` (every peer here is 127.0.0.1);
- ``enable_incoming_utp`` / ``enable_outgoing_utp`` = ``utp`` (default False: TCP only; with uTP
  on, libtorrent tries uTP first for outgoing connections);
- ``out_enc_policy`` / ``in_enc_policy`` from ``encryption``: ``"enabled"`` (libtorrent's own
  default: outgoing connections start with an MSE/PE handshake and retry in plaintext if that
  fails; incoming accepts both), ``"disabled"`` (plain BitTorrent handshakes only, both ways) or
  ``"forced"`` (MSE only);
- ``stop_tracker_timeout = 1`` and an alert mask of error, status, storage, tracker and peer
  alerts (all logged to the worker log).

Torrents are added unpaused and not auto-managed (no queueing). A seed's data is hash-checked
when it is added (``verify=True``) or trusted (``verify=False``: libtorrent's ``seed_mode``).

The ``"fast"`` profile starts from ``libtorrent.high_performance_seed()``, which in 2.1.1 changes
these settings from their defaults (:data:`FAST_PROFILE_SETTINGS` holds the same list):
``active_dht_limit`` 88→600, ``active_limit`` 500→20000, ``active_seeds`` 5→2000,
``active_tracker_limit`` 1600→2000, ``aio_threads`` 10→8, ``alert_queue_size`` 2000→10000,
``allowed_fast_set_size`` 5→0, ``checking_mem_usage`` 256→2048, ``connection_speed`` 30→500,
``connections_limit`` 200→8000, ``file_pool_size`` 40→500, ``inactivity_timeout`` 600→20,
``listen_queue_size`` 5→3000, ``max_failcount`` 3→1, ``max_out_request_queue`` 500→1500,
``max_peer_recv_buffer_size`` 2 MiB→5 MiB, ``max_queued_disk_bytes`` 100 MiB→7 MiB,
``max_rejects`` 50→10, ``mixed_mode_algorithm`` 1→0 (prefer TCP), ``peer_timeout`` 120→20,
``request_timeout`` 60→10, ``send_buffer_low_watermark`` 10 KiB→1 MiB,
``send_buffer_watermark`` 500 KB→3 MiB, ``send_buffer_watermark_factor`` 50→150,
``send_not_sent_low_watermark`` 16 KiB→512 KiB, ``suggest_mode`` 0→1 (suggest read cache),
``unchoke_slots_limit`` 8→-1 (unchoke every interested peer). The loopback settings above are then
applied on top, and finally any ``settings`` overrides the caller passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import libtorrent as lt

from tests.realparts.procs import Completion, ManagedProcess, ProcessFailedError

__all__ = [
    "FAST_PROFILE_SETTINGS",
    "Encryption",
    "LibtorrentPeer",
    "LtPeerInfo",
    "LtStatus",
    "Profile",
    "infohash_v1",
    "libtorrent_leech",
    "libtorrent_seed",
    "lt_make_torrent",
]

Profile = Literal["default", "fast"]
Encryption = Literal["enabled", "disabled", "forced"]

FAST_PROFILE_SETTINGS: dict[str, Any] = {
    k: v for k, v in lt.high_performance_seed().items() if lt.default_settings().get(k) != v
}
"""What the "fast" profile changes from libtorrent's defaults (before the loopback settings)."""

WORKER = Path(__file__).with_name("lt_worker.py")
_REQUEST_TIMEOUT = 10.0


def lt_make_torrent(path: Path, piece_length: int, trackers: list[str]) -> bytes:
    """Make v1-only metainfo for the file (or directory) ``path`` with libtorrent.

    ``piece_length`` must be a power of two of at least 16 KiB. Each tracker goes in its own tier,
    in order. No creation date, so the same content gives the same bytes.
    """
    path = path.resolve()
    files = lt.list_files(str(path))
    creator = lt.create_torrent(files, piece_length, lt.create_torrent.v1_only)
    for tier, url in enumerate(trackers):
        creator.add_tracker(url, tier)
    creator.set_creation_date(0)
    lt.set_piece_hashes(creator, str(path.parent))
    return bytes(lt.bencode(creator.generate()))


def infohash_v1(metainfo: bytes) -> bytes:
    """The 20-byte v1 infohash (SHA-1 of the ``info`` dictionary) of ``metainfo``."""
    return hashlib.sha1(_info_bytes(metainfo)).digest()


def _skip_value(data: bytes, pos: int) -> int:
    """Index just past the bencoded value that starts at ``data[pos]``."""
    lead = data[pos : pos + 1]
    if lead == b"i":
        return data.index(b"e", pos) + 1
    if lead in (b"l", b"d"):
        pos += 1
        while data[pos : pos + 1] != b"e":
            pos = _skip_value(data, pos)
        return pos + 1
    if lead.isdigit():
        colon = data.index(b":", pos)
        return colon + 1 + int(data[pos:colon])
    raise ValueError(f"not bencoding at offset {pos}")


def _info_bytes(metainfo: bytes) -> bytes:
    """The raw bytes of the top-level ``info`` value, exactly as they are in ``metainfo``."""
    if metainfo[:1] != b"d":
        raise ValueError("metainfo is not a bencoded dictionary")
    pos = 1
    while metainfo[pos : pos + 1] != b"e":
        key_end = _skip_value(metainfo, pos)
        value_end = _skip_value(metainfo, key_end)
        if metainfo[pos:key_end] == b"4:info":
            return metainfo[key_end:value_end]
        pos = value_end
    raise ValueError("metainfo has no info dictionary")


def _strip_trackers(metainfo: bytes) -> bytes:
    """Metainfo with only the ``info`` dictionary, byte for byte (so the same infohash).

    Drops ``announce``, ``announce-list`` and web seeds (``url-list``): the peer can then only
    reach the peers it is told to connect to.
    """
    return b"d4:info" + _info_bytes(metainfo) + b"e"


@dataclass(frozen=True)
class LtPeerInfo:
    """One connection of a libtorrent peer."""

    ip: str
    port: int
    client: str
    seed: bool
    outgoing: bool
    mse: bool
    """The connection did an MSE/PE handshake (payload RC4 or plaintext)."""
    rc4: bool
    utp: bool
    progress: float
    total_upload: int
    total_download: int
    num_hashfails: int


@dataclass(frozen=True)
class LtStatus:
    """A snapshot of the worker's torrent (byte counters count payload unless noted)."""

    state: str
    progress: float
    is_finished: bool
    is_seeding: bool
    num_peers: int
    num_seeds: int
    total_wanted: int
    total_wanted_done: int
    total_payload_upload: int
    total_payload_download: int
    total_upload: int
    """Including protocol overhead."""
    total_download: int
    """Including protocol overhead."""
    download_rate: int
    upload_rate: int
    total_failed_bytes: int
    total_redundant_bytes: int
    hash_failures: int
    banned: list[str]
    errors: list[str]
    listen_port: int
    added_at: float
    finished_at: float | None
    cpu_at_add: float
    cpu_at_finish: float | None
    cpu_now: float
    peers: list[LtPeerInfo] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LtStatus:
        fields = dict(data)
        fields["peers"] = [LtPeerInfo(**p) for p in fields.get("peers", [])]
        return cls(**fields)


class LibtorrentPeer:
    """A running libtorrent worker. Build it with :func:`libtorrent_seed` or
    :func:`libtorrent_leech`; all methods are synchronous and may be called from any thread."""

    def __init__(self, process: ManagedProcess, *, host: str, seed: bool, infohash: bytes) -> None:
        self.process = process
        self.host = host
        self.seed = seed
        self.infohash = infohash
        self.listen_port = 0
        self._buffer = bytearray()
        self._next_id = 0
        self._lock = threading.Lock()

    # -- protocol ----------------------------------------------------------------------------

    def _read_line(self, deadline: float) -> dict[str, Any]:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.fail("no answer from the libtorrent worker in time")
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.process.wait_exit(2.0)
                    self.process.fail(
                        f"worker closed its output (status {self.process.returncode})"
                    )
                self._buffer += chunk
            else:
                self.process.check_alive()
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        message: dict[str, Any] = json.loads(line)
        return message

    def _request(self, op: str, timeout: float = _REQUEST_TIMEOUT, **args: Any) -> Any:
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            try:
                self.process.stdin.write(
                    (json.dumps({"id": request_id, "op": op, **args}) + "\n").encode()
                )
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError):
                self.process.check_alive()
                self.process.fail(f"cannot send {op!r} to the worker")
            deadline = time.monotonic() + timeout
            while True:
                reply = self._read_line(deadline)
                if reply.get("id") == request_id:
                    break
        if "error" in reply:
            raise RuntimeError(f"libtorrent worker: {op} failed: {reply['error']}")
        return reply.get("result")

    def _wait_ready(self, timeout: float) -> None:
        message = self._read_line(time.monotonic() + timeout)
        if "fatal" in message:
            self.process.wait_exit(5.0)
            self.process.fail(f"worker could not start: {message['fatal']}")
        ready = message["ready"]
        self.listen_port = int(ready["listen_port"])
        if bytes.fromhex(ready["infohash"]) != self.infohash:
            self.process.fail(
                f"worker loaded infohash {ready['infohash']}, not {self.infohash.hex()}"
            )

    # -- public API --------------------------------------------------------------------------

    def status(self, *, peers: bool = False) -> LtStatus:
        """A snapshot of the torrent; with ``peers=True`` also every connection."""
        return LtStatus.from_json(self._request("status", peers=peers))

    def connect_peer(self, host: str, port: int) -> None:
        """Add ``host:port`` as a peer and let libtorrent connect to it (no tracker needed).

        libtorrent connects at its next tick (about 0.5 s later; up to 1.5 s with encryption
        "enabled" against a plaintext-only peer, which it first tries with MSE). After a refused
        connection it waits ``min_reconnect_time`` (60 s) before retrying, and calling this again
        does not hurry it: the other side must already be listening, or pass
        ``settings={"min_reconnect_time": 1}``.
        """
        self._request("connect_peer", host=host, port=port)

    def reannounce(self) -> None:
        """Announce to every tracker now, ignoring the tracker's minimum interval."""
        self._request("reannounce")

    def wait_peers(self, count: int = 1, timeout: float = 15.0) -> LtStatus:
        """Wait until at least ``count`` peers are connected."""
        return self._wait_status(lambda s: s.num_peers >= count, timeout, f"{count} peer(s)")

    def wait_complete(self, timeout: float = 60.0) -> Completion:
        """Wait until every piece is downloaded and verified.

        Returns the elapsed seconds since the torrent was added and the worker's CPU seconds over
        the same interval (use :meth:`status` for the totals). Fails at once on a torrent or file
        error; a timeout error quotes the last status and the log.
        """
        if self.seed:
            raise RuntimeError("a seed is complete from the start")
        final = self._wait_status(lambda s: s.finished_at is not None, timeout, "completion")
        assert final.finished_at is not None
        assert final.cpu_at_finish is not None
        return Completion(
            elapsed=final.finished_at - final.added_at,
            cpu_seconds=final.cpu_at_finish - final.cpu_at_add,
            finished_at=final.finished_at,
        )

    def _wait_status(self, done: Callable[[LtStatus], bool], timeout: float, what: str) -> LtStatus:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            status = self.status()
            if status.errors:
                self.process.fail(f"torrent error while waiting for {what}: {status.errors}")
            if done(status):
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.fail(
                    f"timed out after {timeout:g} s waiting for {what}; last status: "
                    f"{self.status(peers=True)}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def cpu_seconds(self) -> float:
        """The worker process's CPU seconds so far (from /proc; all threads)."""
        return self.process.cpu_seconds()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop, then make sure it did (SIGTERM, SIGKILL). Idempotent."""
        if self.process.running:
            try:
                self._request("stop", timeout=timeout)
                self.process.wait_exit(timeout)
            except (ProcessFailedError, RuntimeError, OSError):
                pass  # stop() below escalates
        self.process.stop()

    def __repr__(self) -> str:
        role = "seed" if self.seed else "leech"
        return f"<LibtorrentPeer {role} {self.host}:{self.listen_port} {self.process!r}>"


@contextmanager
def _libtorrent_peer(
    workdir: Path,
    metainfo: bytes,
    directory: Path,
    *,
    seed: bool,
    name: str,
    host: str,
    listen_port: int,
    use_trackers: bool,
    profile: Profile,
    encryption: Encryption,
    utp: bool,
    verify: bool,
    settings: Mapping[str, Any] | None,
    start_timeout: float,
) -> Iterator[LibtorrentPeer]:
    workdir.mkdir(parents=True, exist_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    torrent_path = workdir / f"{name}.torrent"
    torrent_path.write_bytes(metainfo if use_trackers else _strip_trackers(metainfo))
    config = {
        "metainfo_path": str(torrent_path),
        "save_path": str(directory.resolve()),
        "host": host,
        "port": listen_port,
        "seed": seed,
        "verify": verify,
        "profile": profile,
        "encryption": encryption,
        "utp": utp,
        "settings": dict(settings or {}),
        "start_timeout": start_timeout,
    }
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=1))
    process = ManagedProcess(
        [sys.executable, "-u", str(WORKER), str(config_path)],
        workdir / f"{name}.log",
        name=name,
        pipes=True,
    )
    peer = LibtorrentPeer(process, host=host, seed=seed, infohash=infohash_v1(metainfo))
    with process:
        try:
            peer._wait_ready(start_timeout + 10.0)  # + interpreter and libtorrent start-up
            yield peer
        finally:
            peer.stop()


@contextmanager
def libtorrent_seed(
    workdir: Path,
    metainfo: bytes,
    data_dir: Path,
    *,
    name: str = "lt-seed",
    host: str = "127.0.0.1",
    listen_port: int = 0,
    use_trackers: bool = False,
    profile: Profile = "default",
    encryption: Encryption = "enabled",
    utp: bool = False,
    verify: bool = True,
    settings: Mapping[str, Any] | None = None,
    start_timeout: float = 30.0,
) -> Iterator[LibtorrentPeer]:
    """Seed ``metainfo`` from ``data_dir`` (which already holds the content) with libtorrent.

    Ready (the ``with`` body runs) once it listens and, with ``verify``, has checked the data and
    is seeding; fails if the data does not verify. ``use_trackers`` keeps the metainfo's trackers
    (otherwise they are removed and peers must connect directly). Logs and config go to
    ``workdir/NAME.*``. Stopped cleanly on exit, also when the body raises.
    """
    with _libtorrent_peer(
        workdir,
        metainfo,
        data_dir,
        seed=True,
        name=name,
        host=host,
        listen_port=listen_port,
        use_trackers=use_trackers,
        profile=profile,
        encryption=encryption,
        utp=utp,
        verify=verify,
        settings=settings,
        start_timeout=start_timeout,
    ) as peer:
        yield peer


@contextmanager
def libtorrent_leech(
    workdir: Path,
    metainfo: bytes,
    download_dir: Path,
    *,
    name: str = "lt-leech",
    host: str = "127.0.0.1",
    listen_port: int = 0,
    use_trackers: bool = False,
    profile: Profile = "default",
    encryption: Encryption = "enabled",
    utp: bool = False,
    settings: Mapping[str, Any] | None = None,
    start_timeout: float = 30.0,
) -> Iterator[LibtorrentPeer]:
    """Download ``metainfo`` into ``download_dir`` (normally empty) with libtorrent.

    Ready once it listens and the torrent is added; then use
    :meth:`LibtorrentPeer.connect_peer` and/or the trackers (``use_trackers=True``, announced at
    once) and :meth:`LibtorrentPeer.wait_complete`. After completion it keeps seeding until the
    ``with`` block ends. Same settings and clean-up as :func:`libtorrent_seed`.
    """
    with _libtorrent_peer(
        workdir,
        metainfo,
        download_dir,
        seed=False,
        name=name,
        host=host,
        listen_port=listen_port,
        use_trackers=use_trackers,
        profile=profile,
        encryption=encryption,
        utp=utp,
        verify=True,
        settings=settings,
        start_timeout=start_timeout,
    ) as peer:
        yield peer
