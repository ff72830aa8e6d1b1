"""Logging: stderr, one event a line, optionally JSON.

Call :func:`setup` once in ``__main__``. Log events with a short dotted name and
keyword fields: ``event(log, "peer.banned", peer="10.0.0.7:6881", reason=...)``.
Never pass credentials, tokens or Authorization headers as fields: the
formatter additionally masks any field whose name looks like a secret.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_SECRET_MARKERS = ("password", "token", "authorization", "secret", "credential")
_FIELDS = "p2p_fields"


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
        doc.update(_masked(getattr(record, _FIELDS, {})))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _masked(getattr(record, _FIELDS, {})).items())
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
    """Log one event ``name`` with structured ``fields``."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: fields})
