"""HTTP ``Range`` requests for blobs (RFC 9110 section 14), pure and bounded.

Only single byte ranges are served (as the distribution registry does); anything
else that is syntactically a range set is answered with the whole blob, which
RFC 9110 allows. An unsatisfiable range is an error the caller turns into 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from p2p_common.errors import RemoteError

MAX_RANGE_HEADER = 200

_SINGLE = re.compile(
    r"^bytes[ \t]*=[ \t]*(\d{0,19})[ \t]*-[ \t]*(\d{0,19})[ \t]*\Z", re.IGNORECASE | re.ASCII
)


class RangeNotSatisfiableError(RemoteError):
    """The requested range lies outside the blob (HTTP 416)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int
    """Inclusive last byte, as in Content-Range."""

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The byte range asked for by ``header`` within a blob of ``size`` bytes.

    None means "send the whole blob" (no header, an unsupported or malformed one).
    Raises :class:`RangeNotSatisfiableError` for a well-formed range that misses.
    """
    if header is None or len(header) > MAX_RANGE_HEADER:
        return None
    match = _SINGLE.match(header)
    if not match:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError(f"range {header!r} selects nothing")
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid: ignore the header (RFC 9110 14.1.1)
    if start >= size:
        raise RangeNotSatisfiableError(f"range {header!r} starts beyond {size} bytes")
    end = int(last) if last else size - 1
    return ByteRange(start, min(end, size - 1))
