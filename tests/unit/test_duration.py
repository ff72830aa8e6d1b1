"""The Duration setting type (p2p_common.settings.parse_duration): examples, errors, properties."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from p2p_common.settings import (
    MAX_DURATION,
    ConfigError,
    Duration,
    ServiceSettings,
    format_duration,
    parse_duration,
)

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Timed(ServiceSettings):
    ENV_PREFIX: ClassVar[str] = "P2P_TIMED_"

    max_unused: Duration = 0.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (90, 90.0),
        (1.5, 1.5),
        ("90", 90.0),
        ("2.5", 2.5),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 604800.0),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        ("1d 12h", 129600.0),
        ("30m1h", 5400.0),
        (" 2 d ", 172800.0),
        ("0s", 0.0),
    ],
)
def test_a_duration_is_seconds_or_a_number_with_a_unit(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "cannot be negative"),
        (-0.5, "cannot be negative"),
        ("-1s", "is not a duration"),
        ("soon", "is not a duration"),
        ("", "is not a duration"),
        ("s", "is not a duration"),
        ("7 days", "is not a duration"),
        ("1e3", "is not a duration"),
        ("12H", "is not a duration"),
        ("1w", "is not a duration"),
        ("1h-30m", "is not a duration"),
        ("\u0663d", "is not a duration"),  # ARABIC-INDIC DIGIT THREE is a digit to Python only
        (True, "not a boolean"),
        (math.inf, "finite"),
        (math.nan, "finite"),
        (None, "expected a duration"),
        ([1], "expected a duration"),
        (MAX_DURATION + 1, "longer than 36500d"),
        ("36501d", "longer than 36500d"),
        (10**400, "longer than"),
    ],
)
def test_a_bad_duration_is_refused_saying_why(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_a_bad_duration_in_a_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("maxUnused: 3 weeks\n")
    with pytest.raises(ConfigError, match=r"^maxUnused: '3 weeks' is not a duration .*\[from "):
        Timed.load(path, environ={})


def test_a_duration_from_the_environment_names_the_variable() -> None:
    assert Timed.load(environ={"P2P_TIMED_MAX_UNUSED": "12h"}).max_unused == 43200.0
    assert Timed.load(environ={"P2P_TIMED_MAX_UNUSED": "90"}).max_unused == 90.0
    with pytest.raises(ConfigError, match="P2P_TIMED_MAX_UNUSED"):
        Timed.load(environ={"P2P_TIMED_MAX_UNUSED": "-5m"})


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0"), (45, "45s"), (90, "1m30s"), (3600, "1h"), (604800, "7d"), (93784, "1d2h3m4s")],
)
def test_format_duration_uses_the_largest_units(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- properties -----------------------------------------------------------------------------------


@given(st.text(max_size=30))
@example("1\u0663s")
@example("9" * 40 + "d")
def test_any_text_is_a_duration_or_a_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert isinstance(seconds, float)
    assert 0 <= seconds <= MAX_DURATION
    assert text.isascii()


@given(
    st.integers(0, MAX_DURATION // 86400),
    st.sampled_from(sorted(UNITS)),
    st.sampled_from(["", " "]),
)
def test_a_number_with_a_unit_is_multiplied_by_it(number: int, unit: str, gap: str) -> None:
    assert parse_duration(f"{number}{gap}{unit}") == number * UNITS[unit]
    assert parse_duration(str(number)) == number
    assert parse_duration(number) == number


@given(st.lists(st.tuples(st.integers(0, 999), st.sampled_from(sorted(UNITS))), min_size=1))
def test_parts_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    expected = sum(n * UNITS[u] for n, u in parts)
    if expected > MAX_DURATION:
        with pytest.raises(ValueError):
            parse_duration(text)
    else:
        assert parse_duration(text) == expected


@given(st.integers(0, MAX_DURATION))
def test_formatted_whole_seconds_read_back_the_same(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text


@given(st.floats(0, MAX_DURATION, allow_nan=False))
def test_numbers_of_seconds_are_taken_as_they_are(seconds: float) -> None:
    assert parse_duration(seconds) == seconds
