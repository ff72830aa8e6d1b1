"""Run one p2p engine peer as its own process (for benchmarks and multi-process tests).

    python -m tests.bench.engine_peer seed  --torrent T --data FILE [--port P]
    python -m tests.bench.engine_peer leech --torrent T --data FILE [--peer HOST:PORT ...]

Prints one JSON line when listening (``{"event": "listening", "port": ...}``) and,
for a leecher, one when complete (``{"event": "complete", "seconds": ..., "cpu": ...}``).
A leecher exits after completing unless ``--keep-seeding``; a seed runs until killed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import trio

from p2p_common import metainfo
from p2p_common.engine import Engine
from p2p_common.settings import split_host_port
from p2p_common.storage import PieceFile


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> None:
    meta = metainfo.parse(Path(args.torrent).read_bytes())  # noqa: ASYNC240 - start-up
    data = Path(args.data)
    engine = Engine(
        host=args.host,
        port=args.port,
        role="proxy" if args.mode == "seed" else "agent",
        download_rate=args.download_rate,
        upload_rate=args.upload_rate,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.serve)
        if args.mode == "seed":
            await engine.add_torrent(meta, PieceFile(meta, data, complete=True))
            _say(event="listening", port=engine.port)
            await trio.sleep_forever()
        _say(event="listening", port=engine.port)
        store = PieceFile(meta, data, Path(str(data) + ".bits"))
        started, cpu = time.monotonic(), _cpu()
        peers = [split_host_port(p) for p in args.peer]
        torrent = await engine.add_torrent(meta, store, peers=peers)
        await torrent.wait_complete()
        _say(
            event="complete",
            seconds=time.monotonic() - started,
            cpu=_cpu() - cpu,
            by_role=dict(torrent.downloaded_by_role),
            max_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        )
        if not args.keep_seeding:
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["seed", "leech"])
    parser.add_argument("--torrent", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--download-rate", type=float, default=0)
    parser.add_argument("--upload-rate", type=float, default=0)
    parser.add_argument("--keep-seeding", action="store_true")
    args = parser.parse_args()
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
