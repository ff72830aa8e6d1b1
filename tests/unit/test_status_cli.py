"""The ``status`` commands' shared front (p2p_common.status_cli.command): where ``--config``
leads, what a bad config file and an unreachable service answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2p_agent.status_cli import main as agent_status
from p2p_common.status_cli import local_url
from p2p_proxy.status_cli import main as proxy_status
from tests.realparts.registry import free_port


def test_local_url_reaches_a_wildcard_listener_on_loopback() -> None:
    assert local_url("0.0.0.0:5014") == "http://127.0.0.1:5014"
    assert local_url("[::]:5005", scheme="https") == "https://127.0.0.1:5005"
    assert local_url(":5004") == "http://127.0.0.1:5004"
    assert local_url("10.0.0.7:5005") == "http://10.0.0.7:5005"


def test_the_agent_is_found_from_its_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there: the error names the URL it tried
    config = tmp_path / "agent.yaml"
    config.write_text(f"metricsListen: 0.0.0.0:{port}\nregistry: [registry.example]\n")
    assert agent_status(["--config", str(config), "--json"]) == 1
    assert f"cannot read http://127.0.0.1:{port}/status" in capsys.readouterr().err


def test_the_proxy_is_found_from_its_config_file_over_https_when_it_serves_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    (tmp_path / "tls.crt").write_text("not read by the status command\n")
    (tmp_path / "tls.key").write_text("not read by the status command\n")
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"listen: 0.0.0.0:{port}\nregistry: [registry.example]\n"
        f"tlsCertFile: {tmp_path / 'tls.crt'}\ntlsKeyFile: {tmp_path / 'tls.key'}\n"
    )
    assert proxy_status(["--config", str(config), "--json", "--insecure"]) == 1
    assert f"cannot read https://127.0.0.1:{port}/status" in capsys.readouterr().err


def test_a_bad_config_file_names_the_bad_key_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("registry: [registry.example]\ndownloadRate: fast\n")
    assert agent_status(["--config", str(config), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2p-agent status: configuration error:")
    assert "downloadRate" in err


def test_url_wins_over_config_and_loses_its_trailing_slash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    missing = tmp_path / "never-read.yaml"
    assert proxy_status(["--url", f"http://127.0.0.1:{port}/", "--config", str(missing)]) == 1
    assert f"cannot read http://127.0.0.1:{port}/status:" in capsys.readouterr().err
