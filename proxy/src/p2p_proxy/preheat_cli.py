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
import json
import sys
import time
from typing import Any

import httpx

from p2p_common.dockerconfig import UsageError, authorization, docker_config_path, split_image

DEFAULT_PROXY = "http://127.0.0.1:5005"


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
        login = authorization(registry, docker_config_path(args.docker_config))
    except UsageError as exc:
        print(f"p2p-proxy preheat: {exc}", file=sys.stderr)
        return 2
    headers = {} if login is None else {"Authorization": login}
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
