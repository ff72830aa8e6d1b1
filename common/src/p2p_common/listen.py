"""Listening sockets for every service port, IPv4, IPv6 and dual-stack alike.

A listen address (:data:`p2p_common.settings.ListenAddress`) becomes sockets here:

- ``:port`` (no host): every address of the node. One IPv6 socket on ``::`` with
  ``IPV6_V6ONLY`` off, which takes IPv4 clients too (as ``::ffff:a.b.c.d``), whatever
  ``net.ipv6.bindv6only`` says; on a kernel without IPv6 (``ipv6.disable=1``) one IPv4 socket on
  ``0.0.0.0``. So the same setting serves IPv4-only, IPv6-only and dual-stack clusters.
- ``[::]:port``: the same IPv6 socket (dual-stack, ``IPV6_V6ONLY`` off).
- ``0.0.0.0:port``: IPv4 only. Any other address: that address only.
- A name (``localhost``): one socket per address it resolves to (127.0.0.1 and ::1), all on the
  same port (port 0: the port the first one got); addresses the node lacks are skipped, as long
  as one can be bound.

:func:`tcp_sockets` binds them (``SO_REUSEADDR``, ``TCP_NODELAY``), :func:`hypercorn_binds` hands
them to hypercorn as ``fd://`` binds, :func:`trio_listeners` to trio. Clients of a dual-stack
socket show up with IPv4-mapped addresses: :func:`p2p_common.settings.unmapped` spells them as
IPv4 again (bans, per-address limits and the tracker's peer table compare plain addresses).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio

from p2p_common.settings import split_listen

__all__ = ["has_ipv6", "hypercorn_binds", "listen_addresses", "tcp_sockets", "trio_listeners"]

BACKLOG = 1024

_SKIPPABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)
"""Binding an address of a name fails this way when the node lacks that address or family."""


def has_ipv6() -> bool:
    """Whether the kernel offers IPv6 sockets (no ``ipv6.disable=1``)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def listen_addresses(address: str, kind: int = socket.SOCK_STREAM) -> list[tuple[int, str]]:
    """(family, host) of every socket ``address`` stands for (see the module docstring)."""
    host, port = split_listen(address)
    if host == "":
        return [(socket.AF_INET6, "::")] if has_ipv6() else [(socket.AF_INET, "0.0.0.0")]
    try:
        literal = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        pass
    else:
        return [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, host)]
    infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    found: list[tuple[int, str]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in found:
            found.append((family, str(sockaddr[0])))
    return found


def _bind(family: int, host: str, port: int, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            # "::" is every address of both families; any other IPv6 address only itself.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bound_sockets(address: str, kind: int = socket.SOCK_STREAM) -> list[socket.socket]:
    """Bound, not yet listening sockets for ``address`` (blocking, at start-up). ``OSError``
    names the address when none can be bound."""
    _host, port = split_listen(address)
    sockets: list[socket.socket] = []
    last: OSError | None = None
    try:
        candidates = listen_addresses(address, kind)
    except OSError as exc:
        raise OSError(exc.errno, f"{address}: {exc.strerror or exc}") from None
    try:
        for family, host in candidates:
            try:
                sock = _bind(family, host, port, kind)
            except OSError as exc:
                if len(candidates) > 1 and exc.errno in _SKIPPABLE:
                    last = exc
                    continue
                raise OSError(exc.errno, f"{address}: {exc.strerror or exc}") from None
            sockets.append(sock)
            port = port or sock.getsockname()[1]  # the others take the same port
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        detail = last.strerror if last is not None else "nothing to bind"
        raise OSError(last.errno if last else errno.EADDRNOTAVAIL, f"{address}: {detail}")
    return sockets


def tcp_sockets(address: str) -> list[socket.socket]:
    """Bound TCP sockets for ``address`` (blocking, at start-up)."""
    return bound_sockets(address, socket.SOCK_STREAM)


def hypercorn_binds(address: str) -> list[str]:
    """``fd://N`` binds for hypercorn (which takes the descriptors over and listens), or
    ``address`` itself for a unix socket (``unix:PATH``)."""
    if address.startswith("unix:"):
        return [address]
    return [f"fd://{sock.detach()}" for sock in tcp_sockets(address)]


def trio_listeners(address: str, *, backlog: int = BACKLOG) -> list[trio.SocketListener]:
    """Listening trio sockets for ``address``."""
    listeners = []
    for sock in tcp_sockets(address):
        sock.listen(backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners
