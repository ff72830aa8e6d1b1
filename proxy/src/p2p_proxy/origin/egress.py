"""Which origin requests go through an outbound (egress) HTTP proxy, pure.

Clusters that reach the internet only through a forward proxy give the p2p-proxy one for its
origin traffic: ``originProxy`` (a URL, for every origin request) or ``originProxyFromEnv``
(``HTTPS_PROXY`` for https targets, ``HTTP_PROXY`` for http ones, from the process
environment); ``originNoProxy`` and ``NO_PROXY`` name the hosts that bypass it. Only the origin
client uses it (registries, their token realms and the storage their blob redirects point
to); announces to trackers, agent traffic and peers never do.

:class:`EgressRoutes` answers, for one request target (scheme, host, port), the proxy URL to
send it through, or None (direct). The exceptions follow Go's ``NO_PROXY`` rules (what
containerd, kubelet and most cluster tooling read):

- ``*`` alone: no request uses the proxy;
- an IP address (``10.1.2.3``, ``fd00::1``, ``[fd00::1]``), optionally with a port
  (``10.1.2.3:5000``, ``[fd00::1]:5000``): that address (on that port);
- a network in CIDR notation (``10.0.0.0/8``, ``fd00::/8``): addresses in it;
- a domain name (``example.com``), optionally with a port: that name and every name below it;
  with a leading dot (``.example.com``) or ``*.`` only the names below it.

Names are compared without resolving them: an IP rule matches a URL that names that address.

Proxy URLs may carry credentials (``http://user:password@proxy:3128``); :func:`redact` is the
only spelling of a proxy URL that goes into logs, errors and status documents.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "EgressRoutes",
    "NoProxyRule",
    "parse_no_proxy",
    "parse_proxy_url",
    "redact",
]

MAX_RULES = 1000
"""Most ``NO_PROXY`` entries read (a longer list is a mistake, and every request checks them)."""
MAX_ENTRY = 300
"""Longest ``NO_PROXY`` entry."""

SHOWN_RULES = 50
"""``NO_PROXY`` entries shown in logs and status views (the first ones)."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split(value: str) -> SplitResult:
    text = value.strip()
    if "://" not in text:
        text = "http://" + text  # like Go and curl: a bare host:port is an http proxy
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("the proxy URL has an invalid port") from None
    return parts


def parse_proxy_url(value: str) -> str:
    """A proxy URL as the transport takes it: ``http(s)://[user[:password]@]host[:port]``.

    A bare ``host:port`` means ``http://``. Paths, queries and other schemes are refused. The
    messages of the errors never contain the value (it may hold a password).
    """
    if any(c.isspace() or ord(c) < 0x20 for c in value.strip()):
        raise ValueError("the proxy URL contains spaces or control characters")
    parts = _split(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("the proxy URL must be http:// or https://")
    if not parts.hostname:
        raise ValueError("the proxy URL names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the proxy URL must be scheme://[user:password@]host[:port], no path")
    return parts._replace(path="").geturl()


def redact(url: str) -> str:
    """``url`` without its credentials: ``http://***@proxy:3128`` for a URL with a user or a
    password, unchanged otherwise. What logs, errors and status documents may show."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class NoProxyRule:
    """One ``NO_PROXY`` entry: a network, an address or a domain, and maybe a port."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    """An address (a /32 or /128) or a CIDR network."""
    domain: str | None = None
    """Lower case, without a trailing dot."""
    subdomains_only: bool = False
    """``.example.com``: names below ``domain``, not ``domain`` itself."""
    port: int | None = None
    everything: bool = False
    """``*``."""
    text: str = field(default="", compare=False)
    """The entry as written (for logs)."""

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            address = _address(host)
            return address is not None and address in self.network
        name = host.lower().rstrip(".")
        assert self.domain is not None
        if name.endswith("." + self.domain):
            return True
        return not self.subdomains_only and name == self.domain


def _rule(entry: str) -> NoProxyRule:
    """One ``NO_PROXY`` entry (see the module docstring); ``ValueError`` if it is none."""
    if entry == "*":
        return NoProxyRule(everything=True, text=entry)
    if len(entry) > MAX_ENTRY:
        raise ValueError(f"a NO_PROXY entry is longer than {MAX_ENTRY} characters")
    if "/" in entry:
        try:
            return NoProxyRule(network=ipaddress.ip_network(entry, strict=False), text=entry)
        except ValueError:
            raise ValueError(f"{entry!r} is not a network such as 10.0.0.0/8") from None
    host, port = entry, None
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r} is not [address] or [address]:port")
        host, port = inside, _port(rest[1:]) if rest else None
    elif entry.count(":") == 1:
        host, _, text = entry.partition(":")
        port = _port(text)
    address = _address(host)
    if address is not None:
        return NoProxyRule(network=ipaddress.ip_network(address), port=port, text=entry)
    if ":" in host:
        raise ValueError(f"{entry!r} is not an address, a network or a domain")
    subdomains_only = host.startswith((".", "*."))
    domain = host.removeprefix("*").lstrip(".").rstrip(".").lower()
    if not domain or not all(
        part and all(c.isascii() and (c.isalnum() or c in "-_") for c in part)
        for part in domain.split(".")
    ):
        raise ValueError(f"{entry!r} is not an address, a network or a domain")
    return NoProxyRule(domain=domain, subdomains_only=subdomains_only, port=port, text=entry)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port")
    return int(text)


def parse_no_proxy(entries: Iterable[str]) -> tuple[NoProxyRule, ...]:
    """The rules of ``NO_PROXY`` entries (each may itself be a comma-separated list; blanks
    are skipped). ``ValueError`` names the first entry that is not a rule."""
    rules: list[NoProxyRule] = []
    for entry in entries:
        for part in entry.split(","):
            text = part.strip()
            if text:
                rules.append(_rule(text))
                if len(rules) > MAX_RULES:
                    raise ValueError(f"more than {MAX_RULES} NO_PROXY entries")
    return tuple(rules)


@dataclass(frozen=True, slots=True, repr=False)
class EgressRoutes:
    """Where origin requests go: through ``https`` (for https targets) or ``http`` (for http
    targets) unless a ``no_proxy`` rule matches; direct when the proxy for the scheme is None."""

    https: str | None = None
    http: str | None = None
    no_proxy: tuple[NoProxyRule, ...] = field(default=())
    source: str = "none"
    """Where the proxies come from: ``originProxy``, ``environment`` or ``none``."""

    @classmethod
    def explicit(cls, url: str, no_proxy: Iterable[str] = ()) -> EgressRoutes:
        """``originProxy`` for every scheme, with ``originNoProxy``."""
        proxy = parse_proxy_url(url)
        return cls(proxy, proxy, parse_no_proxy(no_proxy), "originProxy")

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], no_proxy: Iterable[str] = ()
    ) -> EgressRoutes:
        """``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (upper case first, then lower case, as
        Go reads them), ``no_proxy`` (``originNoProxy``) added to ``NO_PROXY``. An empty
        variable is unset. Errors name the variable, never its value."""

        def get(name: str) -> str:
            return environ.get(name) or environ.get(name.lower()) or ""

        proxies: dict[str, str | None] = {}
        for name in ("HTTPS_PROXY", "HTTP_PROXY"):
            value = get(name).strip()
            try:
                proxies[name] = parse_proxy_url(value) if value else None
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        try:
            rules = parse_no_proxy([get("NO_PROXY"), *no_proxy])
        except ValueError as exc:
            raise ValueError(f"NO_PROXY or originNoProxy: {exc}") from None
        return cls(proxies["HTTPS_PROXY"], proxies["HTTP_PROXY"], rules, "environment")

    @property
    def active(self) -> bool:
        """Whether any request can go through a proxy at all."""
        return (self.https is not None or self.http is not None) and not any(
            rule.everything for rule in self.no_proxy
        )

    def proxy_for(self, scheme: str, host: str, port: int | None = None) -> str | None:
        """The proxy URL for a request to ``scheme://host[:port]``, or None: direct."""
        proxy = self.https if scheme == "https" else self.http if scheme == "http" else None
        if proxy is None:
            return None
        effective = port if port is not None else _DEFAULT_PORTS.get(scheme, 0)
        host = host.strip("[]")
        if any(rule.matches(host, effective) for rule in self.no_proxy):
            return None
        return proxy

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"EgressRoutes({shown})"

    def describe(self) -> dict[str, Any]:
        """For logs and status views: the proxies without credentials and the exceptions."""
        return {
            "source": self.source,
            "https_proxy": None if self.https is None else redact(self.https),
            "http_proxy": None if self.http is None else redact(self.http),
            "no_proxy": [rule.text for rule in self.no_proxy[:SHOWN_RULES]],
        }
