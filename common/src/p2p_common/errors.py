"""The exception hierarchy shared by every layer.

Say whose fault it is: a :class:`RemoteError` means the other side (a peer, a
tracker, an origin registry, a client) sent something wrong; the caller drops or
scores that party and carries on. A :class:`LocalError` means this process is in
a state it should not be in (a bug, a full disk, a bad configuration) and is
reported loudly.
"""

from __future__ import annotations


class P2PError(Exception):
    """Base class of every error p2p raises on purpose."""


class LocalError(P2PError):
    """Our side failed: a bug, an exhausted resource, a bad configuration."""


class RemoteError(P2PError):
    """The other side misbehaved: malformed or hostile input, a protocol violation."""


class ProtocolError(RemoteError):
    """A message broke the rules of its protocol (framing, syntax, sizes, ordering)."""
