"""libtorrent peers for the rollout benchmark's ``libtorrent`` scenario: one long-lived process
per host with one libtorrent 2.1 session and one torrent per blob (worker side, run as
``python -m tests.bench.rollout.lt_node CONFIG.json`` inside a host's namespace), and its handle
in the benchmark (:class:`LtNode`, parent side).

A seed (on the infra host) adds every torrent with a full hash check of the blobs it was given
and is ready once all of them are seeding; it announces to the tracker at once. With
``super_seeding`` in its config it super-seeds (BEP 16, libtorrent's ``super_seeding`` torrent
flag) every blob of more than one piece, as the p2p proxy does; libtorrent's default is not to.
A leecher (one per node) adds every torrent *paused* and is ready once it listens; on ``start``
it waits for the common start instant, resumes every torrent (which announces to the tracker)
and connects each torrent to the seed, the way an agent connects to its proxy's peer port as
soon as it has the metainfo. When every torrent has finished it answers once (like the pull
client) and keeps seeding until it is stopped.

Session settings: :func:`tests.realparts.lt_worker.build_settings` (the interop tests' settings:
no DHT, LSD, UPnP, NAT-PMP or IP notifier, ``allow_multiple_connections_per_ip``, encryption
off, TCP only), libtorrent's defaults otherwise (choking included), then the caller's
``--lt-set`` overrides; :func:`session_settings` is exactly what is passed.

Protocol, one JSON object per line. Worker -> parent once: ``{"ready": {...}}`` or
``{"fatal": "..."}``. Parent -> worker: ``{"op": "start", "at": T, "seed": [host, port]}``,
answered by ``{"ok": true, "done": {...}}`` when every torrent is complete;
``{"op": "status"}``, answered by ``{"ok": true, "status": {...}}``; ``{"op": "stop"}`` (no
answer; the worker exits). Times are ``time.monotonic()`` values (CLOCK_MONOTONIC, the same in
every process); CPU values are this process's user + system seconds (all threads).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import resource
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import libtorrent as lt

from tests.realparts.lt_worker import build_settings
from tests.realparts.procs import ManagedProcess

ROOT = Path(__file__).resolve().parents[3]
LIBTORRENT_VERSION: str = lt.__version__
_ALERT_WAIT_MS = 250
"""Longest wait for an alert: libtorrent wakes the loop for every alert; this bounds how late a
command (read from stdin by a thread) is seen. Waking every 20 ms instead cost the process
about 5 ms of CPU a second, a few percent of what it spends on a transfer here."""
PEER_POLL = 0.2
"""Seconds between samples of a downloading torrent's connections (bytes from the seed)."""
ALERT_MASK = int(
    lt.alert_category.error
    | lt.alert_category.status
    | lt.alert_category.storage
    | lt.alert_category.tracker
    | lt.alert_category.piece_progress
)
"""Errors, state changes, tracker answers and finished pieces (for the first piece's time); no
per-peer alerts, which would cost the process CPU in the measurement."""


def session_settings(
    host: str, port: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The settings a benchmark libtorrent session gets (only what differs from libtorrent's
    defaults, plus the listen address and alert mask)."""
    config = {
        "profile": "default",
        "encryption": "disabled",
        "utp": False,
        "host": host,
        "port": port,
        "settings": {"alert_mask": ALERT_MASK, **(overrides or {})},
    }
    return build_settings(config)


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _log(message: str) -> None:
    sys.stderr.write(f"{time.monotonic():.3f} {message}\n")
    sys.stderr.flush()


class _Torrent:
    """One blob's torrent in the worker and what is known about its download."""

    def __init__(self, digest: str, handle: lt.torrent_handle, size: int) -> None:
        self.digest = digest
        self.handle = handle
        self.size = size
        self.first_piece = math.nan
        self.finished = math.nan
        self.by_peer: dict[tuple[str, int], int] = {}
        """Payload bytes downloaded per connection (``ip``, ``port``), the largest value seen."""
        self.peers_max = 0
        """The most connections seen at once while downloading."""

    def sample_peers(self) -> None:
        peers = self.handle.get_peer_info()
        self.peers_max = max(self.peers_max, len(peers))
        for peer in peers:
            key = (str(peer.ip[0]), int(peer.ip[1]))
            self.by_peer[key] = max(self.by_peer.get(key, 0), int(peer.total_download))

    def from_host(self, ip: str) -> int:
        return sum(v for (host, _port), v in self.by_peer.items() if host == ip)


class _Worker:
    def __init__(self, config: dict[str, Any], out: Any) -> None:
        self.config = config
        self.out = out
        self.seed: bool = bool(config["seed"])
        self.settings = session_settings(
            str(config["host"]), int(config["port"]), config.get("settings")
        )
        self.session = lt.session(cast("lt.settings_pack", self.settings))
        self.torrents: dict[str, _Torrent] = {}
        self.by_hash: dict[str, _Torrent] = {}
        self.errors: list[str] = []
        self.hash_failures = 0
        self.tracker_replies = 0
        self.tracker_errors: list[str] = []
        self.listen_port: int | None = None
        self.at: float | None = None
        self.started_at = math.nan
        self.seed_endpoint: tuple[str, int] | None = None
        self.answered = False
        self.commands: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    # -- alerts ------------------------------------------------------------------------------

    def pump(self, wait_ms: int) -> None:
        self.session.wait_for_alert(wait_ms)
        now = time.monotonic()
        for alert in self.session.pop_alerts():
            if isinstance(alert, lt.piece_finished_alert):
                torrent = self._torrent_of(alert)
                if torrent is not None and math.isnan(torrent.first_piece):
                    torrent.first_piece = now
                continue  # not logged: one per piece
            _log(f"{type(alert).__name__}: {alert.message()}")
            if isinstance(alert, lt.listen_succeeded_alert):
                if alert.socket_type == lt.socket_type_t.tcp:
                    self.listen_port = alert.port
            elif isinstance(alert, lt.listen_failed_alert):
                self.errors.append(f"listen failed: {alert.message()}")
            elif isinstance(alert, lt.torrent_finished_alert):
                torrent = self._torrent_of(alert)
                if torrent is not None and not self.seed and math.isnan(torrent.finished):
                    torrent.finished = now
            elif isinstance(alert, lt.tracker_reply_alert):
                self.tracker_replies += 1
            elif isinstance(alert, lt.tracker_error_alert):
                self.tracker_errors.append(alert.message())
            elif isinstance(alert, lt.hash_failed_alert):
                self.hash_failures += 1
            elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
                self.errors.append(alert.message())

    def _torrent_of(self, alert: Any) -> _Torrent | None:
        try:
            return self.by_hash.get(str(alert.handle.info_hashes().v1))
        except RuntimeError:  # the handle is no longer valid
            return None

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        deadline = time.monotonic() + float(self.config.get("start_timeout", 60.0))
        while self.listen_port is None:
            if self.errors:
                raise RuntimeError("; ".join(self.errors))
            if time.monotonic() > deadline:
                raise RuntimeError("libtorrent did not open its TCP listen socket")
            self.pump(_ALERT_WAIT_MS)
        for blob in self.config["torrents"]:
            params = lt.add_torrent_params()
            params.ti = lt.torrent_info(Path(blob["metainfo_path"]).read_bytes())
            params.save_path = str(self.config["save_path"])
            flags = params.flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
            if not self.seed:
                flags |= lt.torrent_flags.paused  # resumed at the start instant
            elif self.config.get("super_seeding") and params.ti.num_pieces() > 1:
                # BEP 16, as the proxy does. Not for a one-piece blob (the image config):
                # libtorrent never offered such a torrent to any leecher here.
                flags |= lt.torrent_flags.super_seeding
            params.flags = flags
            handle = self.session.add_torrent(params)
            torrent = _Torrent(str(blob["digest"]), handle, int(blob["size"]))
            self.torrents[torrent.digest] = torrent
            self.by_hash[str(handle.info_hashes().v1)] = torrent
        if self.seed:  # every blob checked and seeding
            while True:
                if self.errors:
                    raise RuntimeError("; ".join(self.errors))
                states = [t.handle.status() for t in self.torrents.values()]
                if all(s.is_seeding for s in states):
                    break
                for status in states:
                    if (
                        status.state in (lt.torrent_status.downloading, lt.torrent_status.finished)
                        and not status.is_seeding
                    ):
                        raise RuntimeError(
                            f"seed data of {status.name} is incomplete or wrong: "
                            f"{status.progress:.1%} of the pieces verify"
                        )
                if time.monotonic() > deadline:
                    raise RuntimeError("the seed's torrents did not reach seeding in time")
                self.pump(_ALERT_WAIT_MS)

    def go(self) -> None:
        """The start instant: resume every torrent, connect each to the seed."""
        self.started_at = time.monotonic()
        for torrent in self.torrents.values():
            torrent.handle.resume()
            if self.seed_endpoint is not None:
                torrent.handle.connect_peer(self.seed_endpoint)
        late = self.started_at - (self.at or self.started_at)
        _log(f"started {len(self.torrents)} torrents, {late:.4f} s late")

    # -- answers -----------------------------------------------------------------------------

    def done(self) -> dict[str, Any]:
        at = self.at if self.at is not None else self.started_at
        seed_ip = self.seed_endpoint[0] if self.seed_endpoint else ""
        blobs = {}
        for torrent in self.torrents.values():
            blobs[torrent.digest] = {
                "bytes": torrent.size,
                "start": 0.0,
                "first_byte": torrent.first_piece - at,
                "end": torrent.finished - at,
                "from_seed": torrent.from_host(seed_ip),
                "peers_max": torrent.peers_max,
            }
        firsts = [b["first_byte"] for b in blobs.values() if b["bytes"] > 0]
        return {
            "seconds": max(t.finished for t in self.torrents.values()) - at,
            "first_byte": min(firsts) if firsts else math.nan,
            "bytes": sum(t.size for t in self.torrents.values()),
            "late": self.started_at - at,
            "blobs": blobs,
            "cpu": _cpu_now(),
        }

    def status(self) -> dict[str, Any]:
        torrents = {}
        for torrent in self.torrents.values():
            st = torrent.handle.status()
            torrents[torrent.digest] = {
                "state": str(st.state),
                "is_seeding": st.is_seeding,
                "num_peers": st.num_peers,
                "total_payload_download": st.total_payload_download,
                "total_payload_upload": st.total_payload_upload,
                "total_download": st.total_download,
                "total_upload": st.total_upload,
                "total_redundant_bytes": st.total_redundant_bytes,
                "total_failed_bytes": st.total_failed_bytes,
            }
        return {
            "torrents": torrents,
            "hash_failures": self.hash_failures,
            "tracker_replies": self.tracker_replies,
            "tracker_errors": self.tracker_errors[-5:],
            "errors": self.errors[-5:],
            "cpu": _cpu_now(),
        }

    # -- main loop ---------------------------------------------------------------------------

    def read_commands(self, stdin: Any) -> None:
        for line in stdin:
            try:
                self.commands.put(json.loads(line))
            except ValueError:
                _log(f"ERROR bad command line {line!r}")
        self.commands.put(None)

    def run(self) -> None:
        self.start()
        self.send(
            {
                "ready": {
                    "listen_port": self.listen_port,
                    "torrents": len(self.torrents),
                    "settings": {k: v for k, v in self.settings.items() if k != "alert_mask"},
                }
            }
        )
        threading.Thread(target=self.read_commands, args=(sys.stdin,), daemon=True).start()
        next_poll = 0.0
        while True:
            wait = _ALERT_WAIT_MS
            if self.at is not None and math.isnan(self.started_at):
                wait = max(0, min(wait, int((self.at - time.monotonic()) * 1000)))
            elif not math.isnan(self.started_at) and not self.answered:
                wait = max(0, min(wait, int((next_poll - time.monotonic()) * 1000) + 1))
            self.pump(wait)
            now = time.monotonic()
            if self.at is not None and math.isnan(self.started_at) and now >= self.at:
                self.go()
            downloading = not math.isnan(self.started_at) and not self.answered
            if downloading and now >= next_poll:
                next_poll = now + PEER_POLL
                for torrent in self.torrents.values():
                    if math.isnan(torrent.finished):
                        torrent.sample_peers()
            if downloading and self.errors:
                self.send({"ok": False, "error": "; ".join(self.errors)})
                self.answered = True
            elif downloading and all(not math.isnan(t.finished) for t in self.torrents.values()):
                self.send({"ok": True, "done": self.done()})
                self.answered = True
            while True:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                if command is None or command.get("op") == "stop":
                    _log("stopping")
                    return
                if command.get("op") == "start":
                    self.at = float(command["at"])
                    seed = command.get("seed")
                    self.seed_endpoint = (str(seed[0]), int(seed[1])) if seed else None
                elif command.get("op") == "status":
                    self.send({"ok": True, "status": self.status()})
                else:
                    self.send({"ok": False, "error": f"unknown op {command.get('op')!r}"})


def worker_main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    # Keep the real stdout for the protocol; anything else written to fd 1 goes to the log.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        _Worker(config, out).run()
    except Exception as exc:
        _log(f"FATAL {type(exc).__name__}: {exc}")
        out.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return 1
    return 0


class LtNode:
    """A running libtorrent process inside one host's namespace (seed or leecher)."""

    def __init__(self, argv: list[str], log: Path, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.config = config
        self.process = ManagedProcess(argv, log, name=name, cwd=ROOT, pipes=True, stop_timeout=3.0)
        self._buffer = b""
        self.ready: dict[str, Any] = {}

    @classmethod
    def command(cls, config_path: Path) -> list[str]:
        """The worker's command line (to be run inside a namespace)."""
        return [sys.executable, "-m", "tests.bench.rollout.lt_node", str(config_path)]

    def start(self) -> None:
        self.process.start()

    def receive(self, deadline: float) -> dict[str, Any]:
        """The next message; :class:`ProcessFailedError` if the worker dies or is late."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.fail("no answer from the libtorrent worker in time")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                self.process.check_alive()
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                with contextlib.suppress(Exception):
                    self.process.popen.wait(2.0)
                self.process.fail(f"closed its output (status {self.process.returncode})")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        message = self.receive(deadline)
        if "fatal" in message:
            self.process.fail(f"could not start: {message['fatal']}")
        if "ready" not in message:
            self.process.fail(f"unexpected first message {message!r}")
        self.ready = dict(message["ready"])
        return self.ready

    def send(self, command: dict[str, Any]) -> None:
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
        except OSError as exc:
            self.process.fail(f"cannot send a command: {exc}")

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        self.send({"op": "status"})
        answer = self.receive(time.monotonic() + timeout)
        if not answer.get("ok"):
            self.process.fail(f"status failed: {answer!r}")
        status: dict[str, Any] = answer["status"]
        return status

    def stop(self) -> None:
        if self.process.running:
            with contextlib.suppress(OSError, RuntimeError):
                self.send({"op": "stop"})
        self.process.stop()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
