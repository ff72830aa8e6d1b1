"""The proxy's seeder when a fetch ends while the torrent that seeds it during the fetch is
still being set up (p2p_proxy.seeding.Seeder._start_ingest).

A fetch publishes its first chunk; the seeder starts an ingest torrent on the fetch's scratch
file in a task of its own. On a loaded machine that task may run after the fetch verified the
blob and renamed the scratch file into the cache. Opening the scratch path then once created a
new, empty file there and seeded its zeros as the blob: every leecher's piece failed its hash
check, and a leech of the proxy alone never completed (test_proxy_harness, under load).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from p2p_common.storage import PieceFile, StorageError
from p2p_proxy import seeding
from tests.engine_helpers import metainfo_for
from tests.unit.test_proxy_fetch import FakeOrigin, digest_of, make_random
from tests.unit.test_proxy_status import REPO, SECRET, Proxy

SIZE = 10_240


def scratch_files(proxy: Proxy) -> list[Path]:
    return list(proxy.cache.tmp_dir.iterdir())


async def seeded(proxy: Proxy, digest: str, data: bytes) -> None:
    """Wait until ``digest`` is seeded; check the seed reads the blob's bytes from the cache."""
    with trio.fail_after(10):
        while digest not in proxy.seeder.torrents():  # noqa: ASYNC110 - set by the seeder's task
            await trio.sleep(0.01)
    torrent = proxy.seeder.torrents()[digest]
    assert torrent.store.read(0, len(data)) == data
    fd = torrent.store.fileno()
    assert fd is not None
    assert os.path.samestat(os.fstat(fd), os.stat(proxy.cache.blob_path(digest)))


async def test_an_ingest_that_starts_after_its_fetch_ended_seeds_the_cached_blob(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    data = make_random(SIZE)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    proxy = Proxy(nursery, tmp_path)
    async with trio.open_nursery() as engine:
        await engine.start(proxy.engine.serve)
        async with origin.client() as client:
            # The ingest task waits for the blob's lock until the whole fetch is over.
            lock = proxy.seeder._locks.setdefault(digest, trio.Lock())
            async with lock:
                await proxy.fetcher.ensure(client, REPO, digest, SECRET, len(data))
                await trio.testing.wait_all_tasks_blocked()
            await seeded(proxy, digest, data)
        assert scratch_files(proxy) == []
        engine.cancel_scope.cancel()
    proxy.seeder.close()


async def test_an_ingest_that_opens_its_file_after_the_rename_seeds_the_cached_blob(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingest checked that its fetch was running, then opened the scratch path only after
    the fetch had renamed it into the cache (and before the fetch reported its end)."""
    data = make_random(SIZE)
    digest = digest_of(data)
    origin = FakeOrigin({digest: data})
    proxy = Proxy(nursery, tmp_path)
    opened: list[Path] = []

    def late_piece_file(*args: Any, **kwargs: Any) -> PieceFile:
        path = Path(args[1])
        if not kwargs.get("complete"):  # the ingest's open, in a worker thread
            deadline = time.monotonic() + 10
            while path.exists() and time.monotonic() < deadline:
                time.sleep(0.005)  # until the fetch has renamed its file into the cache
            opened.append(path)
        return PieceFile(*args, **kwargs)

    monkeypatch.setattr(seeding, "PieceFile", late_piece_file)
    async with trio.open_nursery() as engine:
        await engine.start(proxy.engine.serve)
        async with origin.client() as client:
            await proxy.fetcher.ensure(client, REPO, digest, SECRET, len(data))
            await seeded(proxy, digest, data)
        assert len(opened) == 1
        assert not opened[0].exists()  # nothing was created at the old path
        assert scratch_files(proxy) == []
        engine.cancel_scope.cancel()
    proxy.seeder.close()


def test_a_piece_file_opened_without_create_needs_the_file(tmp_path: Path) -> None:
    meta = metainfo_for(make_random(SIZE))
    with pytest.raises(StorageError, match="No such file"):
        PieceFile(meta, tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
