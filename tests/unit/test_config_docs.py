"""docs/configuration.md documents every setting of every service, and no setting that is gone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from p2p_agent.settings import AgentSettings
from p2p_common.settings import ServiceSettings
from p2p_proxy.settings import ProxySettings
from p2p_tracker.settings import TrackerSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_ROW = re.compile(r"^\| ((?:`[A-Za-z]+`(?:, )?)+) \|", re.MULTILINE)


def documented(service: str) -> set[str]:
    """The keys in the first column of the table of ``## <service>``."""
    text = DOC.read_text(encoding="utf-8")
    (section,) = [s for s in re.split(r"^## ", text, flags=re.MULTILINE) if s.startswith(service)]
    return {key for cell in _ROW.findall(section) for key in re.findall(r"`([A-Za-z]+)`", cell)}


@pytest.mark.parametrize(
    ("service", "settings"),
    [("p2p-agent", AgentSettings), ("p2p-proxy", ProxySettings), ("p2p-tracker", TrackerSettings)],
)
def test_every_key_is_documented(service: str, settings: type[ServiceSettings]) -> None:
    keys = {field.alias or name for name, field in settings.model_fields.items()}
    assert documented(service) == keys
