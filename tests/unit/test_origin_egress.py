"""Which origin requests go through the egress proxy: NO_PROXY rules (Go's), proxy URLs and their
redaction, the environment (p2p_proxy.origin.egress)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p_common.settings import ConfigError
from p2p_proxy.origin.egress import EgressRoutes, parse_no_proxy, parse_proxy_url, redact
from p2p_proxy.settings import ProxySettings

PROXY = "http://u:pw@proxy.corp:3128"

labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-") and not s.isdigit()
)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
ports = st.integers(1, 65535)


def routes(*no_proxy: str) -> EgressRoutes:
    return EgressRoutes.explicit(PROXY, no_proxy)


def test_without_exceptions_every_origin_request_goes_through_it() -> None:
    r = routes()
    assert r.proxy_for("https", "registry.example.com") == PROXY
    assert r.proxy_for("http", "10.0.0.1", 5000) == PROXY
    assert r.proxy_for("ftp", "x") is None
    assert r.active


@pytest.mark.parametrize(
    ("rule", "host", "port", "direct"),
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "registry.example.com", 443, True),
        ("example.com", "REGISTRY.Example.COM.", 443, True),
        ("example.com", "notexample.com", 443, False),
        (".example.com", "example.com", 443, False),
        (".example.com", "a.example.com", 443, True),
        ("*.example.com", "example.com", 443, False),
        ("*.example.com", "a.b.example.com", 443, True),
        ("example.com:5000", "example.com", 5000, True),
        ("example.com:5000", "example.com", 443, False),
        ("10.1.2.3", "10.1.2.3", 443, True),
        ("10.1.2.3", "10.1.2.4", 443, False),
        ("10.1.2.3:5000", "10.1.2.3", 5000, True),
        ("10.1.2.3:5000", "10.1.2.3", 5001, False),
        ("10.0.0.0/8", "10.200.0.1", 443, True),
        ("10.0.0.0/8", "11.0.0.1", 443, False),
        ("10.0.0.0/8", "::ffff:10.0.0.1", 443, True),
        ("fd00::/8", "fd12::1", 443, True),
        ("fd00::1", "[fd00::1]", 443, True),
        ("[fd00::1]", "fd00::1", 443, True),
        ("[fd00::1]:5000", "fd00::1", 5000, True),
        ("[fd00::1]:5000", "fd00::1", 443, False),
        ("*", "anything.at.all", 1, True),
        ("10.1.2.3", "registry.example.com", 443, False),  # names are never resolved
    ],
)
def test_no_proxy_rules(rule: str, host: str, port: int, direct: bool) -> None:
    assert (routes(rule).proxy_for("https", host, port) is None) is direct


def test_the_default_port_is_the_scheme_s() -> None:
    assert routes("h:443").proxy_for("https", "h") is None
    assert routes("h:443").proxy_for("http", "h") == PROXY
    assert routes("h:80").proxy_for("http", "h") is None


def test_star_turns_the_proxy_off() -> None:
    assert not routes("a.b, *").active


@pytest.mark.parametrize(
    "entry",
    ["a..b", "exa mple.com", "10.0.0.0/33", "[fd00::1", "[::1]x", "h:0", "h:99999", "a:b:c"],
)
def test_entries_that_are_no_rule_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not"):
        parse_no_proxy([entry])


@given(domains, st.lists(labels, max_size=3), ports)
def test_a_domain_covers_itself_and_every_name_below_it(
    domain: str, below: list[str], port: int
) -> None:
    host = ".".join([*below, domain])
    assert routes(domain).proxy_for("https", host, port) is None
    dotted = routes("." + domain).proxy_for("https", host, port)
    assert (dotted is None) is bool(below)
    assert routes(f"{domain}:{port}").proxy_for("https", host, port) is None
    assert routes("x" + domain).proxy_for("https", domain, port) == PROXY


@given(st.ip_addresses(), st.integers(0, 128), st.ip_addresses())
def test_a_network_covers_exactly_its_addresses(
    base: ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefix: int,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    network = ipaddress.ip_network(f"{base}/{min(prefix, base.max_prefixlen)}", strict=False)
    host = f"[{address}]" if address.version == 6 else str(address)
    direct = routes(str(network)).proxy_for("https", host, 443) is None
    mapped = getattr(address, "ipv4_mapped", None)
    assert direct is ((mapped or address) in network)


@given(st.text(max_size=60))
def test_any_text_is_rules_or_a_value_error(text: str) -> None:
    try:
        rules = parse_no_proxy([text])
    except ValueError:
        return
    for rule in rules:
        rule.matches("example.com", 443)


@given(
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789%._~-!$&'()*+,;=", min_size=1),
    st.text("KLMNOPQRSTUVWXYZ0123456789%._~-!$&'()*+,;=", min_size=4),
)
def test_a_redacted_proxy_url_holds_no_credentials(user: str, password: str) -> None:
    url = f"http://{user}:{password}@proxy.corp:3128"
    shown = redact(url)
    assert shown == "http://***@proxy.corp:3128"
    assert password not in shown
    assert redact("http://proxy.corp:3128") == "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("proxy.corp:3128", "http://proxy.corp:3128"),
        ("http://u:p@proxy.corp:3128/", "http://u:p@proxy.corp:3128"),
        ("https://[fd00::1]:3128", "https://[fd00::1]:3128"),
    ],
)
def test_proxy_urls(value: str, expected: str) -> None:
    assert parse_proxy_url(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "socks5://u:secret9@h:1080",
        "http://u:secret9@h:3128/path",
        "http://u:secret9@h:x",
        "http://",
    ],
)
def test_bad_proxy_urls_are_refused_without_quoting_them(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_proxy_url(value)
    assert "secret9" not in str(caught.value)


def test_the_environment_names_a_proxy_per_scheme() -> None:
    env = {
        "HTTPS_PROXY": "http://a:1",
        "https_proxy": "http://ignored:1",
        "http_proxy": "http://b:2",
        "no_proxy": "internal.corp, 10.0.0.0/8",
    }
    r = EgressRoutes.from_environment(env, ["registry.local"])
    assert r.proxy_for("https", "docker.io") == "http://a:1"
    assert r.proxy_for("http", "docker.io") == "http://b:2"
    assert r.proxy_for("https", "x.internal.corp") is None
    assert r.proxy_for("https", "10.9.9.9") is None
    assert r.proxy_for("https", "registry.local") is None
    assert r.source == "environment"
    empty = EgressRoutes.from_environment({"HTTPS_PROXY": ""})
    assert not empty.active


def test_a_bad_variable_is_named_not_quoted() -> None:
    with pytest.raises(ValueError, match=r"^HTTPS_PROXY: ") as caught:
        EgressRoutes.from_environment({"HTTPS_PROXY": "ftp://u:secret9@h"})
    assert "secret9" not in str(caught.value)


def test_the_routes_show_no_credentials() -> None:
    r = routes("a.b")
    for text in (repr(r), str(r.describe())):
        assert "pw" not in text.replace("proxy", "")
        assert "***@proxy.corp:3128" in text


def test_settings_keep_the_proxy_url_secret() -> None:
    settings = ProxySettings.load(
        None,
        environ={"P2P_PROXY_ORIGIN_PROXY": "http://user:secret9@proxy.corp:3128"},
        registry="registry.example.com",
        origin_no_proxy="a.b, 10.0.0.0/8",
    )
    assert settings.dump()["originProxy"] == "http://***@proxy.corp:3128"
    assert "secret9" not in repr(settings)
    assert "secret9" not in str(settings.dump())
    egress = settings.egress_routes({"HTTPS_PROXY": "http://not-read:1"})
    assert egress is not None
    assert egress.proxy_for("https", "docker.io") == "http://user:secret9@proxy.corp:3128"
    assert egress.proxy_for("https", "a.b") is None
    assert ProxySettings.load(None, environ={}, registry="r", origin_proxy="").origin_proxy is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"origin_proxy": "socks5://user:secret9@proxy:1080"},
        {"origin_proxy": "http://user:secret9@proxy:3128/x"},
        {"origin_proxy": "http://user:secret9@proxy:3128", "origin_proxy_from_env": True},
        {"origin_no_proxy": "a..b"},
    ],
)
def test_bad_proxy_settings_stop_the_start_naming_the_key(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"^origin(Proxy|ProxyFromEnv|NoProxy): ") as caught:
        ProxySettings.load(None, environ={}, registry="r", **overrides)
    assert "secret9" not in str(caught.value)


def test_the_environment_is_read_only_with_origin_proxy_from_env() -> None:
    env = {"HTTPS_PROXY": "http://proxy.corp:3128"}
    off = ProxySettings.load(None, environ={}, registry="r")
    assert off.egress_routes(env) is None
    on = ProxySettings.load(None, environ={}, registry="r", origin_proxy_from_env=True)
    egress = on.egress_routes(env)
    assert egress is not None
    assert egress.proxy_for("https", "r") == "http://proxy.corp:3128"
    with pytest.raises(ConfigError, match=r"^originProxyFromEnv: HTTPS_PROXY: "):
        on.egress_routes({"HTTPS_PROXY": "ftp://x"})
