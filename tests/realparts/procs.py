"""Process plumbing for the real-parts harness: ports, binaries, managed subprocesses.

Everything here is synchronous and thread-safe enough to be called from a trio test through
``trio.to_thread.run_sync``. Waiting is always polling a condition against a deadline, never a
bare sleep.

Cleanup: every :class:`ManagedProcess` is started in its own session (process group) and is
stopped when its ``with`` block ends, whatever happens inside it. As a last resort, an ``atexit``
hook kills the process group of any managed process still alive when the interpreter exits.
Proxy variables are removed from the children's environment so that nothing a real part does can
leave the host through a configured proxy.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, NoReturn, Self, TypeVar

__all__ = [
    "INSTALL_SCRIPT",
    "Completion",
    "ManagedProcess",
    "ProcessFailedError",
    "clean_env",
    "free_port",
    "poll_until",
    "port_accepts",
    "require",
]

INSTALL_SCRIPT = "tests/install-real-parts.sh"
"""The script that installs every real part (relative to the repository root)."""

LOG_TAIL_LINES = 40
"""How many lines of a process log an error message quotes."""

_PROXY_VARS = frozenset(
    {"http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy", "socks_proxy"}
)

T = TypeVar("T")


class ProcessFailedError(RuntimeError):
    """A managed real part died, did not become ready in time, or misbehaved.

    The message always ends with the last lines of the process log.
    """


@dataclass(frozen=True)
class Completion:
    """How a download finished.

    ``elapsed`` is wall time in seconds from when the peer started working on the torrent (torrent
    added, or process ready for aria2) until it held every piece. ``cpu_seconds`` is the CPU time
    (user + system, all threads) the peer's process used over that same interval.
    ``finished_at`` is the ``time.monotonic()`` value at completion; on Linux it is comparable
    across processes (CLOCK_MONOTONIC), so a benchmark can measure from its own start time.
    """

    elapsed: float
    cpu_seconds: float
    finished_at: float


def require(binary: str) -> str:
    """Return the absolute path of ``binary`` on ``PATH``.

    Raises :class:`RuntimeError` naming the binary and the install script when it is missing:
    tests that need a real part must fail, never skip, when it is absent.
    """
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(
            f"real part {binary!r} is not installed (not found on PATH); "
            f"run `bash {INSTALL_SCRIPT}` (as root) to install the real parts"
        )
    return os.path.abspath(path)


_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=1024)
"""Ports :func:`free_port` handed out lately: not handed out again while their caller may not
have bound them yet (the kernel may offer a port again as soon as the probe closes it)."""


def _wildcard_socket(kind: int) -> socket.socket:
    """A socket on every address of both families (one IPv4 socket where IPv6 is missing)."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return sock
    except OSError:
        return socket.socket(socket.AF_INET, kind)


def _outside_ephemeral_range() -> range | None:
    """Ports below the kernel's range for outgoing connections' source ports (from 10000 on),
    or None when that leaves too few."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(10000, low) if low - 10000 >= 2000 else None


_PICK = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that is currently free for both TCP and UDP on every address (the services
    bind ``:port``, every address), that this process was not given by an earlier call lately
    (a plan of several services asks for many ports before any of them is bound), and, where the
    kernel's settings allow, that lies below the range the kernel takes source ports of outgoing
    connections from: a port from that range can be taken by any connection the machine opens
    between this check and the service's bind (a busy test run opens hundreds a second).
    ``host`` is where the caller will bind; the check covers it.

    Both protocols are checked because libtorrent opens a UDP socket (uTP) on its listen port.
    Another test run on the same machine may still pick the same port in the same moment;
    callers see that as a start-up failure with a clear log.
    """
    del host  # every address is checked, this one included
    outside = _outside_ephemeral_range()
    for _ in range(200):
        with _wildcard_socket(socket.SOCK_STREAM) as tcp:
            wildcard = "::" if tcp.family == socket.AF_INET6 else "0.0.0.0"
            try:
                tcp.bind((wildcard, _PICK.choice(outside) if outside else 0))
            except OSError:
                continue
            port: int = tcp.getsockname()[1]
            if port in _RECENT_PORTS:
                continue
            with _wildcard_socket(socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("::" if udp.family == socket.AF_INET6 else "0.0.0.0", port))
                except OSError:
                    continue
                _RECENT_PORTS.append(port)
                return port
    raise RuntimeError("could not find a port free for TCP and UDP on every address")


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def poll_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    max_interval: float = 0.2,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that value.

    Polls with a growing interval (``interval`` doubling up to ``max_interval``) and raises
    :class:`TimeoutError` mentioning ``what`` once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_interval)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without proxy variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    if extra:
        env.update(extra)
    return env


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads), from ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for proc in leftovers:
        proc.kill()


class ManagedProcess:
    """A real part running as a child process, with its output in a log file.

    Use it as a context manager: ``__enter__`` starts it, ``__exit__`` stops it (SIGTERM to its
    process group, SIGKILL after ``stop_timeout`` seconds). Every failure raises
    :class:`ProcessFailedError` quoting the last lines of the log.

    stdout and stderr go to ``log_path``. With ``pipes=True`` stdin and stdout are pipes instead
    (available as :attr:`stdin` and :attr:`stdout`) and only stderr goes to the log; this is how
    the libtorrent worker talks to its parent.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        name: str | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        pipes: bool = False,
        stop_timeout: float = 5.0,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.name = name or Path(self.argv[0]).name
        self.cwd = cwd
        self.env = clean_env(env)
        self.pipes = pipes
        self.stop_timeout = stop_timeout
        self._popen: subprocess.Popen[bytes] | None = None
        self._last_cpu = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the process (once). Raises :class:`ProcessFailedError` if it cannot be spawned."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    stdin=subprocess.PIPE if self.pipes else subprocess.DEVNULL,
                    stdout=subprocess.PIPE if self.pipes else log,
                    stderr=log,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise ProcessFailedError(
                    f"{self.name}: could not start {self.argv[0]}: {exc}"
                ) from exc
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdin(self) -> IO[bytes]:
        stream = self.popen.stdin
        if stream is None:
            raise RuntimeError(f"{self.name} was started without pipes")
        return stream

    @property
    def stdout(self) -> IO[bytes]:
        stream = self.popen.stdout
        if stream is None:
            raise RuntimeError(f"{self.name} was started without pipes")
        return stream

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (negative: killed by that signal)."""
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process itself (not its group)."""
        if self.running:
            self.popen.send_signal(sig)

    def _signal_group(self, sig: int) -> None:
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, sig)

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the process: SIGTERM to its group, then SIGKILL after ``timeout`` seconds.

        Idempotent. Returns the exit status (``None`` if it was never started).
        """
        if self._popen is None:
            return None
        bound = self.stop_timeout if timeout is None else timeout
        try:
            if self._popen.poll() is None:
                self._sample_cpu()
                self._signal_group(signal.SIGTERM)
                try:
                    self._popen.wait(bound)
                except subprocess.TimeoutExpired:
                    self._append_log(
                        f"[harness] {self.name} ignored SIGTERM for {bound:g} s: SIGKILL"
                    )
            # Also reaches leftover children that share the group.
            self._signal_group(signal.SIGKILL)
            self._popen.wait()
        finally:
            self._close_pipes()
            with _LIVE_LOCK:
                _LIVE.discard(self)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group at once (used by the ``atexit`` safety net)."""
        if self._popen is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(Exception):
            self._popen.wait(2)
        self._close_pipes()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _close_pipes(self) -> None:
        if self._popen is None:
            return
        for stream in (self._popen.stdin, self._popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    # -- waiting -----------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise :class:`ProcessFailedError` (with the log tail) if the process has exited."""
        code = self.returncode
        if code is not None:
            self.fail(f"exited unexpectedly with status {code}")

    def wait_until(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        what: str,
        *,
        interval: float = 0.02,
        max_interval: float = 0.2,
    ) -> T:
        """Poll ``predicate`` until truthy; fail early if the process dies, or at the deadline."""

        def check() -> T | None:
            self.check_alive()
            return predicate()

        try:
            return poll_until(check, timeout, what, interval=interval, max_interval=max_interval)
        except TimeoutError as exc:
            self.fail(str(exc))

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        """Wait until ``host:port`` accepts TCP connections (the process must stay alive)."""
        self.wait_until(lambda: port_accepts(port, host), timeout, f"{host}:{port} to accept")

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself and return its status."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"did not exit within {timeout:g} s")
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return code

    # -- measurement and diagnostics ---------------------------------------------------------

    def _sample_cpu(self) -> float:
        if self._popen is not None and self._popen.poll() is None:
            value = _proc_cpu_seconds(self._popen.pid)
            if value is not None:
                self._last_cpu = value
        return self._last_cpu

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system, all threads) used so far.

        After the process has stopped, the last value sampled while it ran (``stop`` samples it
        just before sending SIGTERM).
        """
        return self._sample_cpu()

    def listening(self) -> list[tuple[str, str, int]]:
        """The sockets this process listens on, as ``(protocol, address, port)`` (from ``ss``).

        ``protocol`` is ``tcp`` or ``udp``; ``address`` is ``0.0.0.0``, ``*`` or ``::`` for a
        wildcard bind. Tests use it to prove that a real part listens on loopback only.
        """
        out = subprocess.run(
            [require("ss"), "-H", "-l", "-n", "-p", "-t", "-u"],
            check=True,
            capture_output=True,
            text=True,
            env=clean_env(),
        ).stdout
        marker = f"pid={self.pid},"
        sockets = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) < 5 or marker not in line:
                continue
            address, _, port = fields[4].rpartition(":")
            address = address.strip("[]").split("%")[0]
            sockets.append((fields[0], address, int(port)))
        return sockets

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log (empty if there is none yet)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - 64 * 1024))
                data = log.read()
        except OSError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def _append_log(self, message: str) -> None:
        with contextlib.suppress(OSError), open(self.log_path, "a") as log:
            log.write(message + "\n")

    def fail(self, message: str) -> NoReturn:
        """Raise :class:`ProcessFailedError` with ``message`` and the tail of the log."""
        raise ProcessFailedError(
            f"{self.name} (pid {self._popen.pid if self._popen else '-'}): {message}\n"
            f"--- last lines of {self.log_path} ---\n{self.log_tail()}"
        )

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid={self._popen.pid}"
        return f"<ManagedProcess {self.name} {state} rc={self.returncode}>"
