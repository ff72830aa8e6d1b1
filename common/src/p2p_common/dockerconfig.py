"""Registry logins for the command-line tools: a Docker config file, or the environment.

``p2p-proxy preheat`` and ``p2p-agent prefetch`` take credentials from ``P2P_PREHEAT_USERNAME``
and ``P2P_PREHEAT_PASSWORD``, else from the registry's entry in a Docker config file
(``--docker-config``, ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``: what
``docker login`` writes, and what a ``kubernetes.io/dockerconfigjson`` Secret holds), never
from the command line.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from p2p_common.registry_auth import AuthSyntaxError, Credentials, basic_authorization

__all__ = ["UsageError", "authorization", "credentials", "docker_config_path", "split_image"]


class UsageError(Exception):
    """A bad command line or credentials file (exit code 2)."""


def split_image(image: str) -> tuple[str | None, str]:
    """(registry host[:port] or None for the proxy's default, the rest: ``name[:tag|@digest]``)."""
    first, slash, rest = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, image


def docker_config_path(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("DOCKER_CONFIG"):
        return Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    return Path.home() / ".docker" / "config.json"


def credentials(registry: str | None, config: Path) -> tuple[str, str] | None:
    """(user, password) from the environment or the Docker config's entry for ``registry``."""
    user, password = os.environ.get("P2P_PREHEAT_USERNAME"), os.environ.get("P2P_PREHEAT_PASSWORD")
    if user is not None and password is not None:
        return user, password
    if registry is None or not config.is_file():
        return None
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config}: not a readable Docker config file ({exc})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                raw = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise UsageError(
                    f"{config}: the auth of {key} is not base64 user:password"
                ) from None
            name, colon, secret = raw.partition(":")
            if colon:
                return name, secret
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


def authorization(registry: str | None, config: Path) -> str | None:
    """The ``Authorization`` header (HTTP Basic) for :func:`credentials`, or None without a
    login; a login HTTP Basic cannot carry (a ``:`` in the username, control characters) is
    a :class:`UsageError` here, before anything is sent."""
    login = credentials(registry, config)
    if login is None:
        return None
    try:
        return basic_authorization(Credentials(*login))
    except AuthSyntaxError as exc:
        raise UsageError(f"the login for {registry or 'the default registry'}: {exc}") from None
