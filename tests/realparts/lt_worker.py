"""Subprocess that runs one libtorrent session with one torrent, driven over stdin/stdout.

Started by :mod:`tests.realparts.libtorrent_peer` as ``python lt_worker.py CONFIG.json``; it is
self-contained (stdlib and ``libtorrent`` only) so that it runs from its file path without the
``tests`` package on ``sys.path``. Running libtorrent in its own process lets a benchmark measure
its CPU time separately and keeps a libtorrent crash from taking pytest down.

Protocol, one JSON object per line:

- worker -> parent, once: ``{"ready": {...}}`` after the listen socket is open and the torrent is
  added (for a seed: checked and seeding), or ``{"fatal": "message"}`` before exiting with status 1.
- parent -> worker: ``{"id": N, "op": OP, ...}`` with OP one of ``status`` (``peers``: bool),
  ``connect_peer`` (``host``, ``port``), ``reannounce``, ``stop``.
- worker -> parent: ``{"id": N, "result": ...}`` or ``{"id": N, "error": "message"}``.

The worker's real stdout is kept for the protocol and file descriptor 1 is pointed at stderr (the
log), so nothing libtorrent prints can corrupt the protocol. End of stdin (the parent died) stops
the worker. Every alert message is written to stderr, one a line.

Clock: ``finished_at`` and ``added_at`` are ``time.monotonic()`` values (CLOCK_MONOTONIC, shared by
all processes on Linux). CPU values are ``getrusage(RUSAGE_SELF)`` user + system seconds (all
threads of this process).
"""

from __future__ import annotations

import json
import os
import queue
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

import libtorrent as lt

# peer_info::utp_socket (bit 17) is not exported by the Python bindings.
_UTP_SOCKET = 1 << 17
_MAX_ERRORS = 50
_ALERT_WAIT_MS = 20

_ENCRYPTION = {
    # name: (out_enc_policy, in_enc_policy)
    "enabled": (lt.enc_policy.pe_enabled, lt.enc_policy.pe_enabled),
    "disabled": (lt.enc_policy.pe_disabled, lt.enc_policy.pe_disabled),
    "forced": (lt.enc_policy.pe_forced, lt.enc_policy.pe_forced),
}


def build_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The session settings for ``config`` (see ``libtorrent_peer`` for what they mean)."""
    settings: dict[str, Any] = {}
    if config["profile"] == "fast":
        settings.update(lt.high_performance_seed())
    out_policy, in_policy = _ENCRYPTION[config["encryption"]]
    settings.update(
        {
            "listen_interfaces": f"{config['host']}:{config['port']}",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_ip_notifier": False,
            "allow_multiple_connections_per_ip": True,
            "enable_incoming_utp": config["utp"],
            "enable_outgoing_utp": config["utp"],
            "out_enc_policy": int(out_policy),
            "in_enc_policy": int(in_policy),
            "stop_tracker_timeout": 1,
            "alert_mask": int(
                lt.alert_category.error
                | lt.alert_category.status
                | lt.alert_category.storage
                | lt.alert_category.tracker
                | lt.alert_category.peer
                | lt.alert_category.connect
            ),
        }
    )
    settings.update(config.get("settings") or {})
    return settings


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def log(message: str) -> None:
    sys.stderr.write(f"{time.monotonic():.3f} {message}\n")
    sys.stderr.flush()


class Worker:
    def __init__(self, config: dict[str, Any], out: Any) -> None:
        self.config = config
        self.out = out
        self.seed: bool = config["seed"]
        self.errors: list[str] = []
        self.hash_failures = 0
        self.banned: list[str] = []
        self.finished_at: float | None = None
        self.cpu_at_finish: float | None = None
        self.added_at = 0.0
        self.cpu_at_add = 0.0
        self.listen_port: int | None = None
        self.commands: queue.Queue[dict[str, Any] | None] = queue.Queue()
        # The settings go to the constructor: DHT, LSD, UPnP and NAT-PMP never start.
        self.session = lt.session(cast("lt.settings_pack", build_settings(config)))

    # -- output ------------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def error(self, message: str) -> None:
        log(f"ERROR {message}")
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(message)

    # -- alerts ------------------------------------------------------------------------------

    def pump(self, wait_ms: int) -> None:
        """Wait up to ``wait_ms`` for alerts and handle all that are queued."""
        self.session.wait_for_alert(wait_ms)
        for alert in self.session.pop_alerts():
            log(f"{type(alert).__name__}: {alert.message()}")
            if isinstance(alert, lt.listen_succeeded_alert):
                if alert.socket_type == lt.socket_type_t.tcp:
                    self.listen_port = alert.port
            elif isinstance(alert, lt.listen_failed_alert):
                self.error(f"listen failed: {alert.message()}")
            elif isinstance(alert, lt.torrent_finished_alert):
                if self.finished_at is None and not self.seed:
                    self.finished_at = time.monotonic()
                    self.cpu_at_finish = cpu_now()
            elif isinstance(alert, lt.hash_failed_alert):
                self.hash_failures += 1
            elif isinstance(alert, lt.peer_ban_alert):
                self.banned.append(alert.message())
            elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
                self.error(alert.message())

    # -- start -------------------------------------------------------------------------------

    def start(self) -> lt.torrent_handle:
        deadline = time.monotonic() + float(self.config["start_timeout"])
        while self.listen_port is None:
            if self.errors:
                raise RuntimeError("; ".join(self.errors))
            if time.monotonic() > deadline:
                raise RuntimeError("libtorrent did not open its TCP listen socket")
            self.pump(_ALERT_WAIT_MS)

        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(Path(self.config["metainfo_path"]).read_bytes())
        params.save_path = self.config["save_path"]
        flags = params.flags & ~lt.torrent_flags.paused & ~lt.torrent_flags.auto_managed
        if self.seed and not self.config["verify"]:
            flags |= lt.torrent_flags.seed_mode
        params.flags = flags
        self.cpu_at_add = cpu_now()
        self.added_at = time.monotonic()
        handle = self.session.add_torrent(params)

        wanted = (
            {lt.torrent_status.seeding}
            if self.seed
            else {
                lt.torrent_status.downloading,
                lt.torrent_status.finished,
                lt.torrent_status.seeding,
            }
        )
        while True:
            if self.errors:
                raise RuntimeError("; ".join(self.errors))
            status = handle.status()
            if status.state in wanted:
                break
            if (
                self.seed
                and status.state in (lt.torrent_status.downloading, lt.torrent_status.finished)
                and not status.is_seeding
            ):
                raise RuntimeError(
                    f"seed data in {self.config['save_path']} is incomplete or wrong: "
                    f"{status.progress:.1%} of the pieces verify"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"torrent stuck in state {status.state} at start")
            self.pump(_ALERT_WAIT_MS)
        return handle

    # -- commands ----------------------------------------------------------------------------

    def status(self, handle: lt.torrent_handle, with_peers: bool) -> dict[str, Any]:
        st = handle.status()
        result: dict[str, Any] = {
            "state": str(st.state),
            "progress": st.progress,
            "is_finished": st.is_finished,
            "is_seeding": st.is_seeding,
            "num_peers": st.num_peers,
            "num_seeds": st.num_seeds,
            "total_wanted": st.total_wanted,
            "total_wanted_done": st.total_wanted_done,
            "total_payload_upload": st.total_payload_upload,
            "total_payload_download": st.total_payload_download,
            "total_upload": st.total_upload,
            "total_download": st.total_download,
            "download_rate": st.download_payload_rate,
            "upload_rate": st.upload_payload_rate,
            "total_failed_bytes": st.total_failed_bytes,
            "total_redundant_bytes": st.total_redundant_bytes,
            "hash_failures": self.hash_failures,
            "banned": list(self.banned),
            "errors": list(self.errors) + ([st.errc.message()] if st.errc.value() else []),
            "listen_port": self.listen_port,
            "added_at": self.added_at,
            "finished_at": self.finished_at,
            "cpu_at_add": self.cpu_at_add,
            "cpu_at_finish": self.cpu_at_finish,
            "cpu_now": cpu_now(),
        }
        if with_peers:
            result["peers"] = [
                {
                    "ip": p.ip[0],
                    "port": p.ip[1],
                    "client": p.client.decode(errors="replace")
                    if isinstance(p.client, bytes)
                    else str(p.client),
                    "seed": bool(p.flags & lt.peer_info.seed),
                    "outgoing": bool(p.flags & lt.peer_info.outgoing_connection),
                    "rc4": bool(p.flags & lt.peer_info.rc4_encrypted),
                    "mse": bool(
                        p.flags & (lt.peer_info.rc4_encrypted | lt.peer_info.plaintext_encrypted)
                    ),
                    "utp": bool(p.flags & _UTP_SOCKET),
                    "progress": p.progress,
                    "total_upload": p.total_upload,
                    "total_download": p.total_download,
                    "num_hashfails": p.num_hashfails,
                }
                for p in handle.get_peer_info()
            ]
        return result

    def handle_command(self, handle: lt.torrent_handle, command: dict[str, Any]) -> bool:
        """Run one command and answer it; False when the worker should stop."""
        op = command.get("op")
        reply: dict[str, Any] = {"id": command.get("id")}
        keep_running = True
        try:
            if op == "status":
                reply["result"] = self.status(handle, bool(command.get("peers")))
            elif op == "connect_peer":
                handle.connect_peer((str(command["host"]), int(command["port"])))
                reply["result"] = None
            elif op == "reannounce":
                handle.force_reannounce(0, -1, lt.reannounce_flags_t.ignore_min_interval)
                reply["result"] = None
            elif op == "stop":
                reply["result"] = None
                keep_running = False
            else:
                reply["error"] = f"unknown op {op!r}"
        except Exception as exc:  # an answer, not a crash: the parent decides
            reply["error"] = f"{type(exc).__name__}: {exc}"
        self.send(reply)
        return keep_running

    def read_commands(self, stdin: Any) -> None:
        """Thread: parse command lines from stdin into the queue; ``None`` marks end of input."""
        for line in stdin:
            try:
                self.commands.put(json.loads(line))
            except ValueError:
                log(f"ERROR bad command line {line!r}")
        self.commands.put(None)

    def run(self) -> None:
        handle = self.start()
        ready = {
            "listen_port": self.listen_port,
            "state": str(handle.status().state),
            "infohash": str(handle.info_hashes().v1),
        }
        self.send({"ready": ready})
        threading.Thread(target=self.read_commands, args=(sys.stdin,), daemon=True).start()
        running = True
        while running:
            self.pump(_ALERT_WAIT_MS)
            while running:
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    break
                running = command is not None and self.handle_command(handle, command)
        log("stopping")
        self.session.pause()
        self.session.remove_torrent(handle)
        del self.session


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    # Keep the real stdout for the protocol; anything else written to fd 1 goes to the log.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        worker = Worker(config, out)
        worker.run()
    except Exception as exc:
        log(f"FATAL {type(exc).__name__}: {exc}")
        out.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
