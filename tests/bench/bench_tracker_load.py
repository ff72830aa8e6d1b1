"""5,000 peers on several source addresses: p2p-tracker versus opentracker, same load, same run.

Run from the repository root::

    python -m tests.bench.bench_tracker_load                 # ~30 s with the defaults
    python -m tests.bench.bench_tracker_load --peers 5000 --addresses 16 --rounds 3

``--peers`` simulated peers live on ``--addresses`` loopback source addresses (127.0.0.10,
127.0.0.11, ...), the way nodes of a cluster reach the tracker from their own addresses, spread
over ``--torrents`` swarms so that no address has more than 4 peers in one swarm (within the
default ``maxPeersPerAddress`` of 8) nor more than ``--torrents`` torrents. p2p-tracker runs as
a process from a YAML file with its per-address caps applied to loopback too
(``uncappedAddresses: []``), so every announce pays for the cap bookkeeping it pays in a
cluster; opentracker (Debian build) runs with the swarms' infohashes whitelisted.

The load generator is this process: plain non-blocking sockets and ``selectors``, requests
built in advance (fully percent-encoded binary ``info_hash``/``peer_id``, ``compact=1``,
``numwant=50``), ``--per-address`` keep-alive connections bound to each source address, each
sending its address's announces back to back (closed loop). opentracker closes the connection
after every answer, so against it each announce opens a new connection (the latency is
measured from the request's first byte, as wrk does). The generator needs about 20-40 us per
announce: far from the limit against p2p-tracker, close to it against opentracker, whose
announces/s is then a lower bound; the CPU time each tracker spends per announce does not
depend on the generator.

Phases, for each tracker: ``join`` (every peer announces ``started`` once: the table grows
from empty, as in a rollout) and then ``--rounds`` rounds of ``steady`` re-announces of every
peer (alternating between the trackers). Reported: announces/s, p50 and p99 latency, tracker
CPU per announce, and the tracker's peak RSS (VmHWM) holding the peers; then the ratios
ours/opentracker. Every answer must be HTTP 200 without ``failure reason``, and a newcomer must
get every peer of a swarm back at the end; otherwise the exit status is 1.

See also ``bench_tracker`` (wrk from one address, 20,000 peers) and ``bench_tracker_flood``
(the tracker's pure core under floods).
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import selectors
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_from_bytes

from p2p_common.tracker_proto import AnnounceRequest, announce_url, parse_announce_response
from tests.realparts.opentracker import opentracker
from tests.realparts.procs import ManagedProcess, free_port, require
from tests.realparts.procstats import MiB, proc_stats
from tests.services import service_env

FIRST_ADDRESS = 10
"""The peers' source addresses are 127.0.0.10, 127.0.0.11, ..."""
MAX_PEERS_PER_ADDRESS = 8
"""p2p-tracker's default ``maxPeersPerAddress``: the layout stays within it."""
IDLE_LIMIT = 10.0
"""Seconds without any answer after which a phase fails."""


# --- the simulated peers ----------------------------------------------------------------------


def infohash(torrent: int) -> bytes:
    return hashlib.sha1(b"bench-tracker-load-%d" % torrent).digest()


@dataclass(frozen=True)
class Layout:
    """Peer ``i`` is on address ``i % addresses``, in torrent ``(i // addresses) % torrents``,
    on port ``10000 + i // addresses`` (so every (address, port) pair is one peer)."""

    peers: int
    addresses: int
    torrents: int

    def address(self, peer: int) -> str:
        return f"127.0.0.{FIRST_ADDRESS + peer % self.addresses}"

    def torrent(self, peer: int) -> int:
        return (peer // self.addresses) % self.torrents

    def port(self, peer: int) -> int:
        return 10000 + peer // self.addresses

    def peer_id(self, peer: int) -> bytes:
        return b"-BL0001-" + peer.to_bytes(12, "big")

    def left(self, peer: int) -> int:
        return 0 if peer % 4 == 0 else 1 << 20  # a quarter of them seeds

    def check(self) -> None:
        per_swarm = -(-self.peers // (self.addresses * self.torrents))
        if per_swarm > MAX_PEERS_PER_ADDRESS:
            raise SystemExit(
                f"{per_swarm} peers of one address per swarm: more than maxPeersPerAddress "
                f"({MAX_PEERS_PER_ADDRESS}); use more --addresses or --torrents"
            )
        if self.addresses + FIRST_ADDRESS > 250:
            raise SystemExit("at most 240 --addresses")
        if self.peers // self.addresses + 10000 > 65535:
            raise SystemExit("too many peers per address for distinct ports")

    def request(self, peer: int, event: str) -> bytes:
        query = (
            f"info_hash={quote_from_bytes(infohash(self.torrent(peer)), safe='')}"
            f"&peer_id={quote_from_bytes(self.peer_id(peer), safe='')}"
            f"&port={self.port(peer)}&uploaded=0&downloaded=0&left={self.left(peer)}"
            f"&compact=1&numwant=50" + (f"&event={event}" if event else "")
        )
        return f"GET /announce?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    def by_address(self, event: str) -> dict[str, list[bytes]]:
        found: dict[str, list[bytes]] = {}
        for peer in range(self.peers):
            found.setdefault(self.address(peer), []).append(self.request(peer, event))
        return found


# --- the load generator -----------------------------------------------------------------------


@dataclass
class Result:
    announces: int
    seconds: float
    latencies_ns: list[int]
    errors: list[str]
    server_cpu: float
    client_cpu: float
    connects: int

    @property
    def rate(self) -> float:
        return self.announces / self.seconds

    def percentile(self, fraction: float) -> float:
        """Milliseconds."""
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6

    @property
    def cpu_us_per_announce(self) -> float:
        return 1e6 * self.server_cpu / max(1, self.announces)


@dataclass(eq=False)
class Connection:
    address: str
    requests: list[bytes]
    sock: socket.socket | None = None
    pending: bytes | None = None
    sent_at: int = 0
    buffer: bytearray = field(default_factory=bytearray)
    length: int | None = None
    status: int = 0
    answered: int = 0
    """Answers on the current socket."""


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(
    port: int, server: ManagedProcess, requests: dict[str, list[bytes]], per_address: int
) -> Result:
    """Send every request (each address's on its own connections), closed loop."""
    selector = selectors.DefaultSelector()
    connections = []
    for address, queue in requests.items():
        for n in range(per_address):
            connections.append(Connection(address, queue[n::per_address]))
    latencies: list[int] = []
    errors: list[str] = []
    connects = 0
    closes_after_answer = False

    def connect(conn: Connection) -> None:
        nonlocal connects
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((conn.address, 0))
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        conn.sock, conn.answered = sock, 0
        connects += 1
        selector.register(sock, selectors.EVENT_READ, conn)

    def close(conn: Connection) -> None:
        if conn.sock is not None:
            selector.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None

    def send_next(conn: Connection) -> bool:
        if conn.pending is None:
            if not conn.requests:
                close(conn)
                return False
            conn.pending = conn.requests.pop()
        for _ in range(2):
            if conn.sock is None:
                connect(conn)
            assert conn.sock is not None
            conn.buffer.clear()
            conn.length = None
            conn.sent_at = time.perf_counter_ns()
            try:
                sent = conn.sock.send(conn.pending)
            except (BrokenPipeError, ConnectionResetError):  # closed after its last answer
                close(conn)
                continue
            if sent != len(conn.pending):
                raise RuntimeError("a request did not fit in an empty socket buffer")
            return True
        raise RuntimeError("the tracker closed a new connection at once")

    def answered(conn: Connection) -> None:
        latencies.append(time.perf_counter_ns() - conn.sent_at)
        body = bytes(conn.buffer[conn.buffer.index(b"\r\n\r\n") + 4 :])
        if conn.status != 200 or b"failure reason" in body or not body.startswith(b"d"):
            errors.append(f"HTTP {conn.status}: {body[:120]!r}")
        conn.pending = None
        conn.answered += 1

    server_cpu, client_cpu = server.cpu_seconds(), _self_cpu()
    started = time.perf_counter()
    active = sum(send_next(conn) for conn in connections)
    while active:
        events = selector.select(timeout=IDLE_LIMIT)
        if not events:
            raise RuntimeError(f"no answer for {IDLE_LIMIT:g} s ({active} connections waiting)")
        for key, _ in events:
            conn: Connection = key.data
            assert conn.sock is not None
            try:
                data = conn.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                if conn.buffer or conn.answered == 0:
                    errors.append(f"connection closed after {len(conn.buffer)} bytes of an answer")
                    conn.pending = None
                else:  # the server closes after each answer (opentracker): resend on a new one
                    closes_after_answer = True
                close(conn)
                active -= not send_next(conn)
                continue
            conn.buffer += data
            if conn.length is None:
                end = conn.buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = bytes(conn.buffer[:end]).split(b"\r\n")
                conn.status = int(head[0].split()[1])
                conn.length = next(
                    (
                        int(h.partition(b":")[2])
                        for h in head
                        if h.lower().startswith(b"content-length:")
                    ),
                    -1,
                )
                if conn.length < 0:
                    raise RuntimeError(f"an answer without Content-Length: {head!r}")
            if len(conn.buffer) - conn.buffer.index(b"\r\n\r\n") - 4 < conn.length:
                continue
            answered(conn)
            if closes_after_answer:
                close(conn)
            active -= not send_next(conn)
    seconds = time.perf_counter() - started
    selector.close()
    return Result(
        announces=len(latencies),
        seconds=seconds,
        latencies_ns=latencies,
        errors=errors,
        server_cpu=server.cpu_seconds() - server_cpu,
        client_cpu=_self_cpu() - client_cpu,
        connects=connects,
    )


# --- the trackers -----------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    process: ManagedProcess


@contextmanager
def p2p_tracker(workdir: Path) -> Iterator[Target]:
    """p2p-tracker as a process, per-address caps on for loopback too."""
    port = free_port()
    config = workdir / "p2p-tracker.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nlogLevel: warning\nuncappedAddresses: []\n")
    binary = Path(sys.executable).with_name("p2p-tracker")
    argv = [str(binary)] if binary.exists() else [require("p2p-tracker")]
    process = ManagedProcess(
        [*argv, "--config", str(config)],
        workdir / "p2p-tracker.log",
        name="p2p-tracker",
        env=service_env(),
    )
    with process:
        process.wait_port(port, timeout=15)
        yield Target("p2p-tracker", port, process)


def newcomer_sees_the_swarm(target: Target, layout: Layout) -> str | None:
    """A fresh leecher from an unused address announces to swarm 0: does it get every peer?"""
    request = AnnounceRequest(infohash(0), b"-NEWCMR-" + bytes(12), 40000, left=1, numwant=200)
    url = announce_url(f"http://127.0.0.1:{target.port}/announce", request)
    sock = socket.create_connection(
        ("127.0.0.1", target.port), timeout=10, source_address=("127.0.0.250", 0)
    )
    with sock:
        path = url.partition(f"127.0.0.1:{target.port}")[2]
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    answer = parse_announce_response(raw.partition(b"\r\n\r\n")[2])
    handed = {(p.ip, p.port) for p in answer.peers}
    expected = {
        (layout.address(p), layout.port(p)) for p in range(layout.peers) if layout.torrent(p) == 0
    }
    missing = expected - handed
    return f"{len(missing)} of {len(expected)} peers missing" if missing else None


def _fmt(result: Result) -> str:
    return (
        f"{result.rate:8.0f}/s  p50 {result.percentile(0.5):6.2f} ms  "
        f"p99 {result.percentile(0.99):6.2f} ms  tracker CPU "
        f"{result.server_cpu / result.seconds:4.2f} ({result.cpu_us_per_announce:5.0f} us/announce)"
        f"  generator CPU {result.client_cpu / result.seconds:4.2f}"
        f"  {result.connects} connections"
        + (f"  ERRORS {len(result.errors)}" if result.errors else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=5000)
    parser.add_argument("--addresses", type=int, default=16, help="source addresses 127.0.0.x")
    parser.add_argument("--per-address", type=int, default=1, help="connections per address")
    parser.add_argument("--torrents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="steady rounds per tracker")
    args = parser.parse_args(argv)
    require("opentracker")
    layout = Layout(args.peers, args.addresses, args.torrents)
    layout.check()
    joins, steady = layout.by_address("started"), layout.by_address("")
    print(
        f"load: {args.peers:,} peers on {args.addresses} addresses x {args.per_address} "
        f"connection(s), {args.torrents} swarms, numwant=50, compact; p2p-tracker with "
        "per-address caps on loopback",
        flush=True,
    )
    results: dict[str, dict[str, list[Result]]] = {}
    memory: dict[str, tuple[int, int]] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-tracker-load-") as tmp:
        work = Path(tmp)
        hashes = [infohash(t) for t in range(args.torrents)]
        with opentracker(work / "ot", hashes) as ot, p2p_tracker(work) as ours:
            targets = [ours, Target("opentracker", ot.port, ot.process)]
            for target in targets:
                result = run_load(target.port, target.process, joins, args.per_address)
                results.setdefault(target.name, {}).setdefault("join", []).append(result)
                print(f"join    {target.name:11} {_fmt(result)}", flush=True)
            for _ in range(args.rounds):
                for target in targets:
                    result = run_load(target.port, target.process, steady, args.per_address)
                    results[target.name].setdefault("steady", []).append(result)
                    print(f"steady  {target.name:11} {_fmt(result)}", flush=True)
            for target in targets:
                stats = proc_stats(target.process.pid)
                memory[target.name] = (stats.rss, stats.hwm)
                problem = newcomer_sees_the_swarm(target, layout)
                if problem:
                    failures.append(f"{target.name}: a newcomer to swarm 0: {problem}")
                target.process.check_alive()
    for name, phases in results.items():
        for phase, runs in phases.items():
            for run in runs:
                failures.extend(f"{name} {phase}: {error}" for error in run.errors[:3])
                if run.announces != args.peers:
                    failures.append(f"{name} {phase}: {run.announces} answers of {args.peers}")

    def best(name: str, phase: str) -> Result:
        return max(results[name][phase], key=lambda r: r.rate)

    print()
    for phase in ("join", "steady"):
        mine, theirs = best("p2p-tracker", phase), best("opentracker", phase)
        p50, p99 = (
            (mine.percentile(0.5), theirs.percentile(0.5)),
            (
                mine.percentile(0.99),
                theirs.percentile(0.99),
            ),
        )
        cpu = (mine.cpu_us_per_announce, theirs.cpu_us_per_announce)
        print(
            f"{phase:6}: announces/s ratio (ours/opentracker) {mine.rate / theirs.rate:.3f} "
            f"({mine.rate:.0f} vs {theirs.rate:.0f}); p50 {p50[0]:.2f} vs {p50[1]:.2f} ms "
            f"({p50[0] / p50[1]:.1f}x); p99 {p99[0]:.2f} vs {p99[1]:.2f} ms "
            f"({p99[0] / p99[1]:.1f}x); CPU per announce {cpu[0]:.0f} vs {cpu[1]:.0f} us "
            f"({cpu[0] / cpu[1]:.1f}x)"
        )
    for name, (rss, hwm) in memory.items():
        print(
            f"memory: {name} holding {args.peers:,} peers: RSS {rss / MiB:.1f} MiB, "
            f"peak {hwm / MiB:.1f} MiB"
        )
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
