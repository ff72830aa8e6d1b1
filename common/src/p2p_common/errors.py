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


def collapse(
    group: BaseExceptionGroup[BaseException],
    *,
    dropping: tuple[type[BaseException], ...] = (),
) -> BaseException:
    """One exception standing for a nursery's exception group of p2p errors.

    When sibling tasks fail together (a connection's reader and writer both see the
    socket break), the caller wants one verdict: a local error wins over a remote one
    (our bug or disk matters more), and among remote errors a specific violation wins
    over a broken connection. A group holding anything else is returned unchanged, so
    bugs are never hidden. ``dropping`` (``trio.Cancelled``) is left out beside p2p errors:
    a connection closed by us while the peer closed it too ends either way, and the p2p
    error is its verdict (left in, the group would escape every ``except RemoteError``).
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, dropping):
            leaves.append(exc)

    walk(group)
    if not leaves or not all(isinstance(e, P2PError) for e in leaves):
        return group
    for kind in (LocalError, ProtocolError, RemoteError):
        for exc in leaves:
            if isinstance(exc, kind):
                return exc
    return leaves[0]
