"""The agent's download records (p2p_agent.downloads) and the credentials they carry."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import trio
import trio.testing

from p2p_agent.downloads import BlobRequest, Download, Downloads
from p2p_agent.metrics import AgentMetrics
from p2p_agent.proxies import ProxyClient
from p2p_common.blobcache import BlobCache, CacheFullError
from p2p_common.engine import Engine
from p2p_common.errors import LocalError
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.registry_auth import Credentials, basic_authorization

DIGEST = "sha256:" + "ab" * 32


def test_a_blob_request_never_shows_its_credentials() -> None:
    authorization = basic_authorization(Credentials("alice", "pull-secret-s3cret"))
    encoded = authorization.split()[1]
    request = BlobRequest("registry.example.com", "team/app", DIGEST, 1234, authorization)
    for text in (repr(request), str(request), f"{request!r}", repr([request]), repr({1: request})):
        assert encoded not in text
        assert "s3cret" not in text
        assert "<redacted>" in text
        assert "team/app" in text
        assert DIGEST in text
    assert request.authorization == authorization  # still there for the proxy


def test_an_anonymous_blob_request_says_so() -> None:
    request = BlobRequest("registry.example.com", "team/app", DIGEST, 1234, None)
    assert "authorization=None" in repr(request)
    assert "<redacted>" not in repr(request)


# --- one start per blob -----------------------------------------------------------------------


class StartingDownloads(Downloads):
    """Downloads whose start is scripted: each start waits for ``release``, then fails with
    ``fail`` or starts a download that never ends."""

    def __init__(self, cache: BlobCache) -> None:
        super().__init__(
            cache=cache,
            engine=cast(Engine, SimpleNamespace(torrents={})),
            proxies=cast(ProxyClient, None),
            metrics=AgentMetrics(),
            fallback_after=10.0,
        )
        self.starts = 0
        self.release = trio.Event()
        self.fail: BaseException | None = None

    async def _download(
        self, request: BlobRequest, *, task_status: trio.TaskStatus[Download]
    ) -> None:
        self.starts += 1
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        download = Download(request.digest, request.size, trio.current_time())
        self.active[request.digest] = download
        task_status.started(download)
        await trio.sleep_forever()


async def test_concurrent_pulls_of_a_blob_share_one_start_and_its_failure(
    tmp_path: Path,
) -> None:
    downloads = StartingDownloads(BlobCache(tmp_path))
    request = BlobRequest("registry.example.com", "team/app", DIGEST, 1234, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(downloads.run)
        errors: list[BaseException] = []
        got: list[Download | None] = []

        async def pull() -> None:
            try:
                got.append(await downloads.get(request))
            except (OCIError, LocalError) as exc:
                errors.append(exc)

        # The proxy refuses: every waiting pull gets its own copy of the refusal.
        downloads.fail = OCIError(ErrorCode.DENIED, "no")
        async with trio.open_nursery() as pulls:
            for _ in range(4):
                pulls.start_soon(pull)
            await trio.testing.wait_all_tasks_blocked()
            downloads.release.set()
        assert downloads.starts == 1
        assert [type(e) for e in errors] == [OCIError] * 4
        assert {e.code for e in errors if isinstance(e, OCIError)} == {ErrorCode.DENIED}
        assert len({id(e) for e in errors} | {id(downloads.fail)}) == 5

        # A full cache keeps its kind (the API answers 507), a copy for each pull.
        errors.clear()
        downloads.release = trio.Event()
        downloads.fail = CacheFullError("every blob is in use")
        async with trio.open_nursery() as pulls:
            for _ in range(2):
                pulls.start_soon(pull)
            await trio.testing.wait_all_tasks_blocked()
            downloads.release.set()
        assert downloads.starts == 2  # the failure was forgotten: a new start
        assert [type(e) for e in errors] == [CacheFullError] * 2

        # Then the start succeeds: every pull gets the one download.
        downloads.release = trio.Event()
        downloads.fail = None
        async with trio.open_nursery() as pulls:
            for _ in range(3):
                pulls.start_soon(pull)
            await trio.testing.wait_all_tasks_blocked()
            downloads.release.set()
        assert downloads.starts == 3
        assert len(got) == 3
        assert got[0] is not None
        assert all(d is got[0] for d in got)
        assert await downloads.get(request) is got[0]  # running: no new start
        assert downloads.starts == 3
        nursery.cancel_scope.cancel()


async def test_a_pull_that_hangs_up_does_not_cancel_the_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    downloads = StartingDownloads(BlobCache(tmp_path))
    request = BlobRequest("registry.example.com", "team/app", DIGEST, 1234, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(downloads.run)
        with trio.move_on_after(1):
            await downloads.get(request)  # containerd gives up
        downloads.release.set()
        got = await downloads.get(request)  # the retry finds the start that went on
        assert got is not None
        assert downloads.starts == 1
        nursery.cancel_scope.cancel()
