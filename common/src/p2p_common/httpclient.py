"""httpx settings shared by every HTTP client of the services.

httpcore (under httpx) receives at most 64 KiB per read, a class attribute of its HTTP/1.1
connection. For blob transfers (origin -> proxy, proxy -> agent) that is the main cost on
the receiving side: measured on the development machine, reading a 1 GiB blob from the
distribution registry took 0.63-0.70 CPU seconds at 64 KiB and 0.31-0.36 at 256 KiB, at
twice the speed (1.5-1.7 versus 2.7-3.2 GB/s); 4 MiB reads were slower again (allocation).
:func:`tune_reads` raises the read size once per process. It changes nothing else of
httpx's behaviour: a read returns what the socket has, up to that size.
"""

from __future__ import annotations

import httpcore

READ_BYTES = 256 * 1024

_tuned = False


def tune_reads(read_bytes: int = READ_BYTES) -> None:
    """Let httpcore's HTTP/1.1 connections read up to ``read_bytes`` at a time."""
    global _tuned
    if _tuned:
        return
    connection = getattr(httpcore, "AsyncHTTP11Connection", None)
    if connection is not None and isinstance(getattr(connection, "READ_NUM_BYTES", None), int):
        connection.READ_NUM_BYTES = read_bytes
    _tuned = True
