"""``python -m tests.demo``: the command line and the run (see :mod:`tests.demo`).

The run, in order: build the image (in a worker thread); start the origin and put the image in
it; start the tracker, the proxies and the agents and wait for their ``/readyz``; pull through
every agent at once with live progress; verify and summarise; stop every process. Everything
async runs in one ``trio.run``; SIGINT and SIGTERM cancel it. The processes are stopped after
``trio.run`` returns, whatever happened in it (SIGTERM, a bounded wait, SIGKILL); a second
Ctrl-C during that stop kills them at once. Exit status: 0 when every agent pulled the image
byte-identical, 1 on a failure, 2 on a usage error, 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, NoReturn, TextIO

import httpx
import trio
import yaml
from rich.console import Console as RichConsole

from p2p_agent.status_cli import render as render_status
from tests.demo.cluster import (
    KINDS,
    Cluster,
    ClusterError,
    Kind,
    ProcessSet,
    Service,
    StopResult,
    last_lines,
    plan_cluster,
)
from tests.demo.image import DemoImage, build_image
from tests.demo.origin import (
    BlobStats,
    BuiltinOrigin,
    OriginError,
    launch_distribution,
    push_with_skopeo,
    serve_builtin,
)
from tests.demo.progress import MB, Board, mb
from tests.demo.pull import PullError, PullResult, pull, verify_files
from tests.demo.report import AgentReport, Summary, Traffic, metric, parse_metrics, read_traffic

__all__ = ["DemoError", "Options", "main", "parse_args"]

OriginChoice = Literal["auto", "distribution", "builtin"]
STEPS = 5
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
METRICS_WAIT = 5.0
INSTALL_HINT = "bash tests/install-real-parts.sh --demo"


class DemoError(RuntimeError):
    """The demo failed; ``str(exc)`` is the one-line reason."""

    def __init__(self, message: str, *, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Options:
    agents: int = 6
    proxies: int = 2
    size_mb: int = 300
    origin: OriginChoice = "auto"
    keep: bool = False
    workdir: Path | None = None
    timeout: float = 120.0
    overrides: dict[Kind, dict[str, Any]] = field(default_factory=dict)
    summary_json: Path | None = None
    origin_rate_mb: float | None = None


def _positive(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def _override(text: str) -> tuple[Kind, str, Any]:
    target, equals, raw = text.partition("=")
    kind, dot, key = target.partition(".")
    if not equals or not dot or not key or kind not in KINDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SERVICE.KEY=VALUE with SERVICE one of {', '.join(KINDS)}"
        )
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return kind, key, value


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.demo",
        description=(
            "p2p on this machine: an origin registry, one p2p-tracker, two p2p-proxy and six "
            "p2p-agent processes on 127.0.0.1; a demo image is pulled through every agent at "
            "once, verified, and the bytes the origin sent are compared with the image size."
        ),
    )
    parser.add_argument("--agents", type=_positive(1, 32), default=6, help="agents (default 6)")
    parser.add_argument("--proxies", type=_positive(1, 8), default=2, help="proxies (default 2)")
    parser.add_argument(
        "--size-mb",
        type=_positive(1, 20_000),
        default=300,
        help="image size in MB (10^6 bytes) over 5 layers (default 300)",
    )
    parser.add_argument(
        "--origin",
        choices=["auto", "distribution", "builtin"],
        default="auto",
        help="the origin registry: the CNCF distribution registry (needs docker-registry and "
        "skopeo), the built-in one, or auto (distribution when installed; default)",
    )
    parser.add_argument(
        "--builtin-origin",
        dest="origin",
        action="store_const",
        const="builtin",
        help="same as --origin builtin",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (and print its path)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="work directory (created; must be empty; never removed) instead of a temporary one",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds the pulls may take altogether (default 120)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="SERVICE.KEY=VALUE",
        type=_override,
        action="append",
        default=[],
        help="add or replace a configuration key of every tracker, proxy or agent, "
        "e.g. --set agent.downloadRate=50MB (repeatable)",
    )
    parser.add_argument(
        "--origin-rate",
        type=float,
        metavar="MB_PER_S",
        help="make the built-in origin a slow one: at most this many MB/s of blobs altogether",
    )
    parser.add_argument(
        "--summary-json", type=Path, help="also write the summary as JSON to this file"
    )
    args = parser.parse_args(argv)
    overrides: dict[Kind, dict[str, Any]] = {}
    for kind, key, value in args.overrides:
        overrides.setdefault(kind, {})[key] = value
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.origin_rate is not None:
        if args.origin_rate <= 0:
            parser.error("--origin-rate must be positive")
        if args.origin != "builtin":
            parser.error("--origin-rate needs the built-in origin (--builtin-origin)")
    return Options(
        agents=args.agents,
        proxies=args.proxies,
        size_mb=args.size_mb,
        origin=args.origin,
        keep=args.keep,
        workdir=args.workdir,
        timeout=args.timeout,
        overrides=overrides,
        summary_json=args.summary_json,
        origin_rate_mb=args.origin_rate,
    )


class Console:
    """Step lines to stdout, failures to stderr, always flushed."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out = out
        self.err = err
        self.interactive = out.isatty() and os.environ.get("TERM", "") != "dumb"

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, number: int, text: str) -> None:
        self.line(f"[{number}/{STEPS}] {text}")

    def error(self, text: str) -> None:
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()


@dataclass
class Origin:
    """The running origin, whichever it is."""

    kind: Literal["distribution", "builtin"]
    url: str
    description: str
    source: str
    stats: Callable[[], Awaitable[BlobStats]]


def _choose_origin(choice: OriginChoice) -> tuple[Literal["distribution", "builtin"], str]:
    """Which origin to run, and why when it is the built-in one by necessity."""
    missing = [b for b in ("docker-registry", "skopeo") if shutil.which(b) is None]
    if choice == "builtin":
        return "builtin", "asked for"
    if not missing:
        return "distribution", ""
    reason = f"{' and '.join(missing)} not installed; `{INSTALL_HINT}` installs them"
    if choice == "distribution":
        raise DemoError(f"--origin distribution: {reason}")
    return "builtin", reason


async def _start_origin(
    choice: OriginChoice,
    rate_mb: float | None,
    image: DemoImage,
    workdir: Path,
    processes: ProcessSet,
    nursery: trio.Nursery,
    console: Console,
) -> Origin:
    kind, why = _choose_origin(choice)
    sizes = {digest: blob.size for digest, blob in image.blobs().items()}
    if kind == "builtin":
        rate = None if rate_mb is None else rate_mb * MB
        builtin = BuiltinOrigin(image, workdir / "logs" / "origin-access.log", rate=rate)
        port: int = await nursery.start(serve_builtin, builtin)
        slow = "" if rate_mb is None else f", sending at most {rate_mb:g} MB/s"
        console.step(
            2,
            f"origin: the built-in read-only origin on 127.0.0.1:{port} ({why}{slow}); "
            f"{image.reference} loaded from {image.layout}",
        )
        return Origin(
            "builtin",
            f"http://127.0.0.1:{port}",
            f"built-in read-only origin (tests/demo/origin.py) on 127.0.0.1:{port}",
            "counted by the built-in origin",
            partial(builtin.blob_stats, sizes),
        )
    log_path = workdir / "logs" / "registry.log"
    registry = launch_distribution(workdir / "origin", log_path)
    processes.add("registry", registry.daemon)
    with trio.move_on_after(READY_TIMEOUT) as waited:
        await registry.wait_ready()
    if waited.cancelled_caught:
        raise OriginError(
            f"docker-registry did not answer on {registry.url} within {READY_TIMEOUT:g} s "
            f"(log: {log_path})"
        )
    started = time.monotonic()
    await push_with_skopeo(image, registry)
    console.step(
        2,
        f"origin: CNCF distribution registry {registry.version} (docker-registry) on "
        f"{registry.host}, access log in {log_path}; {image.reference} pushed with skopeo "
        f"in {time.monotonic() - started:.1f} s",
    )
    return Origin(
        "distribution",
        registry.url,
        f"CNCF distribution registry {registry.version} (docker-registry) on {registry.host}",
        "from its access log",
        partial(registry.blob_stats, sizes),
    )


async def _watch(cluster: Cluster) -> NoReturn:
    """Fail as soon as any service process exits."""
    while True:
        cluster.check_alive(when="during the pull")
        await trio.sleep(0.25)


ORIGIN_BYTES = "p2p_proxy_origin_bytes_total"
"""The proxies' counter of blob bytes received from the origin."""


async def _origin_received(client: httpx.AsyncClient, proxies: list[Service]) -> float:
    """Blob bytes the proxies together have received from the origin so far."""
    received = 0.0
    for proxy in proxies:
        with contextlib.suppress(httpx.HTTPError):
            response = await client.get(proxy.metrics_url)
            received += metric(parse_metrics(response.text), ORIGIN_BYTES)
    return received


async def _watch_origin_fetch(cluster: Cluster, image: DemoImage, done: list[float]) -> None:
    """Append the ``time.monotonic()`` at which the proxies together have received every blob
    byte of the image from the origin (their ``p2p_proxy_origin_bytes`` counters), polled every
    0.05 s; the pulls' first bytes before that moment are the pipelining."""
    proxies = [service for service in cluster.services if service.kind == "proxy"]
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        while await _origin_received(client, proxies) < image.blob_bytes:  # noqa: ASYNC110 (polling metrics)
            await trio.sleep(0.05)
        done.append(time.monotonic())


async def _origin_done_by(
    cluster: Cluster, image: DemoImage, ended: float, done: list[float]
) -> None:
    """The pulls ended before the watcher saw the counters complete (they finish within one
    poll of the origin's last byte on a fast machine): if the counters account for the whole
    image now, the proxies had it all at the latest when the pulls ended."""
    proxies = [service for service in cluster.services if service.kind == "proxy"]
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        with trio.move_on_after(5.0):
            while await _origin_received(client, proxies) < image.blob_bytes:  # noqa: ASYNC110 (polling metrics)
                await trio.sleep(0.05)
            done.append(ended)


async def _pull_all(
    cluster: Cluster, image: DemoImage, workdir: Path, board: Board, origin_done: list[float]
) -> dict[str, PullResult]:
    """Pull through every agent at once; fail on the first error or a dead service. The
    moment the proxies hold the whole image is appended to ``origin_done`` (at the latest the
    moment the pulls end, if the counters complete only then)."""
    results: dict[str, PullResult] = {}
    http_timeout = httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=30.0)

    async def died(service: Service) -> None:
        """Raise the service's own failure if it exited (a failed pull is often why)."""
        with trio.move_on_after(0.5):
            while service.process is not None and service.process.running:  # noqa: ASYNC110
                await trio.sleep(0.05)
        cluster.check_alive([service], "during the pull")

    async def one(service: Service) -> None:
        name, base_url = service.name, service.url
        lane = board.lane(name)
        lane.begin()
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=http_timeout) as client:
                results[name] = await pull(
                    client,
                    base_url,
                    image.repository,
                    image.tag,
                    workdir / "pulled" / name,
                    on_total=lambda total: setattr(lane, "total", total),
                    on_bytes=lane.add,
                )
        except PullError as exc:
            lane.failed = str(exc)
            await died(service)
            raise DemoError(f"{name}: {lane.failed}", log=service.log_path) from exc
        lane.finish()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(board.run)
            nursery.start_soon(_watch, cluster)
            nursery.start_soon(_watch_origin_fetch, cluster, image, origin_done)
            async with trio.open_nursery() as pulls:
                for agent in cluster.agents:
                    pulls.start_soon(one, agent)
            nursery.cancel_scope.cancel()
        if not origin_done:
            await _origin_done_by(cluster, image, time.monotonic(), origin_done)
    finally:
        board.final()
    return results


async def _read_traffic(cluster: Cluster, image: DemoImage) -> dict[str, Traffic]:
    """Every agent's :class:`Traffic`, once the counters add up (or after a bounded wait).

    An agent counts a blob's download once it has published the blob, which may be just after
    the last byte reached us, and refreshes its upload gauge every few seconds: wait until every
    agent counts the whole image as downloaded and the agents count as uploaded at least what
    they downloaded from each other.
    """
    traffic = {agent.name: Traffic() for agent in cluster.agents}

    def settled() -> bool:
        uploaded = sum(t.uploaded for t in traffic.values())
        from_agents = sum(t.from_agents for t in traffic.values())
        complete = all(t.downloaded >= image.blob_bytes for t in traffic.values())
        return complete and uploaded >= from_agents

    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:

        async def read(name: str, url: str) -> None:
            try:
                traffic[name] = await read_traffic(client, url)
            except httpx.HTTPError as exc:
                raise DemoError(f"{name}: cannot read {url}: {exc}") from exc

        with trio.move_on_after(METRICS_WAIT):
            while True:
                async with trio.open_nursery() as nursery:
                    for agent in cluster.agents:
                        nursery.start_soon(read, agent.name, agent.metrics_url)
                if settled():
                    break
                await trio.sleep(0.25)
    return traffic


async def _report(
    cluster: Cluster, image: DemoImage, results: dict[str, PullResult], t0: float
) -> list[AgentReport]:
    """Verify every pull against the image (two hashing threads) while reading the agents'
    metrics. Times are seconds after ``t0`` (when the pulls began)."""
    expected = {digest: blob.size for digest, blob in image.blobs().items()}
    limiter = trio.CapacityLimiter(2)
    problems: dict[str, list[str]] = {}
    traffic: dict[str, Traffic] = {}

    async def verify(name: str) -> None:
        problems[name] = await verify_files(
            results[name], image.manifest, expected, limiter=limiter
        )

    async def metrics() -> None:
        traffic.update(await _read_traffic(cluster, image))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(metrics)
        for agent in cluster.agents:
            nursery.start_soon(verify, agent.name)
    return [
        AgentReport(
            agent.name,
            results[agent.name].seconds,
            results[agent.name].blob_bytes,
            len(results[agent.name].blobs),
            verified=not problems[agent.name],
            problems=problems[agent.name],
            traffic=traffic[agent.name],
            first_byte=_first_layer_byte(results[agent.name]) - t0,
        )
        for agent in cluster.agents
    ]


def _first_layer_byte(result: PullResult) -> float:
    """When the pull's first layer byte arrived (``time.monotonic()``); ``blobs[0]`` is the
    config."""
    return min((blob.first_byte for blob in result.blobs[1:]), default=result.finished)


async def run(options: Options, workdir: Path, processes: ProcessSet, console: Console) -> Summary:
    """Steps 1 to 5 (the stop is the caller's); see the module docstring."""
    started = time.monotonic()
    async with trio.open_nursery() as nursery:  # owns the built-in origin, if any
        t0 = time.monotonic()
        image = await trio.to_thread.run_sync(
            partial(build_image, workdir / "image", size=options.size_mb * MB)
        )
        console.step(
            1,
            f"image: {image.reference}, {len(image.layers)} layers + config, "
            f"{mb(image.blob_bytes)} MB, built in {time.monotonic() - t0:.1f} s "
            f"(OCI layout in {image.layout})",
        )
        origin = await _start_origin(
            options.origin, options.origin_rate_mb, image, workdir, processes, nursery, console
        )

        t0 = time.monotonic()
        cluster = plan_cluster(
            workdir,
            origin.url,
            agents=options.agents,
            proxies=options.proxies,
            overrides=options.overrides,
        )
        cluster.start(processes)
        with trio.move_on_after(READY_TIMEOUT) as waited:
            await cluster.wait_ready()
        if waited.cancelled_caught:
            names = ", ".join(s.name for s in cluster.pending)
            raise cluster.pending[0].failure(
                f"not ready within {READY_TIMEOUT:g} s ({names} not ready; "
                f"{cluster.pending[0].ready_url})"
            )
        names = ", ".join(
            f"{s.name} :{s.describe_port()}" for s in cluster.services if s.kind != "agent"
        )
        agents = cluster.agents
        agent_ports = f"{agents[0].describe_port()}" + (
            f"..:{agents[-1].describe_port()}" if len(agents) > 1 else ""
        )
        console.step(
            3,
            f"services: {names}, {len(agents)} agents (registry API :{agent_ports}); "
            f"all {len(cluster.services)} ready in {time.monotonic() - t0:.1f} s "
            f"(configs in {workdir / 'config'}, logs in {workdir / 'logs'})",
        )

        before = await origin.stats()
        console.step(4, f"pulling {image.reference} through {len(agents)} agents at once")
        board = Board([a.name for a in agents], console.out, interactive=console.interactive)
        t0 = time.monotonic()
        origin_done: list[float] = []
        try:
            with trio.fail_after(options.timeout):
                results = await _pull_all(cluster, image, workdir, board, origin_done)
        except trio.TooSlowError:
            states = ", ".join(f"{x.name} {x.fraction():.0%}" for x in board.lanes.values())
            raise DemoError(
                f"the pulls did not finish within {options.timeout:g} s ({states})"
            ) from None
        pull_seconds = time.monotonic() - t0

        sent = (await origin.stats()).since(before)
        reports = await _report(cluster, image, results, t0)
        summary = Summary(
            origin_kind=origin.kind,
            origin_description=origin.description,
            origin_source=origin.source,
            image_reference=image.reference,
            image_bytes=image.blob_bytes,
            image_blobs=len(image.blobs()),
            manifest_digest=image.manifest_digest,
            origin_bytes=sent.total_bytes,
            origin_gets=sent.total_gets,
            origin_manifest_gets=sent.manifest_gets,
            pull_seconds=pull_seconds,
            agents=reports,
            setup_seconds=t0 - started,
            origin_done=origin_done[0] - t0 if origin_done else None,
        )
        console.step(5, "verified every pulled blob against the pushed image; summary:")
        for text in [*summary.table(), "", *summary.overall()]:
            console.line(text)
        for report in reports:
            for problem in report.problems:
                console.error(f"  {report.name}: {problem}")
        await _show_status(cluster.agents[0], console)
        nursery.cancel_scope.cancel()
    return summary


async def _show_status(agent: Service, console: Console) -> None:
    """What ``p2p-agent status`` shows on one agent (its page is at the same address)."""
    base = agent.metrics_url.removesuffix("/metrics")
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            status = (await client.get(f"{base}/status")).json()
    except (httpx.HTTPError, ValueError) as exc:
        console.error(f"  {agent.name}: cannot read {base}/status: {exc}")
        return
    console.line("")
    console.line(f"{agent.name} as `p2p-agent status` shows it (a browser: {base}/):")
    view = RichConsole(file=console.out, width=110, force_terminal=False, color_system=None)
    view.print(render_status(status))


async def _run_with_signals(
    options: Options, workdir: Path, processes: ProcessSet, console: Console
) -> Summary:
    """:func:`run`, cancelled by SIGINT or SIGTERM (then :class:`Interrupted` is raised)."""
    received: list[int] = []

    async def watch(task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                received.append(signum)
                nursery.cancel_scope.cancel()
                return

    summary: Summary | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        summary = await run(options, workdir, processes, console)
        nursery.cancel_scope.cancel()
    if received:
        raise Interrupted(received[0])
    assert summary is not None
    return summary


# --- failures -----------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


KNOWN: tuple[type[Exception], ...] = (
    ClusterError,  # first: a dead service explains the failed pulls that come with it
    OriginError,
    DemoError,
    PullError,
    httpx.HTTPError,
    OSError,
)
"""Failures that explain themselves in one line, most telling first."""


def _classify(exc: BaseException, workdir: Path) -> tuple[int, str, Path | None]:
    """(exit status, one-line reason, the log to show) for what ended the run."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, Interrupted):
            return 128 + leaf.signum, f"interrupted ({leaf})", None
        if isinstance(leaf, KeyboardInterrupt):
            return 130, "interrupted (SIGINT)", None
    for kind in KNOWN:
        for leaf in leaves:
            if isinstance(leaf, kind):
                text = " ".join(str(leaf).split()) or type(leaf).__name__
                log = leaf.log if isinstance(leaf, DemoError | ClusterError) else None
                return 1, text, log
    leaf = leaves[0]
    trace = workdir / "logs" / "demo-traceback.txt"
    with contextlib.suppress(OSError):
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text("".join(traceback.format_exception(exc)))
    return 1, f"internal error: {leaf!r} (traceback in {trace})", None


def _terminated(signum: int, frame: object) -> None:
    raise Interrupted(signum)


# --- the work directory -------------------------------------------------------------------------


def _prepare_workdir(options: Options) -> tuple[Path, bool]:
    """(work directory, whether the demo created it as a temporary directory)."""
    if options.workdir is None:
        return Path(tempfile.mkdtemp(prefix="p2p-demo-")), True
    workdir = options.workdir.absolute()
    if workdir.exists() and any(workdir.iterdir()):
        raise DemoError(f"--workdir {workdir} is not empty (use a new or empty directory)")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, False


BULK = ("image", "origin", "data", "pulled")
"""Work directory entries holding blob data (the rest is configs and logs)."""


def _tidy(workdir: Path, created: bool, keep: bool, ok: bool, console: Console) -> None:
    if keep or not created:
        console.line(f"work directory: {workdir}")
        return
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for name in BULK:
        shutil.rmtree(workdir / name, ignore_errors=True)
    console.error(f"logs and configs kept in {workdir} (blob data removed; --keep keeps it)")


def _stop(processes: ProcessSet, console: Console, *, announce: bool) -> list[StopResult]:
    """Stop every process and say how it went; ``announce`` says so first (after a failure,
    when stopping may take up to the bound)."""
    if not processes.processes:
        return []
    if announce:
        console.line(
            f"stopping {sum(p.running for p in processes.processes.values())} processes "
            f"(SIGTERM; SIGKILL after {STOP_TIMEOUT:g} s)"
        )
    started = time.monotonic()
    try:
        results = processes.stop_all(STOP_TIMEOUT)
    except (KeyboardInterrupt, Interrupted):
        processes.kill_all()
        console.error("stop interrupted: every process killed")
        raise
    stopped = [r for r in results if r.stopped]
    notes = [
        f"{r.name} exited {r.returncode}" + (" (killed)" if (r.returncode or 0) < 0 else "")
        for r in stopped
        if not r.graceful
    ]
    notes += [f"{r.name} had already exited ({r.returncode})" for r in results if not r.stopped]
    detail = "; ".join(notes) if notes else "all exited 0 after one SIGTERM"
    console.line(
        f"stopped {len(stopped)} processes in {time.monotonic() - started:.1f} s ({detail})"
    )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    options = parse_args(argv)
    console = Console()
    try:
        workdir, created = _prepare_workdir(options)
    except DemoError as exc:
        console.error(f"p2p demo FAILED: {exc}")
        return 1
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(workdir / "logs" / "demo.log")
    demo_log = logging.getLogger("p2p.demo")
    demo_log.addHandler(handler)
    demo_log.propagate = False
    previous_term = signal.signal(signal.SIGTERM, _terminated)
    processes = ProcessSet()
    console.line(
        f"p2p demo: an origin registry, 1 tracker, {options.proxies} proxies and "
        f"{options.agents} agents on 127.0.0.1; work directory {workdir}"
    )
    started = time.monotonic()
    summary: Summary | None = None
    status, reason, show_log = 0, "", None
    stops: list[StopResult] = []
    try:
        try:
            summary = trio.run(_run_with_signals, options, workdir, processes, console)
        except BaseException as exc:
            status, reason, show_log = _classify(exc, workdir)
        try:
            stops = _stop(processes, console, announce=status != 0)
        except (KeyboardInterrupt, Interrupted) as exc:
            if not status:
                status, reason = _classify(exc, workdir)[:2]
        elapsed = time.monotonic() - started
        if summary is not None and not summary.verified and not status:
            failed = [a.name for a in summary.agents if not a.verified]
            status, reason = 1, f"verification failed for {', '.join(failed)}"
        if options.summary_json is not None:
            doc: dict[str, Any] = {
                "ok": status == 0,
                "reason": reason,
                "seconds": elapsed,
                "workdir": str(workdir),
                "processes": processes.pids(),
                "stopped": [vars(r) for r in stops],
                "summary": None if summary is None else summary.to_json(),
            }
            options.summary_json.write_text(json.dumps(doc, indent=2))
        if status:
            if show_log is not None:
                tail = last_lines(show_log, 12)
                if tail:
                    console.error(f"--- last lines of {show_log} ---")
                    console.error("\n".join(tail))
            _tidy(workdir, created, options.keep, False, console)
            console.error(f"p2p demo FAILED after {elapsed:.1f} s: {reason}")
            return status
        assert summary is not None
        _tidy(workdir, created, options.keep, True, console)
        console.line(
            f"OK in {elapsed:.1f} s: {summary.image_reference} ({mb(summary.image_bytes)} MB) "
            f"pulled byte-identical through {len(summary.agents)} agents; the origin sent "
            f"{summary.origin_ratio:.2f} x the image, not {len(summary.agents)} x"
        )
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        demo_log.removeHandler(handler)
        handler.close()
