"""Logging: stderr, one event a line, optionally JSON.

Call :func:`setup` once in ``__main__``. Log events with a short dotted name and
keyword fields: ``event(log, "peer.banned", peer="10.0.0.7:6881", reason=...)``.
Never pass credentials, tokens or Authorization headers as fields: the
formatter additionally masks any field whose name looks like a secret.

Pull ids: the agent gives every request of its registry API an id (:func:`new_pull_id`,
random, unrelated to anything the caller sent) and sends it to the proxy in the
:data:`PULL_ID_HEADER`; the proxy adopts a well-formed one (:func:`valid_pull_id`) or makes its
own. Each service holds the id of the request being handled in :data:`PULL_ID`, a context
variable: trio copies it into every task started from that request (a download, a single-flight
origin fetch), and :func:`event` adds it to every line as ``pull_id``. Work shared by several
pulls runs with the id of the one that started it and records the others in a bounded
:class:`PullIds`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

_SECRET_MARKERS = ("password", "token", "authorization", "secret", "credential")
_FIELDS = "p2p_fields"

PULL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("p2p_pull_id", default=None)
"""The id of the pull (client request) the current task works for, if any."""
PULL_ID_HEADER = "X-P2P-Pull-Id"
"""The header that carries a pull id from an agent to a proxy (and back in answers)."""
MAX_PULL_IDS = 16
"""Most pull ids a piece of shared work lists (:class:`PullIds`); beyond them it counts."""
_PULL_ID_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}\Z", re.ASCII)


def new_pull_id() -> str:
    """A fresh pull id: 16 random hex digits (not a secret, derived from nothing)."""
    return secrets.token_hex(8)


def valid_pull_id(value: str | None) -> str | None:
    """``value`` if it is a well-formed pull id (1-64 letters, digits, ``.``, ``_``, ``-``,
    starting with a letter or digit), else None: a received id never carries anything else
    into a log line."""
    if value is None or not _PULL_ID_RE.match(value):
        return None
    return value


def current_pull_id() -> str | None:
    return PULL_ID.get()


@contextmanager
def pull_context(pull_id: str) -> Iterator[str]:
    """Run the block (and every task it starts) as part of pull ``pull_id``."""
    token = PULL_ID.set(pull_id)
    try:
        yield pull_id
    finally:
        PULL_ID.reset(token)


@contextmanager
def detached() -> Iterator[None]:
    """Run the block without a pull id: tasks started in it serve every pull (a torrent that
    seeds long after the download that added it), so their lines name none."""
    token = PULL_ID.set(None)
    try:
        yield
    finally:
        PULL_ID.reset(token)


class PullIds:
    """The pulls a piece of shared work (a download, an origin fetch) serves: the first
    :data:`MAX_PULL_IDS` ids, in order of arrival, and how many pulls in all."""

    __slots__ = ("count", "ids")

    def __init__(self, first: str | None = None) -> None:
        self.ids: list[str] = []
        self.count = 0
        self.add(first)

    def add(self, pull_id: str | None) -> None:
        if pull_id is None or pull_id in self.ids:
            return
        self.count += 1
        if len(self.ids) < MAX_PULL_IDS:
            self.ids.append(pull_id)

    @property
    def first(self) -> str | None:
        return self.ids[0] if self.ids else None

    def fields(self) -> dict[str, Any]:
        """``pull_ids`` (and ``pull_ids_more``, the ids not listed) for a log line."""
        found: dict[str, Any] = {"pull_ids": list(self.ids)}
        if self.count > len(self.ids):
            found["pull_ids_more"] = self.count - len(self.ids)
        return found


def _with_pull_id(fields: dict[str, Any]) -> dict[str, Any]:
    if "pull_id" not in fields:
        pull_id = PULL_ID.get()
        if pull_id is not None:
            return {**fields, "pull_id": pull_id}
    return fields


def _masked(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        key: ("<redacted>" if any(m in key.lower() for m in _SECRET_MARKERS) else value)
        for key, value in fields.items()
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(_masked(_with_pull_id(getattr(record, _FIELDS, {}))))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(
            f"{k}={v}" for k, v in _masked(_with_pull_id(getattr(record, _FIELDS, {}))).items()
        )
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()}"
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every ``p2p*`` logger to ``stream`` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries below us are chatty at info level; their warnings still come through.
    for noisy in ("httpx", "httpcore", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event ``name`` with structured ``fields`` (and the current pull's id as
    ``pull_id``, unless given)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: _with_pull_id(fields)})
