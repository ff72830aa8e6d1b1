"""containerd 1.6 as a real pull client, with ``ctr``.

:func:`run_containerd` starts ``containerd --config CFG.toml`` with its own root, state
and gRPC socket under a fresh directory (containerd's content store is shared by all
namespaces: a blob it already holds is never requested again, so every test gets a
fresh root), the ``native`` snapshotter and the CRI registry ``config_path``.

:class:`Containerd` drives ``ctr``: pulls (plain HTTP, optional ``--user``, optional
``--hosts-dir`` for mirror mode), reading blobs back from the content store
(``ctr content get``) and writing ``hosts.toml`` files for mirror mode.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.realparts.procs import ManagedProcess, clean_env, require

DEFAULT_NAMESPACE = "p2p-test"


def containerd_config(base: Path, socket: Path) -> str:
    """config.toml (version 2) with everything under ``base``, listening on ``socket``."""
    return f"""version = 2
root = "{base / "root"}"
state = "{base / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{base / "certs.d"}"
"""


def mirror_hosts_toml(dead_server: str, mirror: str) -> str:
    """hosts.toml that sends pulls and resolves to ``mirror`` before the (dead) ``server``."""
    return f'server = "{dead_server}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'


def write_mirror_hosts(hosts_dir: Path, registry: str, dead_server: str, mirror: str) -> Path:
    """Write ``hosts_dir/<registry>/hosts.toml``; returns the file."""
    directory = hosts_dir / registry
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(mirror_hosts_toml(dead_server, mirror))
    return path


class CtrError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        shown = [a if not a.startswith("--user=") else "--user=<redacted>" for a in argv]
        super().__init__(f"{' '.join(shown[3:])} failed ({returncode}): {stderr}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass
class Containerd:
    """A running containerd; ``socket`` is its gRPC address."""

    base: Path
    socket: Path
    daemon: ManagedProcess
    namespace: str = DEFAULT_NAMESPACE

    @property
    def config_file(self) -> Path:
        """The config.toml containerd was started with."""
        return self.base / "config.toml"

    @property
    def config_path(self) -> Path:
        """The CRI registry ``config_path`` (``<registry>/hosts.toml`` files go here)."""
        return self.base / "certs.d"

    def ctr(self, *args: str, timeout: float = 120.0, namespace: str | None = None) -> bytes:
        argv = [require("ctr"), "-a", str(self.socket), "-n", namespace or self.namespace, *args]
        done = subprocess.run(
            argv, capture_output=True, timeout=timeout, check=False, env=clean_env()
        )
        if done.returncode != 0:
            raise CtrError(argv, done.returncode, done.stderr.decode(errors="replace").strip())
        return done.stdout

    def pull(
        self,
        ref: str,
        *,
        user: tuple[str, str] | None = None,
        plain_http: bool = True,
        hosts_dir: Path | None = None,
        platform: str | None = None,
        all_platforms: bool = False,
        timeout: float = 120.0,
    ) -> None:
        """``ctr images pull --snapshotter native [--plain-http] [--user u:p] [--hosts-dir D]``."""
        args = ["images", "pull", "--snapshotter", "native"]
        if plain_http:
            args.append("--plain-http")
        if user is not None:
            args.append(f"--user={user[0]}:{user[1]}")
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        if platform is not None:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        self.ctr(*args, ref, timeout=timeout)

    def fetch(
        self,
        ref: str,
        *,
        user: tuple[str, str] | None = None,
        plain_http: bool = True,
        hosts_dir: Path | None = None,
        timeout: float = 120.0,
    ) -> None:
        """``ctr content fetch`` (download into the content store, no unpacking)."""
        args = ["content", "fetch"]
        if plain_http:
            args.append("--plain-http")
        if user is not None:
            args.append(f"--user={user[0]}:{user[1]}")
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        self.ctr(*args, ref, timeout=timeout)

    def content_get(self, digest: str) -> bytes:
        """The bytes of ``digest`` from the content store (``ctr content get``)."""
        return self.ctr("content", "get", digest)

    def content_digests(self) -> set[str]:
        """Every digest in the content store (``ctr content ls -q``)."""
        return set(self.ctr("content", "ls", "-q").decode().split())

    def image_target(self, ref: str) -> str:
        """The digest an image record points at (``ctr images ls``)."""
        for line in self.ctr("images", "ls").decode().splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                for value in fields:
                    if re.fullmatch(r"sha256:[0-9a-f]{64}", value):
                        return value
        raise KeyError(ref)

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").decode().split()

    def remove_image(self, ref: str) -> None:
        self.ctr("images", "rm", "--sync", ref)


@contextmanager
def run_containerd(workdir: Path, namespace: str = DEFAULT_NAMESPACE) -> Iterator[Containerd]:
    """Start containerd with everything under ``workdir``; stop it by PID on exit."""
    binary = require("containerd")
    require("ctr")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "certs.d").mkdir(exist_ok=True)
    # A unix socket path must stay under 108 bytes: pytest's tmp_path can be longer.
    socket_dir = Path(tempfile.mkdtemp(prefix="p2p-ctd-"))
    socket = socket_dir / "c.sock"
    config = workdir / "config.toml"
    config.write_text(containerd_config(workdir, socket))
    daemon = ManagedProcess([binary, "--config", str(config)], workdir / "containerd.log")
    instance = Containerd(workdir, socket, daemon, namespace)
    try:
        with daemon:
            daemon.wait_until(lambda: _ready(instance), 30.0, "containerd to answer ctr version")
            yield instance
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def _ready(instance: Containerd) -> bool:
    if not instance.socket.exists():
        return False
    try:
        instance.ctr("version", timeout=5)
    except (CtrError, subprocess.TimeoutExpired):
        return False
    return True
