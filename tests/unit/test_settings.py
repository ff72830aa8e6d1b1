"""Service settings (p2p_common.settings): file + environment, precise errors, value types."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import Field, ValidationError

from p2p_common.errors import LocalError
from p2p_common.settings import (
    MAX_CONFIG_FILE_BYTES,
    ByteSize,
    ConfigError,
    HostPort,
    RegistryURL,
    ServiceSettings,
    StrList,
    normalise_registry,
    parse_size,
    registry_name,
    split_host_port,
)


class DemoSettings(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_DEMO_"

    download_rate: ByteSize = 0
    listen: HostPort = "127.0.0.1:5004"
    registry: RegistryURL = "registry-1.docker.io"
    mirrors: StrList = Field(default_factory=list)
    max_peers: int = Field(50, ge=1)


class OtherSettings(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_OTHER_"

    name: str = "other"


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def load_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        DemoSettings.load(*args, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- loading and precedence ----------------------------------------------------------------------


def test_defaults_apply_and_are_validated() -> None:
    settings = DemoSettings.load(environ={})
    assert settings.download_rate == 0
    assert settings.registry == "https://registry-1.docker.io"
    assert settings.mirrors == []
    assert settings.log_level == "info"
    assert settings.log_format == "text"


def test_file_keys_are_camel_case(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "downloadRate: 100MB\nmaxPeers: 7\nlogLevel: debug\nmirrors: [a.example, b.example]\n",
    )
    settings = DemoSettings.load(path, environ={})
    assert settings.download_rate == 100 * 10**6
    assert settings.max_peers == 7
    assert settings.log_level == "debug"
    assert settings.mirrors == ["a.example", "b.example"]


def test_environment_overrides_the_file_and_keywords_override_both(tmp_path: Path) -> None:
    path = config(tmp_path, "downloadRate: 100MB\nmaxPeers: 7\nlisten: 'a:1'\n")
    environ = {"P2P_DEMO_DOWNLOAD_RATE": "20MiB", "P2P_DEMO_MAX_PEERS": "9"}
    settings = DemoSettings.load(path, environ=environ)
    assert settings.download_rate == 20 * 2**20
    assert settings.max_peers == 9
    assert settings.listen == "a:1"  # only in the file
    assert DemoSettings.load(path, environ=environ, max_peers=11).max_peers == 11
    assert DemoSettings.load(path, environ=environ, maxPeers=12).max_peers == 12


def test_the_process_environment_is_read_when_none_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("P2P_DEMO_MAX_PEERS", "3")
    assert DemoSettings.load().max_peers == 3


def test_variables_with_other_prefixes_are_ignored() -> None:
    environ = {"P2P_OTHER_NAME": "x", "PATH": "/bin", "P2P_DEMOX": "1", "p2p_demo_max_peers": "2"}
    assert DemoSettings.load(environ=environ).max_peers == 50


def test_comma_separated_lists_from_the_environment() -> None:
    settings = DemoSettings.load(environ={"P2P_DEMO_MIRRORS": "a.example, b.example,,c.example"})
    assert settings.mirrors == ["a.example", "b.example", "c.example"]
    flow = DemoSettings.load(environ={"P2P_DEMO_MIRRORS": "[x.example, y.example]"})
    assert flow.mirrors == ["x.example", "y.example"]


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    assert DemoSettings.load(config(tmp_path, ""), environ={}) == DemoSettings.load(environ={})


def test_dump_uses_the_file_spelling(tmp_path: Path) -> None:
    dumped = DemoSettings.load(config(tmp_path, "downloadRate: 1KiB\n"), environ={}).dump()
    assert dumped["downloadRate"] == 1024
    assert dumped["maxPeers"] == 50
    assert "download_rate" not in dumped


def test_settings_are_frozen() -> None:
    settings = DemoSettings.load(environ={})
    with pytest.raises(ValidationError):
        settings.max_peers = 2  # type: ignore[misc]


# --- errors name the key -------------------------------------------------------------------------


def test_an_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    path = config(tmp_path, "downloadRat: 100MB\n")
    message = load_error(path, environ={})
    assert message.startswith("downloadRat:")
    assert "not a known setting" in message
    assert str(path) in message


def test_an_unknown_environment_variable_is_named() -> None:
    message = load_error(environ={"P2P_DEMO_DOWNLOAD_RAT": "1"})
    assert "P2P_DEMO_DOWNLOAD_RAT" in message
    assert "not a known setting" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("downloadRate: fast\n", "downloadRate"),
        ("downloadRate: -5\n", "downloadRate"),
        ("maxPeers: 0\n", "maxPeers"),
        ("maxPeers: many\n", "maxPeers"),
        ("listen: 'h:99999'\n", "listen"),
        ("listen: nohost\n", "listen"),
        ("registry: 'https://r.example/v2'\n", "registry"),
        ("logLevel: verbose\n", "logLevel"),
        ("logFormat: xml\n", "logFormat"),
    ],
)
def test_a_bad_value_in_the_file_is_named_with_the_file(
    tmp_path: Path, text: str, key: str
) -> None:
    path = config(tmp_path, text)
    message = load_error(path, environ={})
    assert message.startswith(f"{key}:")
    assert str(path) in message


def test_a_bad_value_from_the_environment_blames_the_variable_not_the_file(
    tmp_path: Path,
) -> None:
    path = config(tmp_path, "maxPeers: 4\n")
    message = load_error(path, environ={"P2P_DEMO_MAX_PEERS": "lots"})
    assert message.startswith("maxPeers:")
    assert "P2P_DEMO_MAX_PEERS" in message
    assert str(path) not in message
    assert "'lots'" in message


def test_several_problems_are_counted(tmp_path: Path) -> None:
    message = load_error(config(tmp_path, "maxPeers: 0\nlogLevel: loud\n"), environ={})
    assert "1 more problem" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    assert "mapping" in load_error(config(tmp_path, text), environ={})


def test_invalid_yaml_is_refused_with_its_line(tmp_path: Path) -> None:
    message = load_error(config(tmp_path, "logLevel: info\nbad: [unclosed\n"), environ={})
    assert "not valid YAML" in message
    assert "line" in message


def test_a_non_string_key_is_refused(tmp_path: Path) -> None:
    assert "not a string" in load_error(config(tmp_path, "1: 2\n"), environ={})


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(missing) in load_error(missing, environ={})


def test_a_directory_is_an_unreadable_config_file(tmp_path: Path) -> None:
    assert str(tmp_path) in load_error(tmp_path, environ={})


def test_a_path_through_a_file_is_a_config_error(tmp_path: Path) -> None:
    """An OS error while opening (here ENOTDIR, which root gets too) names the file."""
    blocker = config(tmp_path, "maxPeers: 2\n")
    path = blocker / "agent.yaml"
    assert str(path) in load_error(path, environ={})


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = config(tmp_path, "# " + "x" * MAX_CONFIG_FILE_BYTES + "\n")
    assert "larger than" in load_error(path, environ={})


def test_config_error_is_a_local_error() -> None:
    assert issubclass(ConfigError, LocalError)


def test_each_service_only_reads_its_own_prefix() -> None:
    assert OtherSettings.load(environ={"P2P_DEMO_MAX_PEERS": "2"}).name == "other"
    with pytest.raises(ConfigError, match="P2P_OTHER_MAX_PEERS"):
        OtherSettings.load(environ={"P2P_OTHER_MAX_PEERS": "2"})


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1048576, 1048576),
        (2.0, 2),
        ("1048576", 1048576),
        ("100MB", 100 * 10**6),
        ("100MiB", 100 * 2**20),
        ("100Mi", 100 * 2**20),
        ("20MB/s", 20 * 10**6),
        ("20MiB/s", 20 * 2**20),
        ("1k", 1000),
        ("1KiB", 1024),
        ("3T", 3 * 10**12),
        ("2GiB", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2.01KB", 2010),
        (" 7 MB ", 7 * 10**6),
        ("12345678901234567891", 12345678901234567891),
    ],
)
def test_parse_size_accepts_decimal_and_binary_units(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    [-1, "-1MB", "fast", "", "MB", "1e3", "1 PB", "1.5.0MB", 1.5, True, None, [1], "10 MB/h"],
)
def test_parse_size_refuses_negative_fractional_and_malformed_sizes(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


# --- host:port -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:5004", ("127.0.0.1", 5004)),
        ("0.0.0.0:6969", ("0.0.0.0", 6969)),
        ("tracker.p2p.svc:6969", ("tracker.p2p.svc", 6969)),
        ("[::1]:80", ("::1", 80)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
        ("host:0", ("host", 0)),
    ],
)
def test_split_host_port(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value) == expected


@pytest.mark.parametrize(
    "value",
    ["host", "host:", ":80", "host:65536", "host:-1", "host:+1", "host:http", "[::1]", "[::1]:",
     "[::1]80", "[]:80", ""],
)  # fmt: skip
def test_split_host_port_refuses_malformed_addresses(value: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(value)


# --- registries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("registry.example.com", "https://registry.example.com"),
        ("Registry.Example.COM", "https://registry.example.com"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://r.example/", "https://r.example"),
        ("r.example:8443", "https://r.example:8443"),
        ("[::1]:5000", "https://[::1]:5000"),
        ("  r.example  ", "https://r.example"),
    ],
)
def test_normalise_registry_defaults_to_https(value: str, expected: str) -> None:
    assert normalise_registry(value) == expected


@pytest.mark.parametrize(
    "value",
    ["https://user:pass@r.example", "user@r.example", "r.example/library", "http://r.example/v2/",
     "ftp://r.example", "r.example:0", "r.example:70000", "", "https://", "r.example?x=1",
     "r example"],
)  # fmt: skip
def test_normalise_registry_refuses_paths_credentials_and_other_schemes(value: str) -> None:
    with pytest.raises(ValueError):
        normalise_registry(value)


def test_registry_name_drops_the_scheme() -> None:
    assert registry_name("https://r.example:5000") == "r.example:5000"
    assert registry_name("r.example") == "r.example"


# --- property-based: the value parsers --------------------------------------------------------

_UNITS = {
    "": 1,
    "B": 1,
    "k": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "Ki": 2**10,
    "MiB": 2**20,
    "Gi": 2**30,
    "TiB": 2**40,
}


@given(st.text(max_size=30))
@example("\u0663MB")  # ARABIC-INDIC DIGIT THREE: a digit to Python, not a size
def test_parse_size_gives_a_count_or_a_value_error(text: str) -> None:
    try:
        number = parse_size(text)
    except ValueError:
        return
    assert isinstance(number, int)
    assert number >= 0
    assert text.strip()[0].isascii()  # only ASCII digits are numbers here


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(sorted(_UNITS)),
    st.booleans(),
    st.sampled_from(["", " "]),
)
def test_parse_size_multiplies_by_the_unit(
    number: int, unit: str, per_second: bool, gap: str
) -> None:
    text = f"{number}{gap}{unit}" + ("/s" if per_second and unit else "")
    assert parse_size(text) == number * _UNITS[unit]
    assert parse_size(number) == number


@given(st.text(max_size=40))
@example("host:\u0663")
def test_split_host_port_gives_a_pair_or_a_value_error(text: str) -> None:
    try:
        host, port = split_host_port(text)
    except ValueError:
        return
    assert host
    assert 0 <= port <= 65535
    assert text.endswith(f":{text.rsplit(':', 1)[1]}")
    assert text.rsplit(":", 1)[1].isascii()


_HOST = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True)


@given(_HOST, st.integers(min_value=0, max_value=65535))
def test_split_host_port_round_trips(host: str, port: int) -> None:
    assert split_host_port(f"{host}:{port}") == (host, port)
    assert split_host_port(f"[fd00::{port % 100}]:{port}") == (f"fd00::{port % 100}", port)


@given(st.text(max_size=60))
@example("http://host:\u0663")
def test_normalise_registry_is_a_url_or_a_value_error_and_idempotent(text: str) -> None:
    try:
        url = normalise_registry(text)
    except ValueError:
        return
    scheme, _, rest = url.partition("://")
    assert scheme in ("http", "https")
    assert "/" not in rest
    assert "@" not in rest
    assert rest.isascii()
    assert normalise_registry(url) == url
    assert registry_name(url) == rest


@given(_HOST, st.one_of(st.none(), st.integers(min_value=1, max_value=65535)), st.booleans())
def test_normalise_registry_keeps_host_and_port(host: str, port: int | None, http: bool) -> None:
    spelled = ("http://" if http else "") + host + (f":{port}" if port else "")
    url = normalise_registry(spelled)
    assert url == ("http" if http else "https") + "://" + host + (f":{port}" if port else "")
