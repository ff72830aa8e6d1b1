"""Pull ids in log lines (p2p_common.logs): made, checked, carried by trio tasks, bounded."""

from __future__ import annotations

import io
import json
import logging
import string

import trio
import trio.lowlevel
from hypothesis import given
from hypothesis import strategies as st

from p2p_common import logs
from p2p_common.logs import (
    MAX_PULL_IDS,
    JsonFormatter,
    PullIds,
    TextFormatter,
    current_pull_id,
    event,
    new_pull_id,
    pull_context,
    valid_pull_id,
)

ALLOWED = set(string.ascii_letters + string.digits + "._-")


def test_new_ids_are_random_hex() -> None:
    ids = {new_pull_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 16 and set(i) <= set("0123456789abcdef") for i in ids)
    assert all(valid_pull_id(i) == i for i in ids)


@given(st.text(max_size=80))
def test_a_received_id_is_taken_only_when_it_is_plain(text: str) -> None:
    taken = valid_pull_id(text)
    if taken is None:
        assert not text or len(text) > 64 or not set(text) <= ALLOWED or text[0] in "._-"
    else:
        assert taken == text
        assert set(text) <= ALLOWED


def test_ids_that_could_forge_a_log_line_are_refused() -> None:
    for bad in ("a\nb", 'a"b', "a b", "", "-a", "x" * 65, "é", "a\x00"):
        assert valid_pull_id(bad) is None


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"p2p.test.pullids.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_every_line_of_a_pull_carries_its_id() -> None:
    logger, stream = capture(JsonFormatter())
    event(logger, "before")
    with pull_context("abc123"):
        event(logger, "during", digest="sha256:x")
        event(logger, "explicit", pull_id="other")
        logger.warning("plain.line")  # not an event: the formatter adds it
    event(logger, "after")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("pull_id") for line in lines] == [None, "abc123", "other", "abc123", None]
    text_logger, text = capture(TextFormatter())
    with pull_context("abc123"):
        event(text_logger, "during")
    assert "pull_id=abc123" in text.getvalue()


async def test_tasks_started_for_a_pull_keep_its_id() -> None:
    seen: list[str | None] = []

    async def child() -> None:
        await trio.lowlevel.checkpoint()
        seen.append(current_pull_id())

    async with trio.open_nursery() as outer:
        with pull_context("first"):
            outer.start_soon(child)  # started for "first", runs in the outer nursery
        with pull_context("second"):
            outer.start_soon(child)
        outer.start_soon(child)
    assert sorted(seen, key=str) == sorted(["first", "second", None], key=str)
    assert logs.PULL_ID.get() is None


def test_pull_ids_are_bounded() -> None:
    pulls = PullIds("a")
    for n in range(100):
        pulls.add(f"p{n}")
    pulls.add("a")  # already counted
    pulls.add(None)
    assert pulls.first == "a"
    assert pulls.count == 101
    assert pulls.fields() == {"pull_ids": pulls.ids, "pull_ids_more": 101 - MAX_PULL_IDS}
    assert len(pulls.ids) == MAX_PULL_IDS
    assert PullIds().fields() == {"pull_ids": []}
