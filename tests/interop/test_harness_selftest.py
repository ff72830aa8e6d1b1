"""Self-tests of the real-parts harness (tests/realparts), with real peers only.

They prove that the harness can run libtorrent, aria2 and opentracker against each other before
the project's own engine is tested against them: if one of these fails, an interop failure of
the engine says nothing about the engine.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest
import trio

from tests.realparts.aria2_peer import aria2_leech, aria2_seed
from tests.realparts.libtorrent_peer import (
    infohash_v1,
    libtorrent_leech,
    libtorrent_seed,
    lt_make_torrent,
)
from tests.realparts.opentracker import opentracker, wait_for_peer
from tests.realparts.procs import (
    INSTALL_SCRIPT,
    ManagedProcess,
    ProcessFailedError,
    port_accepts,
    require,
)

PIECE_LENGTH = 256 * 1024
BLOB_SIZE = 4 * 1024 * 1024 + 12_345  # 17 pieces, the last one short
TIMEOUT = 30.0


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    """A few MB of random content in ``tmp_path/seed``."""
    path = tmp_path / "seed" / "blob.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(BLOB_SIZE))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_loopback_only(*processes: ManagedProcess) -> None:
    """Every socket these processes listen on is bound to 127.0.0.1 (and they listen)."""
    for process in processes:
        sockets = process.listening()
        assert sockets, f"{process.name} listens on nothing"
        assert {address for _, address, _ in sockets} == {"127.0.0.1"}, (process.name, sockets)


# -- the process plumbing ---------------------------------------------------------------------


def test_require_names_binary_and_install_script() -> None:
    with pytest.raises(RuntimeError, match=r"no-such-real-part.*install-real-parts\.sh"):
        require("no-such-real-part")
    assert INSTALL_SCRIPT == "tests/install-real-parts.sh"
    assert os.path.isabs(require("sh"))


def test_failure_quotes_the_log_tail(tmp_path: Path) -> None:
    argv = ["sh", "-c", "echo first-line; echo 'the real cause' >&2; exit 3"]
    with (
        ManagedProcess(argv, tmp_path / "fail.log") as proc,
        pytest.raises(ProcessFailedError, match=r"(?s)status 3.*the real cause"),
    ):
        proc.wait_port(9, timeout=5.0)


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    # (The log starts with the command line: print the marker so that it is not in there.)
    script = "trap '' TERM; printf 'ign%s\\n' oring; while :; do sleep 0.05; done"
    proc = ManagedProcess(["sh", "-c", script], tmp_path / "stubborn.log", stop_timeout=0.3)
    with proc:
        proc.wait_until(lambda: "ignoring" in proc.log_tail(), 5.0, "the shell to start")
    assert proc.returncode == -signal.SIGKILL
    assert "ignored SIGTERM" in proc.log_tail()


# -- real peers -------------------------------------------------------------------------------


@pytest.mark.realparts
async def test_libtorrent_to_libtorrent_direct(tmp_path: Path, blob: Path) -> None:
    """libtorrent seed -> libtorrent leech by a direct connection, no tracker; also shows the
    pattern for trio tests: blocking waits go through ``trio.to_thread.run_sync``."""
    metainfo = lt_make_torrent(blob, PIECE_LENGTH, [])
    out = tmp_path / "leech"
    with (
        libtorrent_seed(tmp_path, metainfo, blob.parent) as seed,
        libtorrent_leech(tmp_path, metainfo, out) as leech,
    ):
        assert port_accepts(seed.listen_port)
        leech.connect_peer("127.0.0.1", seed.listen_port)
        done = await trio.to_thread.run_sync(leech.wait_complete, TIMEOUT)
        status = leech.status()
        seed_status = seed.status()
        assert_loopback_only(seed.process, leech.process)
    assert sha256(out / blob.name) == sha256(blob)
    assert status.total_payload_download == BLOB_SIZE
    assert status.hash_failures == 0
    assert seed_status.total_payload_upload >= BLOB_SIZE
    assert 0 < done.elapsed < TIMEOUT
    assert done.cpu_seconds >= 0
    # Both workers are gone.
    assert not seed.process.running
    assert not leech.process.running


@pytest.mark.realparts
def test_aria2_seed_to_libtorrent_via_opentracker(tmp_path: Path, blob: Path) -> None:
    with opentracker(tmp_path / "tracker") as tracker:
        metainfo = lt_make_torrent(blob, PIECE_LENGTH, [tracker.announce_url])
        infohash = infohash_v1(metainfo)
        tracker.allow(infohash)
        out = tmp_path / "leech"
        with aria2_seed(tmp_path, metainfo, blob.parent) as seed:
            # Tracker-agnostic wait (works with the project's tracker too).
            wait_for_peer(tracker.announce_url, infohash, seed.listen_port, timeout=TIMEOUT)
            with libtorrent_leech(tmp_path, metainfo, out, use_trackers=True) as leech:
                done = leech.wait_complete(TIMEOUT)
                status = leech.status()
                assert_loopback_only(tracker.process, seed.process, leech.process)
    assert sha256(out / blob.name) == sha256(blob)
    assert status.total_payload_download == BLOB_SIZE
    assert status.hash_failures == 0
    assert done.elapsed < TIMEOUT


@pytest.mark.realparts
def test_libtorrent_seed_to_aria2_via_opentracker(tmp_path: Path, blob: Path) -> None:
    with opentracker(tmp_path / "tracker") as tracker:
        metainfo = lt_make_torrent(blob, PIECE_LENGTH, [tracker.announce_url])
        infohash = infohash_v1(metainfo)
        tracker.allow(infohash)
        out = tmp_path / "leech"
        with libtorrent_seed(tmp_path, metainfo, blob.parent, use_trackers=True) as seed:
            tracker.wait_peers(infohash, seeders=1, timeout=TIMEOUT)
            with aria2_leech(tmp_path, metainfo, out) as leech:
                done = leech.wait_complete(TIMEOUT)
                status = leech.status()
                assert_loopback_only(tracker.process, seed.process, leech.process)
            seed_status = seed.status()
    assert sha256(out / blob.name) == sha256(blob)
    assert status.completed_length == BLOB_SIZE
    assert seed_status.total_payload_upload >= BLOB_SIZE
    assert done.elapsed < TIMEOUT


@pytest.mark.realparts
def test_seeds_refuse_wrong_data(tmp_path: Path, blob: Path) -> None:
    """A seed whose data does not match its metainfo fails at start, quoting its log."""
    metainfo = lt_make_torrent(blob, PIECE_LENGTH, [])
    blob.write_bytes(os.urandom(BLOB_SIZE))
    with (
        pytest.raises(ProcessFailedError, match="incomplete or wrong"),
        libtorrent_seed(tmp_path, metainfo, blob.parent),
    ):
        pass
    with (
        pytest.raises(ProcessFailedError, match="incomplete or wrong"),
        aria2_seed(tmp_path, metainfo, blob.parent),
    ):
        pass
