"""Service configuration: one YAML file (the mounted ConfigMap) plus environment overrides.

Every service declares a subclass of :class:`ServiceSettings` with snake_case
fields; the file and documentation use the camelCase spelling (``downloadRate``),
the environment uses the service prefix and upper snake case
(``P2P_AGENT_DOWNLOAD_RATE``). Precedence, highest first: explicit keyword
arguments, environment, file, defaults. An unknown key, in the file or in the
environment, is an error that names it; so is a bad value.

Settings are read once, in each service's ``__main__``; a service that supports
live reload (the agent's rates) calls :meth:`ServiceSettings.load` again.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import AfterValidator, BeforeValidator, ValidationError
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from p2p_common.errors import LocalError

MAX_CONFIG_FILE_BYTES = 1024 * 1024


class ConfigError(LocalError):
    """The configuration is unusable. ``str(exc)`` is one line naming the key and the problem."""


# --- value types --------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?)([bB]?)(?:/s)?\s*\Z", re.ASCII)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: object) -> int:
    """Parse a byte count: ``1048576``, ``"100MB"`` (10^6), ``"100MiB"``/``"100Mi"`` (2^20),
    ``"20MB/s"``. Plain numbers are bytes. Negative values are refused."""
    if isinstance(value, bool):
        raise ValueError("expected a byte count, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError("a byte count must be a whole number")
        number = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size such as 1048576, 100MB, 100MiB or 20MB/s")
        digits, prefix, binary, _unit = match.groups()
        base = 1024 if binary else 1000
        # Exact decimal arithmetic: float("2.01") * 1000 is 2009.99..., and long digit
        # strings lose precision.
        number = int(Fraction(digits) * base ** _SIZE_POWERS[prefix.lower()])
    else:
        raise ValueError("expected a byte count such as 100MB")
    if number < 0:
        raise ValueError("a byte count cannot be negative")
    return number


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes (or bytes per second); accepts unit strings, see :func:`parse_size`."""

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_PLAIN_RE = re.compile(rf"^\s*({_NUMBER})\s*\Z", re.ASCII)
_DURATION_RE = re.compile(rf"^\s*(?:{_NUMBER}\s*[smhd]\s*)+\Z", re.ASCII)
_DURATION_PART_RE = re.compile(rf"({_NUMBER})\s*([smhd])", re.ASCII)
MAX_DURATION = 100 * 365 * 86400
"""The longest duration accepted (100 years): anything longer is a mistake, and bounding it
keeps sums with Unix times finite."""


def parse_duration(value: object) -> float:
    """Parse a duration into seconds: a number of seconds (``90``, ``1.5``, ``"90"``) or a
    number with a unit, ``s``, ``m``, ``h`` or ``d`` (``"90s"``, ``"30m"``, ``"12h"``,
    ``"7d"``), several of them added up (``"1h30m"``, ``"1d 12h"``). Negative, infinite and
    longer than :data:`MAX_DURATION` values are refused."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, not a boolean")
    if isinstance(value, int):
        seconds = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a duration must be finite")
        seconds = Fraction(value)
    elif isinstance(value, str):
        plain = _DURATION_PLAIN_RE.match(value)
        if plain:
            seconds = Fraction(plain.group(1))
        elif _DURATION_RE.match(value):
            seconds = sum(
                (
                    Fraction(number) * _DURATION_UNITS[unit]
                    for number, unit in _DURATION_PART_RE.findall(value)
                ),
                Fraction(0),
            )
        else:
            raise ValueError(
                f"{value!r} is not a duration such as 90 (seconds), 90s, 30m, 12h, 7d or 1h30m"
            )
    else:
        raise ValueError("expected a duration such as 30m")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"a duration cannot be longer than {MAX_DURATION // 86400}d")
    return float(seconds)


def format_duration(seconds: float) -> str:
    """``seconds`` the way :func:`parse_duration` reads it back, in the largest units:
    ``0``, ``45s``, ``1m30s``, ``7d``, ``1d2h3m4s``; a fraction of a second as ``1.5s``."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"not a duration: {seconds!r}")
    if seconds != int(seconds):
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    rest = int(seconds)
    if rest == 0:
        return "0"
    parts = []
    for unit, size in sorted(_DURATION_UNITS.items(), key=lambda item: -item[1]):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; accepts a number of seconds or unit strings such as ``30m``, see
:func:`parse_duration`."""


def split_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` into its parts, validating the port."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"{value!r} is not host:port")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return host, number


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[fd00::1]:6881``): the inverse of
    :func:`split_host_port` (and the form URLs need)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def unmapped(host: str) -> str:
    """An address as its own family spells it: an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``,
    how a dual-stack socket shows an IPv4 peer) as the IPv4 address; anything else unchanged."""
    if host[:7].lower() != "::ffff:":
        return host
    if "." in host:
        return host[7:]  # as the kernel spells it (inet_ntop)
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)


def split_listen(value: str) -> tuple[str, int]:
    """Split a listen address: ``host:port``, ``[v6]:port``, or ``:port`` (host ``""``: every
    address, IPv6 and IPv4; see :mod:`p2p_common.listen`)."""
    if value.startswith(":") and not value.startswith("::"):
        port = value[1:]
        if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not :port, host:port or [v6]:port")
        return "", int(port)
    return split_host_port(value)


def _check_host_port(value: str) -> str:
    split_host_port(value)
    return value


def _check_listen(value: str) -> str:
    split_listen(value)
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]
"""A ``host:port`` string to bind or connect to."""

ListenAddress = Annotated[str, AfterValidator(_check_listen)]
"""Where a service listens: ``:port`` (every address, both IP families where the node has
IPv6), ``[::]:port`` (the same, IPv6 socket), ``0.0.0.0:port`` (IPv4 only), an address, or a
name (each of its addresses: ``localhost`` is 127.0.0.1 and ::1)."""


class Sensitive:
    """Marks a setting whose value may hold a secret (``Annotated[..., Sensitive()]``): a
    configuration error about it never quotes the value."""


LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]


# --- sources ------------------------------------------------------------------------------------


class _MappingSource(PydanticBaseSettingsSource):
    """A settings source backed by an already-parsed mapping (camelCase keys)."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False  # pragma: no cover - unused

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_FILE_BYTES} bytes")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys to values")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"config file {path}: key {key!r} is not a string")
    return data


def _env_values(cls: type[ServiceSettings], environ: Mapping[str, str]) -> dict[str, Any]:
    prefix = cls.ENV_PREFIX
    by_env = {prefix + name.upper(): info.alias or name for name, info in cls.model_fields.items()}
    values: dict[str, Any] = {}
    for env_name, raw in environ.items():
        if not env_name.startswith(prefix):
            continue
        key = by_env.get(env_name)
        if key is None:
            raise ConfigError(f"{env_name}: not a known setting (see docs/configuration.md)")
        values[key] = _parse_env_value(raw)
    return values


def _parse_env_value(raw: str) -> Any:
    """Environment values are YAML scalars or flow collections (``[a, b]``)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


# --- the base class -----------------------------------------------------------------------------


class ServiceSettings(BaseSettings):
    """Common settings and the loading logic shared by every p2p service."""

    ENV_PREFIX: ClassVar[str] = "P2P_"

    model_config = SettingsConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
        frozen=True,
    )

    log_level: LogLevel = "info"
    """Least severe log level written to stderr."""
    log_format: LogFormat = "text"
    """``text`` for people, ``json`` for one JSON object a line."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only explicit keyword arguments; load() merges file and environment itself so
        # that it can name an unknown key precisely.
        return (init_settings,)

    @classmethod
    def load(
        cls,
        config_file: Path | str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Self:
        """Read the YAML file (if any), apply the environment, validate.

        Raises :class:`ConfigError` with a one-line message naming the bad key.
        """
        data: dict[str, Any] = {}
        source = "environment and defaults"
        if config_file is not None:
            data.update(_read_yaml_file(Path(config_file)))
            source = str(config_file)
        env = _env_values(cls, os.environ if environ is None else environ)
        data.update(env)
        # Keywords may use field names; spell them like the file and environment keys, or
        # pydantic would prefer those (by alias) over the keyword.
        fields = cls.model_fields
        keywords = {(fields[k].alias or k) if k in fields else k: v for k, v in overrides.items()}
        data.update(keywords)
        try:
            return cls(**data)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            if loc and loc[0] in env and loc[0] not in keywords:
                # Blame the environment variable, not the file it overrode.
                name = next(n for n, f in fields.items() if (f.alias or n) == loc[0])
                source = cls.ENV_PREFIX + name.upper()
            raise ConfigError(_describe(exc, source, fields)) from None

    def dump(self) -> dict[str, Any]:
        """The effective settings with file (camelCase) keys, for logs and docs."""
        return self.model_dump(mode="json", by_alias=True)


def _describe(exc: ValidationError, source: str, fields: Mapping[str, FieldInfo]) -> str:
    first = exc.errors()[0]
    loc = list(first["loc"])
    if loc and isinstance(loc[0], str) and loc[0] in fields:
        # A default that fails a check against another key is reported by its field name.
        loc[0] = fields[loc[0]].alias or loc[0]
    key = ".".join(str(part) for part in loc) or "(top level)"
    where = str(first["loc"][0]) if first["loc"] else ""
    field = next((f for n, f in fields.items() if where in (n, f.alias)), None)
    sensitive = field is not None and any(isinstance(m, Sensitive) for m in field.metadata)
    if first["type"] == "extra_forbidden":
        problem = "not a known setting (see docs/configuration.md)"
    else:
        problem = first["msg"]
        if problem.startswith("Value error, "):
            problem = problem[len("Value error, ") :]
        if "input" in first and first["type"] != "missing" and not sensitive:
            problem += f" (got {first['input']!r})"
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return f"{key}: {problem} [from {source}]{more}"


# --- shared value types for the services ---------------------------------------------------------

_REGISTRY_RE = re.compile(
    r"^(?:(https?)://)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?/?\Z", re.ASCII
)


def normalise_registry(value: str) -> str:
    """``registry.example.com`` -> ``https://registry.example.com``; keeps an explicit scheme.

    Refuses paths, credentials and anything that is not scheme://host[:port].
    """
    match = _REGISTRY_RE.match(value.strip())
    if not match:
        raise ValueError(
            f"{value!r} is not a registry such as registry.example.com or http://127.0.0.1:5000"
        )
    scheme, host, port = match.groups()
    if port is not None and not 0 < int(port) <= 65535:
        raise ValueError(f"port {port} is out of range")
    return f"{scheme or 'https'}://{host.lower()}" + (f":{port}" if port else "")


def registry_name(url: str) -> str:
    """The name containerd uses for a registry in ``?ns=``: host[:port] without the scheme."""
    return url.split("://", 1)[-1].rstrip("/")


RegistryURL = Annotated[str, AfterValidator(normalise_registry)]
"""An origin registry: ``host[:port]`` (https) or ``http(s)://host[:port]``."""


def _as_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], BeforeValidator(_as_list)]
"""A list of strings; a single comma-separated string is accepted too (handy in env vars)."""


def _registry_list(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("at least one registry is required")
    urls: list[str] = []
    names: set[str] = set()
    for value in values:
        url = normalise_registry(value)
        name = registry_name(url)
        if name in names:
            raise ValueError(f"registry {name} is listed twice")
        names.add(name)
        urls.append(url)
    return urls


RegistryList = Annotated[StrList, AfterValidator(_registry_list)]
"""One registry or a list (first = default), normalised, no host[:port] twice."""
