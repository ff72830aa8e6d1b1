"""``p2p-agent prefetch IMAGE...``: pull images into this node's agent cache before a rollout.

    p2p-agent prefetch registry.example.com/team/app:1.0
    p2p-agent prefetch team/app:1.0 team/worker:1.0 --platform linux/arm64

It asks the node's agent (``--url``, the registry API on 127.0.0.1:5004) for each image the way
containerd would: the manifest (of an index, the manifests of this node's platform, or of
``--platform``; ``--platform all`` for every one), then every config and layer blob, three at a
time, each read to its end and checked against its digest, so that the agent downloads it (from
its peers, the proxies or the origin, as for any pull), caches and seeds it. Nothing is written
here; the node's containerd is not involved. ``IMAGE`` may name its registry (a first part with
a dot or a port, or ``localhost``: mirror mode, ``?ns=``); otherwise the agent's first registry.
Credentials as for ``p2p-proxy preheat`` (:mod:`p2p_common.dockerconfig`), never on the command
line. The chart runs it on the nodes ``prefetch.nodeSelector`` selects (``prefetch.images``).

Exit code 0 when every blob of every image arrived and matched its digest, 1 when one did not or
the agent cannot be reached within ``--wait`` seconds, 2 for a bad command line or credentials
file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from p2p_common.dockerconfig import UsageError, authorization, docker_config_path, split_image
from p2p_common.imagewalk import image_blobs, manifest_children
from p2p_common.oci import (
    DEFAULT_MANIFEST_ACCEPT,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCIError,
    base_media_type,
    parse_error_body,
)

PROG = "p2p-agent prefetch"
DEFAULT_URL = "http://127.0.0.1:5004"
BLOBS_AT_ONCE = 3
"""Blobs fetched at once (what containerd does for one image)."""
READ_CHUNK = 1 << 20

_ARCHITECTURES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "armv6l": "arm/v6",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def node_platform(machine: str | None = None) -> str:
    """This node's platform as an image index names it (``linux/amd64``, ``linux/arm/v7``)."""
    found = machine if machine is not None else platform.machine()
    return "linux/" + _ARCHITECTURES.get(found.lower(), found.lower())


def split_reference(name: str) -> tuple[str, str]:
    """``team/app:1.0`` -> (``team/app``, ``1.0``); ``@sha256:...`` a digest; no tag: latest."""
    repository, at, digest = name.partition("@")
    if at:
        return repository, digest
    last = repository.rsplit("/", 1)[-1]
    if ":" in last:
        repository, _, tag = repository.rpartition(":")
        return repository, tag
    return repository, "latest"


class PrefetchError(Exception):
    """The agent refused a request (its status and the registry error it sent), or answered
    something else than an image."""

    @classmethod
    def answer(cls, status: int, body: bytes) -> PrefetchError:
        entries = parse_error_body(body)
        said = "; ".join(f"{e.code}: {e.message}" if e.message else e.code for e in entries)
        return cls(f"HTTP {status}" + (f" {said}" if said else ""))


@dataclass
class Outcome:
    image: str
    blobs: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "errors": self.errors,
        }


class Prefetcher:
    """Reads images through the agent's registry API (blocking, for a command line)."""

    def __init__(
        self, client: httpx.Client, base: str, platforms: Sequence[str], *, quiet: bool
    ) -> None:
        self.client = client
        self.base = base.rstrip("/")
        self.platforms = list(platforms)
        self.quiet = quiet

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    def _get(self, path: str, params: dict[str, str], headers: dict[str, str]) -> httpx.Response:
        answer = self.client.get(f"{self.base}{path}", params=params, headers=headers)
        if answer.status_code != 200:
            raise PrefetchError.answer(answer.status_code, answer.content)
        return answer

    def image(self, image: str, login: str | None) -> Outcome:
        """Prefetch ``image``; ``login``: its ``Authorization`` header value, if any."""
        outcome = Outcome(image)
        registry, name = split_image(image)
        repository, reference = split_reference(name)
        params = {} if registry is None else {"ns": registry}
        headers = {"Accept": DEFAULT_MANIFEST_ACCEPT}
        if login is not None:
            headers["Authorization"] = login
        try:
            blobs = self._blobs(repository, reference, params, headers)
        except (PrefetchError, OCIError, httpx.HTTPError) as exc:
            outcome.errors.append(f"manifest: {exc}")
            return outcome
        total = sum(size for _, size in blobs)
        self._say(f"{image}: {len(blobs)} blobs, {total / 1e6:.1f} MB")

        def fetch(blob: tuple[str, int]) -> tuple[str, int, str | None]:
            digest, size = blob
            return digest, size, self._blob(repository, digest, size, params, headers)

        with ThreadPoolExecutor(BLOBS_AT_ONCE) as pool:
            for digest, size, error in pool.map(fetch, blobs):
                if error is None:
                    outcome.blobs += 1
                    outcome.bytes += size
                    self._say(f"  {digest.removeprefix('sha256:')[:12]} {size / 1e6:8.1f} MB ok")
                else:
                    outcome.errors.append(f"{digest}: {error}")
                    self._say(f"  {digest.removeprefix('sha256:')[:12]} failed: {error}")
        return outcome

    def _blobs(
        self, repository: str, reference: str, params: dict[str, str], headers: dict[str, str]
    ) -> list[tuple[str, int]]:
        answer = self._get(f"/v2/{repository}/manifests/{reference}", params, headers)
        media_type = base_media_type(answer.headers.get("content-type", ""))
        if media_type in INDEX_MEDIA_TYPES:
            wanted = [] if self.platforms == ["all"] else self.platforms
            children = manifest_children(answer.content, wanted)
            if not children:
                raise PrefetchError(f"the index has no manifest for {', '.join(wanted)}")
            blobs: list[tuple[str, int]] = []
            for child in children:
                child_answer = self._get(f"/v2/{repository}/manifests/{child}", params, headers)
                blobs.extend(image_blobs(child_answer.content))
            return list(dict.fromkeys(blobs))
        if media_type in MANIFEST_MEDIA_TYPES:
            return image_blobs(answer.content)
        raise PrefetchError(f"the agent answered a {media_type or 'typeless'} document")

    def _blob(
        self,
        repository: str,
        digest: str,
        size: int,
        params: dict[str, str],
        headers: dict[str, str],
    ) -> str | None:
        """None when the whole blob arrived with the right digest, else what went wrong."""
        hasher = hashlib.sha256()
        received = 0
        try:
            with self.client.stream(
                "GET", f"{self.base}/v2/{repository}/blobs/{digest}", params=params, headers=headers
            ) as answer:
                if answer.status_code != 200:
                    answer.read()
                    return str(PrefetchError.answer(answer.status_code, answer.content))
                for data in answer.iter_bytes(READ_CHUNK):
                    hasher.update(data)
                    received += len(data)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if received != size:
            return f"{received} bytes, the manifest says {size}"
        if digest.startswith("sha256:") and "sha256:" + hasher.hexdigest() != digest:
            return "the bytes do not match the digest"
        return None


def wait_for_agent(client: httpx.Client, base: str, seconds: float) -> bool:
    """Whether the agent's registry API answers ``/v2/`` within ``seconds`` (it may still be
    starting when the prefetch starts with the node)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.get(f"{base.rstrip('/')}/v2/")
            return True
        except httpx.HTTPError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Pull images into this node's agent cache before a rollout."
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="[registry/]name[:tag|@digest]")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"agent API (default {DEFAULT_URL})")
    parser.add_argument(
        "--platform",
        action="append",
        default=[],
        help=f"os/arch[/variant] of an index to fetch; repeat; 'all' for every one "
        f"(default: this node's, {node_platform()})",
    )
    parser.add_argument("--docker-config", help="Docker config file with the registries' logins")
    parser.add_argument(
        "--wait", type=float, default=300.0, help="seconds to wait for the agent (default 300)"
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args = parser.parse_args(argv)
    platforms = args.platform or [node_platform()]
    if "all" in platforms and len(platforms) > 1:
        parser.error("--platform all goes alone")
    try:  # every login first: a bad credentials file is known before anything is fetched
        config = docker_config_path(args.docker_config)
        logins = [authorization(split_image(image)[0], config) for image in args.images]
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    timeout = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)
    outcomes = []
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        if not wait_for_agent(client, args.url, args.wait):
            print(f"{PROG}: no agent answers at {args.url}", file=sys.stderr)
            return 1
        prefetcher = Prefetcher(client, args.url, platforms, quiet=args.json)
        for image, login in zip(args.images, logins, strict=True):
            outcomes.append(prefetcher.image(image, login))
    if args.json:
        print(json.dumps([outcome.view() for outcome in outcomes], indent=2))
    failed = [outcome for outcome in outcomes if outcome.errors]
    for outcome in failed:
        print(f"{PROG}: {outcome.image}: {'; '.join(outcome.errors)}", file=sys.stderr)
    return 1 if failed else 0
