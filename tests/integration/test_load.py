"""Load (issue 8, item 16): real service processes under many clients at once.

- **200 concurrent pulls on one agent.** A distribution registry as origin, one tracker, one
  proxy and one agent as processes. Four images in four repositories share some of their
  layers (4 KiB to 20 MiB; configs of about 1 KB; one layer below ``swarmMinSize`` comes
  straight from the proxy, the others through the swarm). 200 pulls start at the same moment on
  a cold agent; each fetches its image's manifest and then one blob: 120 read the whole blob,
  40 a byte range, and 40 close the connection after half of the blob. Every pull that was not
  cancelled must get exactly the right bytes; afterwards the agent is alive and serves a fresh
  skopeo pull, its peak RSS (VmHWM) stays bounded, ``partial/`` and ``tmp/`` are empty once
  every download settled, its open file descriptors come back to the baseline (no client
  connection left, no file but the one each seeded blob keeps open, connections to the proxy,
  tracker and peers within their pools), each blob left the origin once, and every process
  stops gracefully.
- **5,000 peers announcing to one tracker.** A p2p-tracker process with the per-address caps
  applied to loopback (``uncappedAddresses: []``) and ``maxTorrentsPerAddress`` lowered to 100.
  4,750 legitimate peers from 50 source addresses (127.0.0.10-59, one httpx transport bound to
  each) in 95 swarms, and one address flooding 250 peers: 100 peer ids into one swarm, 150 new
  infohashes; then one legitimate peer in five announces ``completed``. Every announce is
  answered 200 with peers; the legitimate ones without warning;
  the flood is listed exactly up to the caps (8 peers in the swarm, 100 torrents); every
  legitimate peer is still handed out; the tracker's RSS stays bounded.

Nothing is timed: every wait is for an event, bounded only against a hang (the one for the
agent's descriptors at 30 s, below its 60 s keep-alive timeout, which would otherwise close
leftover connections and hide them). Measured values are printed (``pytest -s``) and recorded
in docs/benchmarks.md. These tests found two descriptor leaks, fixed with them: connections
their clients closed while idle stayed open until the keep-alive timeout
(tests/component/test_idle_connections.py), and every downloaded blob kept its deleted
bitfield file open while seeded (tests/unit/test_storage.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2p_common.tracker_proto import (
    AnnounceRequest,
    AnnounceResponse,
    Event,
    announce_url,
    parse_announce_response,
)
from tests.demo.cluster import ProcessSet, Service, plan_cluster
from tests.realparts import images
from tests.realparts.procs import ManagedProcess, free_port
from tests.realparts.procstats import MiB, open_fds, proc_stats, tcp_sockets
from tests.realparts.registry import run_registry
from tests.services import service_binary, service_env

pytestmark = pytest.mark.realparts

KiB = 1024
DEADLINE = 90.0
"""Seconds any one awaited event may take: a guard against hangs, not a timing assertion."""
POLL = 0.05
DESCRIPTORS_DEADLINE = 30.0
"""Seconds the agent's descriptors may take to come back after the load: generous, yet below
its 60 s keep-alive timeout, so that client connections left open until then still fail."""


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], what: str, *, deadline: float = DEADLINE
) -> Any:
    """Poll ``predicate`` until it returns something truthy (at most ``deadline`` s)."""
    with trio.move_on_after(deadline):
        while True:
            result = await predicate()
            if result:
                return result
            await trio.sleep(POLL)
    raise AssertionError(f"timed out after {deadline:g} s waiting for {what}")


async def metric_samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples ``name`` of a ``/metrics`` page, by their sorted labels."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        response = await client.get(url)
    response.raise_for_status()
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = float(sample.value)
    return found


# --- 200 concurrent pulls on one agent ----------------------------------------------------------

LAYERS = {
    "base": 20 * MiB,
    "runtime": 8 * MiB,
    "app-d": 12 * MiB,
    "tools": 3 * MiB,
    "app-a": 1536 * KiB,
    "assets": 600 * KiB,  # below swarmMinSize (1 MB): straight from the proxy, not seeded
    "etc": 64 * KiB,
    "tiny": 4 * KiB,
}
IMAGES = {
    "load/a": ("base", "runtime", "app-a", "tiny"),
    "load/b": ("base", "runtime", "assets", "tiny"),
    "load/c": ("base", "tools", "etc", "tiny"),
    "load/d": ("app-d", "tools", "etc", "tiny"),
}
TAG = "1.0"
PULLS = 200
KINDS = ("whole",) * 6 + ("range",) * 2 + ("cancel",) * 2
"""Per 10 pulls of one (repository, blob): 6 whole, 2 ranges, 2 cancelled half way."""
MAX_RANGE = 4 * MiB
AGENT_RSS_BOUND = 400 * MiB
SWARM_MIN_SIZE = 10**6
"""The agent's default ``swarmMinSize``: blobs at least this big are seeded (one open file each)."""
PROXY_IDLE = 20
"""Idle connections the agent's HTTP client keeps to the proxy (httpx's default pool)."""


@dataclass(frozen=True)
class Footprint:
    """An agent's descriptors: TCP connections of clients on its registry API, other TCP
    connections (proxy, tracker, peers), and everything else (files, pipes, epoll, Unix and
    listening sockets)."""

    fds: int
    clients: int
    outbound: int
    other: int

    def __str__(self) -> str:
        return (
            f"{self.fds} fds ({self.clients} API clients, {self.outbound} outbound TCP, "
            f"{self.other} other)"
        )


def footprint(pid: int, api_port: int) -> Footprint:
    fds = proc_stats(pid).fds
    connected = [c for c in tcp_sockets(pid) if c.state != "LISTEN"]
    clients = sum(1 for c in connected if c.local_port == api_port)
    outbound = len(connected) - clients
    return Footprint(fds, clients, outbound, fds - len(connected))


def compose_image(name: str, layers: tuple[images.Blob, ...]) -> images.Image:
    """A single-platform OCI image of existing layer blobs (so images can share layers)."""
    config = images.Blob(
        images.OCI_CONFIG,
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Labels": {"p2p.test.image": name}},
                "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            },
            sort_keys=True,
        ).encode(),
    )
    manifest = images.Blob(
        images.OCI_MANIFEST,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": images.OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [layer.descriptor() for layer in layers],
            },
            sort_keys=True,
        ).encode(),
    )
    platform = images.PlatformImage("linux/amd64", manifest, config, layers)
    return images.Image(TAG, manifest, (platform,))


def build_images(workdir: Path) -> dict[str, images.Image]:
    layers = {
        name: images.Blob(images.OCI_LAYER, images.layer_tar(f"load/{name}", size, f"{name}.bin"))
        for name, size in LAYERS.items()
    }
    built = {}
    for repo, names in IMAGES.items():
        image = compose_image(repo, tuple(layers[n] for n in names))
        images.write_oci_layout(image, workdir / repo.replace("/", "-"))
        built[repo] = image
    return built


@dataclass(frozen=True)
class Pull:
    number: int
    kind: str
    repo: str
    blob: images.Blob
    first: int = 0
    last: int = 0
    """The byte range of a ``range`` pull."""

    def describe(self) -> str:
        what = f" bytes {self.first}-{self.last}" if self.kind == "range" else ""
        return f"pull {self.number} ({self.kind}{what} of {self.blob.digest[:19]} in {self.repo})"


def plan_pulls(built: dict[str, images.Image]) -> list[Pull]:
    """Every (repository, blob) pair gets the same mix of kinds; the order is shuffled so that
    the first request for a cold blob may be any kind, a cancelled one included."""
    rng = random.Random(16)
    pairs = [(repo, blob) for repo, image in built.items() for blob in image.blobs().values()]
    pulls = []
    for number in range(PULLS):
        repo, blob = pairs[number % len(pairs)]
        kind = KINDS[(number // len(pairs)) % len(KINDS)]
        first = last = 0
        if kind == "range":
            first = rng.randrange(blob.size)
            last = min(blob.size - 1, first + rng.randrange(1, MAX_RANGE))
        pulls.append(Pull(number, kind, repo, blob, first, last))
    rng.shuffle(pulls)
    return pulls


async def pull_manifest(
    client: httpx.AsyncClient, base: str, repo: str, image: images.Image
) -> None:
    response = await client.get(
        f"{base}/v2/{repo}/manifests/{TAG}", headers={"Accept": images.OCI_MANIFEST}
    )
    assert response.status_code == 200, f"manifest: {response.status_code} {response.text[:200]}"
    assert response.content == image.top.data, "manifest differs from what was pushed"


async def pull_whole(client: httpx.AsyncClient, base: str, pull: Pull) -> None:
    blob = pull.blob
    async with client.stream("GET", f"{base}/v2/{pull.repo}/blobs/{blob.digest}") as response:
        assert response.status_code == 200, f"status {response.status_code}"
        assert response.headers.get("docker-content-digest") == blob.digest
        digest, received = hashlib.sha256(), 0
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            received += len(chunk)
    assert received == blob.size, f"{received} bytes of {blob.size}"
    assert "sha256:" + digest.hexdigest() == blob.digest, "bytes differ from the digest"


async def pull_range(client: httpx.AsyncClient, base: str, pull: Pull) -> None:
    response = await client.get(
        f"{base}/v2/{pull.repo}/blobs/{pull.blob.digest}",
        headers={"Range": f"bytes={pull.first}-{pull.last}"},
    )
    assert response.status_code == 206, f"status {response.status_code}"
    expected_range = f"bytes {pull.first}-{pull.last}/{pull.blob.size}"
    assert response.headers.get("content-range") == expected_range
    assert response.content == pull.blob.data[pull.first : pull.last + 1], "range bytes differ"


async def pull_cancelled(host: str, port: int, pull: Pull) -> int:
    """GET the blob on a raw connection, read half of it (checking those bytes), close the
    connection. Returns how many body bytes were read."""
    blob = pull.blob
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(
            f"GET /v2/{pull.repo}/blobs/{blob.digest} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n\r\n".encode()
        )
        received = bytearray()
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some(64 * KiB)
            assert data, "connection closed before the response head"
            received += data
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head.split(b"\r\n", 1)[0]
        want = max(1, blob.size // 2)
        body_read = bytearray(body)
        while len(body_read) < want:
            data = await stream.receive_some(64 * KiB)
            assert data, f"connection closed after {len(body_read)} body bytes"
            body_read += data
        assert body_read[:want] == blob.data[:want], "the bytes read before cancelling differ"
        return len(body_read)
    finally:
        await stream.aclose()  # half way: the agent sees the client go


def agent_dirs(agent: Service) -> tuple[Path, Path, Path]:
    assert agent.data_dir is not None
    root = agent.data_dir
    return root / "blobs" / "sha256", root / "partial", root / "tmp"


async def test_200_concurrent_pulls_on_one_agent(tmp_path: Path) -> None:
    built = build_images(tmp_path / "layouts")
    blobs = {d: b for image in built.values() for d, b in image.blobs().items()}
    pulls = plan_pulls(built)
    with run_registry(tmp_path / "registry", auth="none") as registry:
        for repo, image in built.items():
            layout = tmp_path / "layouts" / repo.replace("/", "-")
            await trio.to_thread.run_sync(
                partial(images.push_image, layout, image, registry.host, repo)
            )
        before = await trio.to_thread.run_sync(registry.blob_gets)
        cluster = plan_cluster(
            tmp_path / "cluster",
            registry.url,
            agents=1,
            proxies=1,
            overrides={"tracker": {"logFormat": "json"}, "proxy": {"logFormat": "json"}},
        )
        (agent,) = cluster.agents
        host, _, port_text = agent.config["listen"].rpartition(":")
        base = f"http://{agent.config['listen']}"
        processes = ProcessSet()
        try:
            cluster.start(processes)
            with trio.fail_after(DEADLINE):
                await cluster.wait_ready()
            assert agent.process is not None
            pid = agent.process.pid
            baseline = proc_stats(pid)
            start = footprint(pid, int(port_text))
            peak_fds = baseline.fds

            failures: list[str] = []
            outcome = {"whole": 0, "range": 0, "cancel": 0}

            async def one(client: httpx.AsyncClient, pull: Pull) -> None:
                try:
                    await pull_manifest(client, base, pull.repo, built[pull.repo])
                    if pull.kind == "whole":
                        await pull_whole(client, base, pull)
                    elif pull.kind == "range":
                        await pull_range(client, base, pull)
                    else:
                        await pull_cancelled(host, int(port_text), pull)
                except Exception as exc:  # every failure is reported, whatever its kind
                    failures.append(f"{pull.describe()}: {exc!r}")
                else:
                    outcome[pull.kind] += 1

            async def sample(stop: trio.Event) -> None:
                nonlocal peak_fds
                while not stop.is_set():
                    peak_fds = max(peak_fds, proc_stats(pid).fds)
                    with trio.move_on_after(POLL):
                        await stop.wait()

            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            timeout = httpx.Timeout(DEADLINE)
            stop_sampling = trio.Event()
            async with (
                httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client,
                trio.open_nursery() as outer,
            ):
                outer.start_soon(sample, stop_sampling)
                with trio.fail_after(3 * DEADLINE):
                    async with trio.open_nursery() as nursery:
                        for pull in pulls:  # all start in the same scheduling round
                            nursery.start_soon(one, client, pull)
                stop_sampling.set()
            cluster.check_alive(when="after the load")
            assert not failures, f"{len(failures)} failed pulls:\n" + "\n".join(failures)
            assert outcome == {"whole": 120, "range": 40, "cancel": 40}, outcome

            # Everything settles: every blob cached, nothing left in partial/ or tmp/.
            blob_dir, partial_dir, tmp_dir = agent_dirs(agent)

            async def settled() -> bool:
                cached = all((blob_dir / d.removeprefix("sha256:")).exists() for d in blobs)
                return cached and not any(partial_dir.iterdir()) and not any(tmp_dir.iterdir())

            await wait_for(settled, "every blob cached and partial/, tmp/ empty")

            # Descriptors come back: no client connection left open, no file but the seeded
            # blobs', and no more connections to the proxy, tracker and peers than their pools.
            seeded = sum(1 for b in blobs.values() if b.size >= SWARM_MIN_SIZE)
            api_port = int(port_text)
            # the proxy's idle pool, a peer connection or two per seeded blob, the tracker's
            outbound_bound = PROXY_IDLE + 2 * seeded + 2

            async def back() -> Footprint | None:
                now = footprint(pid, api_port)
                ok = (
                    now.clients == 0
                    and now.other <= start.other + seeded
                    and now.outbound <= outbound_bound
                )
                return now if ok else None

            try:
                settled_fds = await wait_for(
                    back, "the agent's descriptors to come back", deadline=DESCRIPTORS_DEADLINE
                )
            except AssertionError as exc:
                now = footprint(pid, api_port)
                raise AssertionError(
                    f"{exc}: at start {start}, now {now}; files "
                    f"{sorted(t for t in open_fds(pid) if not t.startswith('socket:'))}; "
                    f"TCP: {[str(c) for c in tcp_sockets(pid)]}"
                ) from None
            after_load = proc_stats(pid)

            # The agent keeps serving: a fresh pull of a whole image with skopeo.
            await trio.to_thread.run_sync(
                lambda: images.pull_and_compare(
                    built["load/a"], agent.config["listen"], "load/a", tmp_path / "fresh"
                )
            )
            cluster.check_alive(when="after the fresh pull")
            final = proc_stats(pid)
            hits = await metric_samples(agent.metrics_url, "p2p_agent_cache_hits_total")
            misses = await metric_samples(agent.metrics_url, "p2p_agent_cache_misses_total")
        finally:
            results = processes.stop_all()
        after = await trio.to_thread.run_sync(registry.blob_gets)

    print(
        f"\nload: 200 pulls ({outcome}) on one agent: VmHWM {final.hwm / MiB:.0f} MiB "
        f"(baseline RSS {baseline.rss / MiB:.0f} MiB, after the load {after_load.rss / MiB:.0f}); "
        f"fds at start {start}, peak {peak_fds}, after settling {settled_fds} "
        f"({seeded} seeded blobs); cache hits "
        f"{sum(hits.values()):.0f}, misses {sum(misses.values()):.0f}"
    )
    assert final.hwm < AGENT_RSS_BOUND, f"agent VmHWM {final.hwm / MiB:.0f} MiB"
    assert all(r.returncode == 0 for r in results), results
    for digest in blobs:
        assert after[digest] - before[digest] == 1, f"{digest} left the origin more than once"


# --- 5,000 peers announcing to one tracker ------------------------------------------------------

NODES = 50
"""Source addresses of the legitimate peers: 127.0.0.10 … 127.0.0.59."""
SWARMS = 95
"""Swarms of the legitimate peers: one peer of every node in each (4,750 peers)."""
FLOOD_ADDRESS = "127.0.0.99"
FLOOD_IN_SWARM = 100
"""Peer ids the flooding address announces into the victim swarm (swarm 0)."""
FLOOD_TORRENTS = 150
"""New infohashes the flooding address announces."""
NEWCOMER = "127.0.0.200"
MAX_TORRENTS_PER_ADDRESS = 100
MAX_PEERS_PER_ADDRESS = 8
CONNECTIONS_PER_NODE = 4
COMPLETING = 5
"""One legitimate peer in this many announces ``completed`` in the second round."""
TRACKER_RSS_BOUND = 300 * MiB


def swarm_hash(index: int) -> bytes:
    return hashlib.sha1(b"load-swarm-%d" % index).digest()


def node_address(node: int) -> str:
    return f"127.0.0.{10 + node}"


def node_peer_id(node: int, swarm: int) -> bytes:
    return b"-LD0001-" + node.to_bytes(4, "big") + swarm.to_bytes(8, "big")


def node_port(node: int, swarm: int) -> int:
    """Distinct per address: every (address, port) pair is one peer."""
    return 20000 + swarm


@dataclass
class Announced:
    sent: int = 0
    warned: int = 0


async def test_5000_peers_announcing_to_one_tracker(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "tracker.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "logLevel: warning\n"
        "uncappedAddresses: []\n"
        f"maxTorrentsPerAddress: {MAX_TORRENTS_PER_ADDRESS}\n"
        f"maxPeersPerAddress: {MAX_PEERS_PER_ADDRESS}\n"
    )
    process = ManagedProcess(
        [service_binary("tracker"), "--config", str(config)],
        tmp_path / "tracker.log",
        name="p2p-tracker",
        env=service_env(),
    )
    base = f"http://127.0.0.1:{port}"
    announce_base = f"{base}/announce"
    errors: list[str] = []
    counts = Announced()

    tls = ssl.create_default_context()  # unused (plain HTTP): made once, not per client

    def client(address: str) -> httpx.AsyncClient:
        """A client whose connections come from ``address``."""
        transport = httpx.AsyncHTTPTransport(
            local_address=address,
            verify=tls,
            limits=httpx.Limits(max_connections=CONNECTIONS_PER_NODE),
        )
        return httpx.AsyncClient(transport=transport, trust_env=False, timeout=DEADLINE)

    async def announce(
        http: httpx.AsyncClient, request: AnnounceRequest, *, capped_ok: bool = False
    ) -> AnnounceResponse | None:
        counts.sent += 1
        try:
            response = await http.get(announce_url(announce_base, request))
            if response.status_code != 200:
                errors.append(f"{request.event.value or 'regular'}: HTTP {response.status_code}")
                return None
            answer = parse_announce_response(response.content)
        except Exception as exc:  # every error counts, whatever its kind
            errors.append(f"{request.event.value or 'regular'}: {exc!r}")
            return None
        if answer.warning is not None:
            counts.warned += 1
            if not capped_ok:
                errors.append(f"a legitimate peer was warned: {answer.warning}")
        return answer

    async def node(number: int, round_: int) -> None:
        """Round 0: every peer of the node starts (a leecher). Round 1: one in
        :data:`COMPLETING` of them completes (a seed from then on). Each of the node's
        connections sends its share back to back (no queue of waiting requests: httpx's pool
        spends time per waiting request on every hand-over)."""
        requests = [
            AnnounceRequest(
                swarm_hash(swarm),
                node_peer_id(number, swarm),
                node_port(number, swarm),
                left=0 if round_ == 1 else 1 << 20,
                event=Event.COMPLETED if round_ == 1 else Event.STARTED,
                numwant=50,
            )
            for swarm in range(SWARMS)
            if round_ == 0 or (number + swarm) % COMPLETING == 0
        ]

        async def connection(share: list[AnnounceRequest]) -> None:
            for request in share:
                await announce(http, request)

        async with client(node_address(number)) as http, trio.open_nursery() as nursery:
            for n in range(CONNECTIONS_PER_NODE):
                nursery.start_soon(connection, requests[n::CONNECTIONS_PER_NODE])

    async def flood() -> None:
        async with client(FLOOD_ADDRESS) as http:
            for n in range(FLOOD_IN_SWARM):
                peer_id = b"-FL0001-" + n.to_bytes(12, "big")
                request = AnnounceRequest(swarm_hash(0), peer_id, 30000 + n, left=1, numwant=50)
                await announce(http, request, capped_ok=True)
            for n in range(FLOOD_TORRENTS):
                info_hash = hashlib.sha1(b"flood-%d" % n).digest()
                request = AnnounceRequest(info_hash, b"-FL0001-" + bytes(12), 31000, left=1)
                await announce(http, request, capped_ok=True)

    with process:
        process.wait_port(port, timeout=DEADLINE)
        pid = process.pid
        baseline = proc_stats(pid)
        with trio.fail_after(3 * DEADLINE):
            async with trio.open_nursery() as nursery:  # round 0: every peer starts
                nursery.start_soon(flood)
                for number in range(NODES):
                    nursery.start_soon(node, number, 0)
            joined = proc_stats(pid)
            async with trio.open_nursery() as nursery:  # round 1: some complete
                for number in range(NODES):
                    nursery.start_soon(node, number, 1)
        assert not errors, f"{len(errors)} errors, the first: {errors[:5]}"
        completed = sum(1 for n in range(NODES) for s in range(SWARMS) if (n + s) % COMPLETING == 0)
        legit_announces = NODES * SWARMS + completed
        assert counts.sent == legit_announces + FLOOD_IN_SWARM + FLOOD_TORRENTS

        # A newcomer to the victim swarm still gets every legitimate peer, and only
        # maxPeersPerAddress of the flood.
        async with client(NEWCOMER) as http:
            request = AnnounceRequest(
                swarm_hash(0), b"-NEW001-" + bytes(12), 40000, left=1, numwant=200
            )
            answer = await announce(http, request)
        assert answer is not None, errors
        handed = {(p.ip, p.port) for p in answer.peers}
        legit = {(node_address(n), node_port(n, 0)) for n in range(NODES)}
        assert legit <= handed, f"missing legitimate peers: {sorted(legit - handed)[:5]}"
        flooded = {p for p in handed if p[0] == FLOOD_ADDRESS}
        assert len(flooded) == MAX_PEERS_PER_ADDRESS, flooded

        metrics = f"{base}/metrics"
        peers = await metric_samples(metrics, "p2p_tracker_peers")
        torrents = await metric_samples(metrics, "p2p_tracker_torrents")
        failures = await metric_samples(metrics, "p2p_tracker_failures_total")
        unlisted = await metric_samples(metrics, "p2p_tracker_unlisted_total")
        announces = await metric_samples(metrics, "p2p_tracker_announces_total")
        final = proc_stats(pid)
        tracker_cpu = process.cpu_seconds()
        process.check_alive()

    flood_torrents_listed = MAX_TORRENTS_PER_ADDRESS - 1  # it is a peer of swarm 0 already
    expected_peers = NODES * SWARMS + MAX_PEERS_PER_ADDRESS + flood_torrents_listed + 1
    print(
        f"\nload: {counts.sent + 1} announces ({NODES * SWARMS} legitimate peers on {NODES} "
        f"addresses, a flood of {FLOOD_IN_SWARM + FLOOD_TORRENTS} from one): tracker VmHWM "
        f"{final.hwm / MiB:.0f} MiB (RSS {baseline.rss / MiB:.0f} MiB at start, "
        f"{joined.rss / MiB:.0f} after the joins, {final.rss / MiB:.0f} at the end); "
        f"{sum(peers.values()):.0f} peers in {sum(torrents.values()):.0f} torrents; "
        f"tracker CPU {tracker_cpu:.1f} s"
    )
    assert sum(failures.values()) == 0, failures
    assert sum(announces.values()) == counts.sent, (announces, counts.sent)
    assert counts.warned == FLOOD_IN_SWARM - MAX_PEERS_PER_ADDRESS + (
        FLOOD_TORRENTS - flood_torrents_listed
    )
    by_reason: dict[str, float] = {}
    for labels, value in unlisted.items():  # summed over the protocol label
        reason = dict(labels)["reason"]
        by_reason[reason] = by_reason.get(reason, 0.0) + value
    assert by_reason.get("address_peers") == FLOOD_IN_SWARM - MAX_PEERS_PER_ADDRESS, by_reason
    assert by_reason.get("address_torrents") == FLOOD_TORRENTS - flood_torrents_listed, by_reason
    assert sum(peers.values()) == expected_peers
    assert final.hwm < TRACKER_RSS_BOUND, f"tracker VmHWM {final.hwm / MiB:.0f} MiB"
