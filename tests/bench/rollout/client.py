"""The rollout benchmark's pull client: a long-lived worker process in one node's namespace that
pulls the image on command (worker side), and its handle in the benchmark (parent side)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.bench.rollout.netns import Host, Network
from tests.realparts import images
from tests.realparts.procs import ManagedProcess

ROOT = Path(__file__).resolve().parents[3]
MANIFEST_ACCEPT = ", ".join(
    [
        images.OCI_MANIFEST,
        images.DOCKER_MANIFEST,
        images.OCI_INDEX,
        images.DOCKER_LIST,
    ]
)


async def _pull_image(command: dict[str, Any]) -> dict[str, Any]:
    """Pull the manifest and every blob from ``command['base']``, hashing as bytes arrive.

    Waits until ``command['at']`` (``time.monotonic()``, comparable across processes), then
    measures from that instant. Blobs are requested in manifest order (config first), at most
    ``concurrency`` at once, like containerd. ``first_byte`` is the first byte of any layer.
    """
    base, at = str(command["base"]), float(command["at"])
    repository, tag = str(command["repository"]), str(command["tag"])
    delay = at - time.monotonic()
    if delay > 0:
        await trio.sleep(delay)
    blobs: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    timeout = httpx.Timeout(float(command.get("read_timeout", 120.0)), connect=10.0)
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
        url = f"{base}/v2/{repository}/manifests/{tag}"
        response = await client.get(url, headers={"accept": MANIFEST_ACCEPT})
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: {response.status_code} {response.text[:300]}")
        manifest = response.content
        doc = json.loads(manifest)
        layers = {str(d["digest"]) for d in doc["layers"]}
        descriptors = [doc["config"], *doc["layers"]]
        slots = trio.Semaphore(int(command.get("concurrency", 3)))

        async def fetch(descriptor: dict[str, Any]) -> None:
            digest, size = str(descriptor["digest"]), int(descriptor["size"])
            blob_url = f"{base}/v2/{repository}/blobs/{digest}"
            try:
                started = time.monotonic()
                hasher = hashlib.sha256()
                received = 0
                first = math.nan
                async with client.stream("GET", blob_url) as blob:
                    if blob.status_code != 200:
                        body = (await blob.aread())[:300].decode(errors="replace")
                        raise RuntimeError(f"GET {blob_url}: {blob.status_code} {body}")
                    async for chunk in blob.aiter_raw():
                        if received == 0:
                            first = time.monotonic()
                        received += len(chunk)
                        hasher.update(chunk)
                got = "sha256:" + hasher.hexdigest()
                if received != size:
                    problems.append(f"{digest}: {received} bytes, the manifest says {size}")
                elif got != digest:
                    problems.append(f"{digest}: the bytes hash to {got}")
                blobs[digest] = {
                    "bytes": received,
                    "start": started - at,
                    "first_byte": first - at,
                    "end": time.monotonic() - at,
                    "ok": received == size and got == digest,
                }
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for descriptor in descriptors:
                await slots.acquire()  # in manifest order
                nursery.start_soon(fetch, descriptor)
    finished = time.monotonic()
    firsts = [b["first_byte"] for d, b in blobs.items() if d in layers]
    return {
        "manifest_digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
        "seconds": finished - at,
        "first_byte": min(firsts) if firsts else math.nan,
        "bytes": sum(b["bytes"] for b in blobs.values()),
        "blobs": blobs,
        "problems": problems,
    }


def worker_main() -> int:
    """The pull client's loop: one JSON command a line on stdin, one JSON answer on stdout."""

    def answer(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    answer({"ok": True, "ready": True})
    while line := sys.stdin.readline():
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        try:
            result = trio.run(_pull_image, command)
        except BaseException as exc:  # report everything, the parent decides
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            answer({"ok": False, "error": _describe(exc)})
        else:
            answer({"ok": True, **result})
    return 0


def _describe(exc: BaseException) -> str:
    """One line for an exception, the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


class PullWorker:
    """A long-lived pull client process inside one node's namespace."""

    def __init__(self, network: Network, host: Host, logs: Path) -> None:
        self.host = host
        self.process = ManagedProcess(
            network.exec_argv(
                host, [sys.executable, "-m", "tests.bench.bench_rollout", "--worker"]
            ),
            logs / f"client-{host.role}.log",
            name=f"client-{host.role}",
            cwd=ROOT,
            pipes=True,
            stop_timeout=3.0,
        )
        self._buffer = b""

    def start(self) -> None:
        self.process.start()

    def send(self, command: dict[str, Any]) -> None:
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
        except OSError as exc:
            self.process.fail(f"cannot send a command: {exc}")

    def receive(self, deadline: float) -> dict[str, Any]:
        """The next answer; raises :class:`ProcessFailedError` if the client dies or is late."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.fail("no answer before the scenario's deadline")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                self.process.check_alive()
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                self.process.fail("closed its output")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        if self.process.running:
            with contextlib.suppress(OSError, RuntimeError):
                self.send({"op": "quit"})
        self.process.stop()
