"""The agent's configuration rules that protect the node."""

from __future__ import annotations

import pytest

from p2p_agent.settings import AgentSettings
from p2p_common.settings import ConfigError


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:5004", "127.0.0.9:15004", "[::1]:5004", "localhost:5004"]
)
def test_the_registry_api_may_listen_on_loopback(listen: str) -> None:
    settings = AgentSettings.load(environ={}, registry="registry.example.com", listen=listen)
    assert settings.listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:5004", "10.1.2.3:5004", "[::]:5004", "node1:5004"])
def test_the_registry_api_refuses_anything_but_loopback(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^listen: .*not a loopback address"):
        AgentSettings.load(environ={}, registry="registry.example.com", listen=listen)


def test_the_environment_cannot_open_the_registry_api_either() -> None:
    with pytest.raises(ConfigError, match="P2P_AGENT_LISTEN"):
        AgentSettings.load(
            environ={"P2P_AGENT_LISTEN": "0.0.0.0:5004", "P2P_AGENT_REGISTRY": "r.example.com"}
        )
