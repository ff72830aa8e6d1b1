"""``p2p-proxy preheat IMAGE``: have a proxy fetch and seed an image before a rollout.

    p2p-proxy preheat registry.example.com/team/app:1.0 --platform linux/amd64
    p2p-proxy preheat team/app@sha256:... --proxy http://p2p-proxy.kube-system:5005

``IMAGE`` may name its registry (its first part, when that has a dot or a port, or is
``localhost``); otherwise the proxy's default registry is used. Credentials never go on the
command line: ``P2P_PREHEAT_USERNAME`` and ``P2P_PREHEAT_PASSWORD``, else the registry's entry
in a Docker config file (``--docker-config``, ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``: what ``docker login`` writes). It waits for the job and prints its
progress; exit code 0 when every blob is cached and seeded, 1 when the job failed or the proxy
cannot be reached, 2 for a bad command line or credentials file.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DEFAULT_PROXY = "http://127.0.0.1:5005"


class UsageError(Exception):
    """A bad command line or credentials file (exit code 2)."""


def split_image(image: str) -> tuple[str | None, str]:
    """(registry host[:port] or None for the proxy's default, the rest: ``name[:tag|@digest]``)."""
    first, slash, rest = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, image


def docker_config_path(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("DOCKER_CONFIG"):
        return Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    return Path.home() / ".docker" / "config.json"


def credentials(registry: str | None, config: Path) -> tuple[str, str] | None:
    """(user, password) from the environment or the Docker config's entry for ``registry``."""
    user, password = os.environ.get("P2P_PREHEAT_USERNAME"), os.environ.get("P2P_PREHEAT_PASSWORD")
    if user is not None and password is not None:
        return user, password
    if registry is None or not config.is_file():
        return None
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config}: not a readable Docker config file ({exc})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                raw = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise UsageError(
                    f"{config}: the auth of {key} is not base64 user:password"
                ) from None
            name, colon, secret = raw.partition(":")
            if colon:
                return name, secret
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


def _line(job: dict[str, Any]) -> str:
    done = sum(1 for b in job["blobs"] if b["state"] in ("cached", "fetched"))
    return (
        f"{job['image']}: {job['state']}, {done}/{len(job['blobs'])} blobs, "
        f"{job['ready_bytes'] / 1e6:.1f} of {job['bytes'] / 1e6:.1f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="p2p-proxy preheat",
        description="Fetch every blob of an image into a proxy's cache and seed it.",
    )
    parser.add_argument("image", help="[registry/]name[:tag|@digest]")
    parser.add_argument(
        "--platform", action="append", default=[], help="os/arch[/variant]; repeat; all if none"
    )
    parser.add_argument(
        "--proxy", default=DEFAULT_PROXY, help=f"proxy API (default {DEFAULT_PROXY})"
    )
    parser.add_argument("--docker-config", help="Docker config file with the registry's login")
    parser.add_argument("--cacert", help="CA bundle for an https proxy")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print the finished job as JSON")
    args = parser.parse_args(argv)
    registry, name = split_image(args.image)
    try:
        login = credentials(registry, docker_config_path(args.docker_config))
    except UsageError as exc:
        print(f"p2p-proxy preheat: {exc}", file=sys.stderr)
        return 2
    headers = {}
    if login is not None:
        token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    params = {} if registry is None else {"ns": registry}
    base = args.proxy.rstrip("/")
    verify: Any = args.cacert or True
    try:
        with httpx.Client(timeout=30.0, trust_env=False, verify=verify) as client:
            answer = client.post(
                f"{base}/p2p/v1/preheat",
                params=params,
                headers=headers,
                json={"image": name, "platforms": args.platform},
            )
            if answer.status_code != 202:
                print(
                    f"p2p-proxy preheat: the proxy answered {answer.status_code}: {answer.text}",
                    file=sys.stderr,
                )
                return 1
            job = answer.json()
            deadline = time.monotonic() + args.timeout
            last = ""
            while job["state"] not in ("done", "failed"):
                if time.monotonic() > deadline:
                    print(
                        f"p2p-proxy preheat: still {job['state']} after {args.timeout:g} s",
                        file=sys.stderr,
                    )
                    return 1
                line = _line(job)
                if line != last and not args.json:
                    print(line, flush=True)
                    last = line
                time.sleep(0.5)
                job = client.get(f"{base}/p2p/v1/preheat/{job['id']}").json()
    except httpx.HTTPError as exc:
        print(f"p2p-proxy preheat: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(_line(job))
    if job["state"] != "done":
        print(f"p2p-proxy preheat: failed: {job['error']}", file=sys.stderr)
        return 1
    return 0
