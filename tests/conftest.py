"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import settings

# Property tests check what parsers do, not how fast: on a loaded CI machine one example can
# take longer than hypothesis's default 200 ms deadline, which would fail an honest test.
settings.register_profile("p2p", deadline=None)
settings.load_profile("p2p")


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task waits (pytest-trio uses a fixture
    of this name as the test's clock)."""
    return trio.testing.MockClock(autojump_threshold=0)
