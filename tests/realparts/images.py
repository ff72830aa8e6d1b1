"""Test images: built with the standard library, pushed and pulled with skopeo.

:func:`build_image` writes an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/…``) whose content is a pure function of its arguments: each layer is
an uncompressed tar holding one file of ``random.Random(seed)`` bytes. Options:

- ``docker_schema2=True``: Docker schema 2 media types (manifest v2, container config,
  ``rootfs.diff.tar.gzip`` layers, gzipped deterministically with mtime 0);
- ``platforms=[…]``: a multi-platform image; the tag names an OCI image index (or a
  Docker manifest list) with one manifest, config and set of layers per platform.

:func:`push_image` runs ``skopeo copy --preserve-digests`` so what lands in the registry
is byte-for-byte what was built (without it skopeo gzips uncompressed layers and the
digests change); :func:`pull_and_compare` pulls back to ``dir:`` and compares.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import subprocess
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.realparts.procs import clean_env, require

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes and the media type it is referenced with."""

    media_type: str
    data: bytes = field(repr=False)

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class PlatformImage:
    """One image manifest with its config and layers."""

    platform: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]


@dataclass(frozen=True)
class Image:
    """A built image: ``top`` is what the tag names (a manifest, or an index/list)."""

    tag: str
    top: Blob
    images: tuple[PlatformImage, ...]
    index: Blob | None = None
    """The multi-platform index or manifest list; ``None`` for a single-platform image."""

    @property
    def digest(self) -> str:
        """The digest the tag resolves to."""
        return self.top.digest

    @property
    def layers(self) -> tuple[Blob, ...]:
        return tuple(layer for image in self.images for layer in image.layers)

    def blobs(self) -> dict[str, Blob]:
        """Every config and layer blob (what ``/v2/<repo>/blobs/`` serves), by digest."""
        found: dict[str, Blob] = {}
        for image in self.images:
            for blob in (image.config, *image.layers):
                found[blob.digest] = blob
        return found

    def manifests(self) -> dict[str, Blob]:
        """Every manifest, index included, by digest (what ``/v2/<repo>/manifests/`` serves)."""
        found = {image.manifest.digest: image.manifest for image in self.images}
        if self.index is not None:
            found[self.index.digest] = self.index
        return found

    def everything(self) -> dict[str, Blob]:
        return {**self.blobs(), **self.manifests()}


def random_bytes(seed: str | int, size: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def layer_tar(seed: str | int, size: int, name: str = "data.bin") -> bytes:
    """An uncompressed tar with one file of ``size`` random bytes; deterministic."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        archive.addfile(info, io.BytesIO(random_bytes(seed, size)))
    return buffer.getvalue()


def _json_blob(media_type: str, doc: Mapping[str, Any]) -> Blob:
    return Blob(media_type, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")


def _platform_image(
    seed: str, platform: str, layer_sizes: Sequence[int], docker_schema2: bool
) -> PlatformImage:
    os_name, _, arch = platform.partition("/")
    layers: list[Blob] = []
    diff_ids: list[str] = []
    for number, size in enumerate(layer_sizes):
        tar = layer_tar(f"{seed}/{platform}/{number}", size, f"layer{number}.bin")
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        if docker_schema2:
            layers.append(Blob(DOCKER_LAYER, gzip.compress(tar, compresslevel=1, mtime=0)))
        else:
            layers.append(Blob(OCI_LAYER, tar))
    config = _json_blob(
        DOCKER_CONFIG if docker_schema2 else OCI_CONFIG,
        {
            "architecture": arch,
            "os": os_name,
            "created": "1970-01-01T00:00:00Z",
            "config": {"Cmd": ["/layer0.bin"], "Labels": {"p2p.test.seed": seed}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"p2p test layer {i}"} for i in range(len(layers))],
        },
    )
    manifest_doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker_schema2 else OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }
    manifest = _json_blob(manifest_doc["mediaType"], manifest_doc)
    return PlatformImage(platform, manifest, config, tuple(layers))


def make_image(
    *,
    seed: str,
    layer_sizes: Sequence[int] = (1024, 64 * 1024),
    tag: str = "latest",
    docker_schema2: bool = False,
    platforms: Sequence[str] | None = None,
) -> Image:
    """The image, in memory (see the module docstring)."""
    if platforms is None:
        single = _platform_image(seed, "linux/amd64", layer_sizes, docker_schema2)
        return Image(tag, single.manifest, (single,))
    images = tuple(_platform_image(seed, p, layer_sizes, docker_schema2) for p in platforms)
    index_type = DOCKER_LIST if docker_schema2 else OCI_INDEX
    index_doc = {
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [
            image.manifest.descriptor(
                platform={
                    "os": image.platform.partition("/")[0],
                    "architecture": image.platform.partition("/")[2],
                }
            )
            for image in images
        ],
    }
    index = _json_blob(index_type, index_doc)
    return Image(tag, index, images, index)


def write_oci_layout(image: Image, directory: Path) -> Path:
    """Write ``image`` as an OCI image layout; the tag is ``org.opencontainers.image.ref.name``."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, blob in image.everything().items():
        path = blobs / digest.removeprefix("sha256:")
        if not path.exists():
            path.write_bytes(blob.data)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            image.top.descriptor(annotations={"org.opencontainers.image.ref.name": image.tag})
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def write_dir_layout(image: Image, directory: Path) -> Path:
    """Write ``image`` in skopeo's ``dir:`` format (``manifest.json``, blobs by hex digest,
    ``<hex>.manifest.json`` per platform of an index, ``version``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "version").write_text("Directory Transport Version: 1.1\n")
    (directory / "manifest.json").write_bytes(image.top.data)
    if image.index is not None:
        for platform_image in image.images:
            name = platform_image.manifest.digest.removeprefix("sha256:") + ".manifest.json"
            (directory / name).write_bytes(platform_image.manifest.data)
    for digest, blob in image.blobs().items():
        (directory / digest.removeprefix("sha256:")).write_bytes(blob.data)
    return directory


def is_docker(image: Image) -> bool:
    return image.top.media_type in (DOCKER_MANIFEST, DOCKER_LIST)


def build_image(directory: Path, **options: Any) -> Image:
    """:func:`make_image` with ``options``, written to ``directory`` as an OCI layout.

    skopeo's ``oci:`` transport only finds index.json entries with OCI media types, so
    a Docker schema 2 image is also written in ``dir:`` format to ``directory/dir`` and
    :func:`push_image` pushes that.
    """
    image = make_image(**options)
    write_oci_layout(image, directory)
    if is_docker(image):
        write_dir_layout(image, directory / "dir")
    return image


def _creds_args(flag: str, creds: tuple[str, str] | None) -> list[str]:
    return [] if creds is None else [flag, f"{creds[0]}:{creds[1]}"]


def _tls_args(flag: str, ca_dir: Path | None) -> list[str]:
    if ca_dir is None:
        return [f"--{flag}-tls-verify=false"]
    return [f"--{flag}-cert-dir", str(ca_dir)]


def skopeo(args: Sequence[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run skopeo; raises with its stderr when it fails."""
    argv = [require("skopeo"), *args]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=clean_env()
    )
    if done.returncode != 0:
        raise SkopeoError(done.returncode, done.stderr.strip())
    return done


class SkopeoError(RuntimeError):
    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"skopeo failed ({returncode}): {stderr}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Pushed:
    """What a push put into the registry: sizes by digest."""

    ref: str
    """``HOST/REPO:TAG``."""
    digest: str
    """What the tag resolves to (the manifest, or the index)."""
    manifests: dict[str, int]
    blobs: dict[str, int]


def push_image(
    layout: Path,
    image: Image,
    registry_host: str,
    repository: str,
    *,
    creds: tuple[str, str] | None = None,
    ca_dir: Path | None = None,
) -> Pushed:
    """``skopeo copy --preserve-digests oci:LAYOUT:TAG docker://HOST/REPO:TAG``.

    Docker schema 2 images go from ``dir:LAYOUT/dir`` (see :func:`build_image`).
    """
    ref = f"{registry_host}/{repository}:{image.tag}"
    source = f"dir:{layout / 'dir'}" if is_docker(image) else f"oci:{layout}:{image.tag}"
    skopeo(
        [
            "copy",
            "--quiet",
            "--preserve-digests",
            *(["--all"] if image.index is not None else []),
            *_tls_args("dest", ca_dir),
            *_creds_args("--dest-creds", creds),
            source,
            f"docker://{ref}",
        ]
    )
    return Pushed(
        ref,
        image.digest,
        {d: b.size for d, b in image.manifests().items()},
        {d: b.size for d, b in image.blobs().items()},
    )


def pull_to_dir(
    registry_host: str,
    repository: str,
    reference: str,
    out: Path,
    *,
    creds: tuple[str, str] | None = None,
    ca_dir: Path | None = None,
    all_platforms: bool = False,
) -> Path:
    """``skopeo copy docker://HOST/REPO:REF dir:OUT`` (``--all`` for every platform)."""
    separator = "@" if ":" in reference else ":"
    skopeo(
        [
            "copy",
            "--quiet",
            "--preserve-digests",
            *(["--all"] if all_platforms else []),
            *_tls_args("src", ca_dir),
            *_creds_args("--src-creds", creds),
            f"docker://{registry_host}/{repository}{separator}{reference}",
            f"dir:{out}",
        ]
    )
    return out


def dir_contents(out: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file skopeo wrote to a ``dir:`` destination."""
    for path in sorted(out.iterdir()):
        yield path.name, path.read_bytes()


def compare_dir(image: Image, out: Path, *, all_platforms: bool = False) -> None:
    """Assert that a ``dir:`` pull of ``image`` holds exactly its bytes.

    ``manifest.json`` is the top-level manifest (or index); blobs are named by their
    hex digest; with ``--all`` the per-platform manifests are ``<hex>.manifest.json``.
    A single-platform pull of an index holds the chosen platform's manifest and blobs.
    """
    files = dict(dir_contents(out))
    blobs = {d.removeprefix("sha256:"): b for d, b in image.blobs().items()}
    manifest = files.pop("manifest.json", None)
    files.pop("version", None)
    if manifest is None:
        raise AssertionError(f"{out}: no manifest.json")
    if image.index is None or all_platforms:
        expected_top = image.top.data
        expected_blobs = set(blobs)
    else:  # skopeo picked one platform: find which
        chosen = [i for i in image.images if i.manifest.data == manifest]
        if not chosen:
            raise AssertionError(f"{out}: manifest.json is none of the image's manifests")
        expected_top = chosen[0].manifest.data
        expected_blobs = {
            b.digest.removeprefix("sha256:") for b in (chosen[0].config, *chosen[0].layers)
        }
    if manifest != expected_top:
        raise AssertionError(f"{out}: manifest.json differs from what was pushed")
    if all_platforms and image.index is not None:
        for platform_image in image.images:
            name = platform_image.manifest.digest.removeprefix("sha256:") + ".manifest.json"
            if files.pop(name, None) != platform_image.manifest.data:
                raise AssertionError(f"{out}: {name} missing or different")
    if set(files) != expected_blobs:
        raise AssertionError(
            f"{out}: blobs {sorted(files)} differ from the expected {sorted(expected_blobs)}"
        )
    for name, data in files.items():
        if data != blobs[name].data:
            raise AssertionError(f"{out}: blob {name} differs from what was pushed")


def pull_and_compare(
    image: Image,
    registry_host: str,
    repository: str,
    out: Path,
    *,
    creds: tuple[str, str] | None = None,
    ca_dir: Path | None = None,
    all_platforms: bool = False,
    by_digest: bool = False,
) -> None:
    """Pull ``image`` (by tag, or by digest) with skopeo to ``dir:OUT``; compare byte for byte."""
    reference = image.digest if by_digest else image.tag
    pull_to_dir(
        registry_host,
        repository,
        reference,
        out,
        creds=creds,
        ca_dir=ca_dir,
        all_platforms=all_platforms,
    )
    compare_dir(image, out, all_platforms=all_platforms)
