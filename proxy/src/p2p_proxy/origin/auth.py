"""The origin's own auth, per request, with the caller's credentials.

The first request goes out anonymously; on ``401`` :class:`OriginAuth` answers the
registry's challenge with HTTP Basic or the Docker token flow (scope
``repository:<name>:pull``) and retries. It then remembers which scheme the registry wants
and, for later requests, authenticates up front (Basic) or reuses a cached bearer token.
Tokens are cached in memory per (credentials fingerprint, scope) until shortly before they
expire, and never longer than ``token_max_age`` (the service's ``authCacheTtl``: a token
stands for a password the token server saw, and a revoked password must stop working within
that time); concurrent callers share one token fetch. Credentials and tokens are never logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import trio

from p2p_common.logs import event
from p2p_common.oci import ErrorCode, OCIError
from p2p_common.registry_auth import (
    MAX_TOKEN_RESPONSE,
    AuthSyntaxError,
    Challenge,
    Credentials,
    TokenCache,
    TokenResponse,
    basic_authorization,
    fingerprint,
    parse_token_response,
    parse_www_authenticate,
    pick_challenge,
    pull_scope,
    realm_allowed,
    token_request_url,
)
from p2p_proxy.origin.responses import failure, read_bounded

log = logging.getLogger("p2p.origin")


class Sender(Protocol):
    """Sends one request (transport failures already turned into :class:`OCIError`)."""

    async def __call__(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        authorization: str | None,
        *,
        stream: bool,
        what: str = "origin",
    ) -> httpx.Response: ...


class OriginAuth:
    """Challenge answering and token caching for one registry (see the module docstring)."""

    def __init__(
        self,
        registry_url: str,
        send: Sender,
        clock: Callable[[], float],
        *,
        token_max_age: float = math.inf,
        realm_hosts: Iterable[str] = (),
    ) -> None:
        self.registry_url = registry_url
        self._registry_host = urlsplit(registry_url).hostname or ""
        self._realm_hosts = tuple(realm_hosts)
        self._send = send
        self._clock = clock
        self._tokens = TokenCache(max_age=token_max_age)
        self._token_locks: dict[tuple[str, ...], trio.Lock] = {}
        self._challenge: Challenge | None = None

    async def authorized(
        self,
        method: str,
        url: str,
        repository: str,
        credentials: Credentials | None,
        headers: Mapping[str, str],
        *,
        stream: bool = False,
    ) -> httpx.Response:
        """Send, answering the origin's challenge; returns any response but a 401."""
        scope = pull_scope(repository)
        key = (fingerprint(credentials), scope)
        used = self._challenge  # what the pre-emptive authorization (if any) answered
        authorization, token, fetched = await self._preemptive(credentials, scope, key)
        sent_basic = authorization is not None and token is None
        while True:
            response = await self._send(method, url, headers, authorization, stream=stream)
            if response.status_code != 401:
                return response
            challenge_lines = response.headers.get_list("www-authenticate")
            await response.aclose()
            try:
                challenge = pick_challenge(parse_www_authenticate(challenge_lines))
            except AuthSyntaxError:
                raise failure("origin sent a malformed WWW-Authenticate challenge") from None
            if challenge is None:
                raise self._refused(credentials, "origin asks for an unsupported auth scheme")
            self._challenge = challenge
            if challenge.scheme == "basic":
                if credentials is None or sent_basic:
                    raise self._refused(credentials, "origin refused these credentials")
                authorization = self._basic(credentials)
                sent_basic = True
                continue
            if fetched and used is not None and _issuer(used) != _issuer(challenge):
                # The challenge we remembered is not the registry's any more (another token
                # server, another service): forget it and answer the real one.
                fetched = False
            if fetched:
                # A token fetched just now for exactly this scope, and still 401.
                if challenge.error == "invalid_token":
                    raise failure("origin rejected the token its own token server issued")
                # The token server knows these credentials but did not grant the pull.
                raise self._refused(credentials, "origin refused access", authenticated=True)
            token, fetched = await self._token(challenge, credentials, scope, key, rejected=token)
            used = challenge
            authorization = f"Bearer {token}"

    async def _preemptive(
        self, credentials: Credentials | None, scope: str, key: tuple[str, ...]
    ) -> tuple[str | None, str | None, bool]:
        """(Authorization, bearer token, token fetched just now) to send up front.

        Nothing before the origin has challenged us; then Basic, or a bearer token.
        """
        known = self._challenge
        if known is None:
            return None, None, False
        if known.scheme == "basic":
            return (None if credentials is None else self._basic(credentials)), None, False
        token, fetched = await self._token(known, credentials, scope, key, rejected=None)
        return f"Bearer {token}", token, fetched

    @staticmethod
    def _basic(credentials: Credentials) -> str:
        try:
            return basic_authorization(credentials)
        except AuthSyntaxError:
            raise OCIError(ErrorCode.UNAUTHORIZED, "credentials cannot be sent") from None

    @staticmethod
    def _refused(
        credentials: Credentials | None, message: str, *, authenticated: bool = False
    ) -> OCIError:
        """DENIED when known credentials were not enough; UNAUTHORIZED otherwise."""
        if credentials is None:
            return OCIError(ErrorCode.UNAUTHORIZED, "origin requires authentication")
        if authenticated:
            return OCIError(ErrorCode.DENIED, message)
        return OCIError(ErrorCode.UNAUTHORIZED, message)

    # --- the token flow ---------------------------------------------------------------------

    async def _token(
        self,
        challenge: Challenge,
        credentials: Credentials | None,
        scope: str,
        key: tuple[str, ...],
        *,
        rejected: str | None,
    ) -> tuple[str, bool]:
        """(bearer token, fetched just now) for ``key``: the cached one unless it was
        ``rejected``; concurrent callers share one fetch."""
        lock = self._token_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                cached = self._tokens.get(key, self._clock())
                if cached is not None and cached != rejected:
                    return cached, False
                self._tokens.discard(key)
                answer = await self._fetch_token(challenge, credentials, scope)
                self._tokens.put(key, answer, self._clock())
                return answer.token, True
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._token_locks.pop(key, None)

    async def _fetch_token(
        self, challenge: Challenge, credentials: Credentials | None, scope: str
    ) -> TokenResponse:
        """GET the token realm (with Basic credentials when we have them)."""
        realm = challenge.realm or ""
        try:
            url = token_request_url(
                realm,
                service=challenge.service,
                scopes=[scope],
                account=None if credentials is None else credentials.username,
            )
        except AuthSyntaxError:
            raise failure("origin names an unusable token realm (only http(s) URLs)") from None
        if (
            credentials is not None
            and self.registry_url.startswith("https://")
            and not url.startswith("https://")
        ):
            raise failure("origin names a plain-http token realm for an https registry")
        if credentials is not None and not realm_allowed(
            realm, self._registry_host, self._realm_hosts
        ):
            raise failure(
                f"origin names a token realm on another host ({urlsplit(realm).hostname}); "
                "credentials go there only if tokenRealmHosts lists it"
            )
        authorization = None if credentials is None else self._basic(credentials)
        response = await self._send(
            "GET", url, {}, authorization, stream=True, what="origin token server"
        )
        try:
            status = response.status_code
            event(
                log,
                "origin.token",
                logging.DEBUG,
                realm=urlsplit(url).hostname,
                scope=scope,
                status=status,
                anonymous=credentials is None,
            )
            if status == 200:
                body = await read_bounded(response, MAX_TOKEN_RESPONSE, "token response")
                try:
                    return parse_token_response(body)
                except AuthSyntaxError:
                    raise failure("origin token server sent a malformed answer") from None
            if status == 401:
                raise OCIError(
                    ErrorCode.UNAUTHORIZED, "origin token server refused these credentials"
                )
            if status == 403:
                raise OCIError(ErrorCode.DENIED, "origin token server denied access")
            if status == 429:
                raise OCIError(ErrorCode.TOOMANYREQUESTS)
            raise failure(f"origin token server answered {status}")
        finally:
            await response.aclose()


def _issuer(challenge: Challenge) -> tuple[str | None, str | None]:
    """What identifies a token server: its realm and service."""
    return challenge.realm, challenge.service
