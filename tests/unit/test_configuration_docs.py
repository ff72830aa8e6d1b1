"""docs/configuration.md documents every setting of every service, and nothing that is not one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2p_agent.settings import AgentSettings
from p2p_common.settings import ServiceSettings
from p2p_proxy.settings import ProxySettings
from p2p_tracker.settings import TrackerSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def documented(heading: str) -> set[str]:
    """The keys in the first column of the tables in the section ``## heading...`` (a row may
    name several: `` `tlsCertFile`, `tlsKeyFile` ``)."""
    text = DOC.read_text()
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else None]
    keys: set[str] = set()
    for cell in re.findall(r"^\| ((?:`[A-Za-z0-9]+`(?:, )?)+) \|", section, re.MULTILINE):
        keys.update(re.findall(r"`([A-Za-z0-9]+)`", cell))
    return keys


@pytest.mark.parametrize(
    ("heading", "settings"),
    [("p2p-tracker", TrackerSettings), ("p2p-proxy", ProxySettings), ("p2p-agent", AgentSettings)],
)
def test_every_setting_has_a_row_and_every_row_is_a_setting(
    heading: str, settings: type[ServiceSettings]
) -> None:
    keys = {info.alias or name for name, info in settings.model_fields.items()}
    rows = documented(heading)
    assert keys - rows == set(), f"settings of {heading} missing in docs/configuration.md"
    assert rows - keys == set(), f"rows of {heading} in docs/configuration.md that are no setting"
