"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import pytest
import trio
import trio.testing


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task waits (pytest-trio uses a fixture
    of this name as the test's clock)."""
    return trio.testing.MockClock(autojump_threshold=0)
