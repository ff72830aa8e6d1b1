"""Hostile peers against a p2p seed process: what each attack costs it (issue 8's figures).

    python -m tests.bench.bench_hostile [--seconds 20]

A p2p engine seeds a 128 MiB blob of 8,192 pieces (16 KiB each: the piece count is what makes
availability messages expensive) as its own process (tests/bench/engine_peer.py). From this
process, over loopback:

- ``request flood``: a foreign peer that never reads sends REQUESTs (it is choked, so each one
  is refused) until the seed hangs up or 60 MiB went out: bytes sent, the seed's RSS growth.
- ``bitfield flood`` / ``growing bitfields`` / ``have flood``: 1 MiB/s of BITFIELDs (each
  revealing nothing new, or each revealing one more piece) or of HAVEs for ``--seconds``: the
  seed's CPU over that time, and when it hung up.
- ``silent sockets``: 300 connections from 127.0.0.2 that never send a byte, then a handshake
  from 127.0.0.1: how long the legitimate peer waited.

Each figure is printed beside the issue's goal; the seed's idle CPU over the same time is the
baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from p2p_common import metainfo as mi
from p2p_common import wire
from p2p_common.bitfield import Bitfield
from tests.realparts.procs import ManagedProcess

MiB = 1024 * 1024
PIECE = 16 * 1024
SIZE = 128 * MiB
FOREIGN = b"-XX0001-" + b"b" * 12


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _handshaken(port: int, info_hash: bytes, source: str = "127.0.0.1") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    await stream.send_all(
        wire.encode_handshake(info_hash, FOREIGN, wire.reserved_bytes(extensions=False))
    )
    received = b""
    with trio.fail_after(10):
        while len(received) < wire.HANDSHAKE_LENGTH:
            chunk = await stream.receive_some(wire.HANDSHAKE_LENGTH - len(received))
            if not chunk:
                raise RuntimeError("the seed hung up before its handshake")
            received += chunk
    return stream


def _growing_bitfields(pieces: int) -> Iterator[bytes]:
    """Bitfields that each reveal one more piece: every one is news."""
    bits = Bitfield(pieces)
    for index in range(pieces):
        bits.set(index)
        yield wire.encode_bitfield(bits)


async def _flood(
    stream: trio.SocketStream,
    message: bytes | Iterator[bytes],
    *,
    most: int,
    rate: float | None,
    seconds: float,
) -> tuple[int, float | None]:
    """Send ``message`` repeatedly, or each message of an iterator once (at ``rate`` bytes/s if
    given), until the peer hangs up, ``most`` bytes went out or ``seconds`` passed; (bytes
    sent, seconds until the hang-up or None)."""
    if isinstance(message, bytes):
        batch = message * max(1, 64 * 1024 // len(message))
        batches: Iterator[bytes] = iter(lambda: batch, b"")
    else:
        batches = message
    sent = 0
    started = trio.current_time()
    with trio.move_on_after(seconds):
        try:
            for batch in batches:
                if sent >= most:
                    break
                await stream.send_all(batch)
                sent += len(batch)
                if rate is not None:
                    await trio.sleep_until(started + sent / rate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return sent, trio.current_time() - started
        # Our last writes may sit in buffers: a closed connection shows when reading.
        with trio.move_on_after(2):
            try:
                while await stream.receive_some(65536):
                    pass
                return sent, trio.current_time() - started
            except trio.BrokenResourceError:
                return sent, trio.current_time() - started
    return sent, None


async def measure(port: int, pid: int, meta: mi.Metainfo, seconds: float) -> dict[str, object]:
    results: dict[str, object] = {}
    cpu0, t0 = _cpu(pid), time.monotonic()
    await trio.sleep(min(5.0, seconds))
    results["idle_cpu_share"] = (_cpu(pid) - cpu0) / (time.monotonic() - t0)

    rss0 = _status(pid, "VmRSS")
    stream = await _handshaken(port, meta.info_hash, "127.0.0.11")
    request = wire.encode_request(0, 0, wire.BLOCK_SIZE)
    sent, after = await _flood(stream, request, most=60 * MiB, rate=None, seconds=60)
    results["request_flood"] = {
        "sent_mib": sent / MiB,
        "dropped_after_s": after,
        "rss_growth_mib": (_status(pid, "VmHWM") - rss0) / MiB,
    }
    await stream.aclose()

    bits = Bitfield(meta.num_pieces)
    floods: tuple[tuple[str, bytes | Iterator[bytes]], ...] = (
        ("bitfield_flood", wire.encode_bitfield(bits)),
        ("growing_bitfields", _growing_bitfields(meta.num_pieces)),
        ("have_flood", b"".join(wire.encode_have(i) for i in range(0, meta.num_pieces, 7))),
    )
    for number, (name, message) in enumerate(floods):
        stream = await _handshaken(port, meta.info_hash, f"127.0.0.{12 + number}")
        cpu0, t0 = _cpu(pid), time.monotonic()
        sent, after = await _flood(stream, message, most=10**12, rate=MiB, seconds=seconds)
        # CPU over the whole window, even when the seed hung up early.
        await trio.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        results[name] = {
            "sent_mib": sent / MiB,
            "dropped_after_s": after,
            "cpu_share": (_cpu(pid) - cpu0) / (time.monotonic() - t0),
        }
        await stream.aclose()

    # The same, reconnecting after every drop: each connection starts with a fresh allowance
    # (the address's strikes then close its connections unanswered for a while).
    cpu0, t0 = _cpu(pid), time.monotonic()
    connections = 0
    with trio.move_on_after(seconds):
        while True:
            try:
                stream = await _handshaken(port, meta.info_hash, "127.0.0.20")
            except (OSError, RuntimeError, trio.BrokenResourceError, trio.TooSlowError):
                await trio.sleep(0.01)  # refused: try again
                continue
            connections += 1
            await _flood(
                stream, _growing_bitfields(meta.num_pieces), most=10**12, rate=None, seconds=5
            )
            await stream.aclose()
    results["reconnecting_bitfields"] = {
        "connections": connections,
        "cpu_share": (_cpu(pid) - cpu0) / (time.monotonic() - t0),
    }

    silent = []
    for _ in range(300):
        silent.append(await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2"))
    started = time.monotonic()
    stream = await _handshaken(port, meta.info_hash)
    results["silent_sockets"] = {"handshake_s": time.monotonic() - started}
    await stream.aclose()
    for quiet in silent:
        await quiet.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        data = work / "blob"
        with data.open("wb") as handle:
            for _ in range(SIZE // (16 * MiB)):
                handle.write(os.urandom(16 * MiB))
        pieces, digest, length = mi.hash_file(data, PIECE)
        meta = mi.build(digest, length, pieces, [], piece_length=PIECE)
        torrent = work / "blob.torrent"
        torrent.write_bytes(meta.to_bytes())
        command = [sys.executable, "-m", "tests.bench.engine_peer", "seed"]
        with ManagedProcess(
            [*command, "--torrent", str(torrent), "--data", str(data)], work / "seed.log"
        ) as seed:
            seed.wait_until(lambda: "listening" in seed.log_tail(), 30, "the seed to listen")
            port = next(
                json.loads(line)["port"]
                for line in seed.log_tail().splitlines()
                if "listening" in line
            )
            results = trio.run(measure, port, seed.pid, meta, args.seconds)
            seed.check_alive()
    flood = results["request_flood"]
    print(f"pieces {meta.num_pieces}, piece {PIECE // 1024} KiB, floods {args.seconds:g} s")
    print(f"seed idle (baseline)   : {results['idle_cpu_share']:.1%} of a core")
    after = flood["dropped_after_s"]  # type: ignore[index]
    when = "never dropped" if after is None else f"dropped after {flood['sent_mib']:.2f} MiB"  # type: ignore[index]
    print(
        f"request flood          : {when}, RSS +{flood['rss_growth_mib']:.1f} MiB "  # type: ignore[index]
        "(goal: < 64 MiB for 60 MiB sent)"
    )
    for name in ("bitfield_flood", "growing_bitfields", "have_flood"):
        entry = results[name]
        dropped = entry["dropped_after_s"]  # type: ignore[index]
        when = "not dropped" if dropped is None else f"dropped after {dropped:.2f} s"
        print(
            f"{name.replace('_', ' '):23}: {entry['cpu_share']:.1%} of a core over the window, "  # type: ignore[index]
            f"{entry['sent_mib']:.2f} MiB sent, {when} (goal: < 30% or dropped)"  # type: ignore[index]
        )
    again = results["reconnecting_bitfields"]
    print(
        f"reconnecting bitfields : {again['cpu_share']:.1%} of a core over the window, "  # type: ignore[index]
        f"{again['connections']} connections (goal: < 30%)"  # type: ignore[index]
    )
    print(
        f"300 silent sockets     : a real peer's handshake took "
        f"{results['silent_sockets']['handshake_s']:.3f} s (goal: < 5 s)"  # type: ignore[index]
    )


if __name__ == "__main__":
    main()
