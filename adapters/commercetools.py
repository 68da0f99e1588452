"""The commercetools HTTP API client: an OAuth client-credentials token manager and the calls ctsync makes.

``CommercetoolsClient`` reads the project, manages Subscriptions and pages through resources. Every request
carries a token from ``TokenManager``, which fetches one from ``<CTP_AUTH_URL>/oauth/token``, caches it and
refreshes it well before it expires, one refresh at a time however many callers wait for it. A 401
``invalid_token`` (a token revoked or expired early) refreshes once and retries; 502/503 (and 429, which
commercetools does not document but a proxy may send) are retried with capped exponential backoff and jitter,
as are connection failures of reads. What still fails raises ``CommercetoolsError`` carrying the status, the
commercetools error codes and the correlation id; the client secret and tokens never appear in a message.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import httpx
import orjson
from pydantic import SecretStr

from adapters._text import USER_AGENT, Secret, one_line
from consumer.audit import redact
from consumer.retry import backoff_delay as backoff

DEFAULT_TIMEOUT: Final = 30.0
# Retry budget for 502/503/429 and connection failures: about 10 s of waiting in all with the defaults.
DEFAULT_ATTEMPTS: Final = 5
DEFAULT_BACKOFF_BASE: Final = 0.5
DEFAULT_BACKOFF_CAP: Final = 8.0
# A token is refreshed once this share of its lifetime has passed: with commercetools' default 172800 s that
# is a day early, so a slow refresh or a skewed clock never leaves a caller holding an expired token.
REFRESH_AT_SHARE: Final = 0.5
_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
_MESSAGE_LIMIT: Final = 300
_CORRELATION_HEADER: Final = "X-Correlation-ID"


@dataclass(frozen=True, slots=True)
class CommercetoolsOptions:
    """The project and the API client that reads it: URLs of its region, credentials, scopes."""

    project_key: str
    api_url: str
    auth_url: str
    client_id: str
    client_secret: SecretStr
    scopes: tuple[str, ...] = ()


class CommercetoolsError(Exception):
    """A commercetools request that failed for good.

    ``status`` is None when no response arrived (connection failure, timeout); ``codes`` are the ``code`` of
    each entry in the response's ``errors`` (``invalid_client``, ``insufficient_scope``, ``ResourceNotFound``,
    ``ConcurrentModification`` ...). The message names the request and never holds a secret.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        codes: Sequence[str] = (),
        correlation_id: str | None = None,
        method: str = "",
        path: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.codes = tuple(codes)
        self.correlation_id = correlation_id
        self.method = method
        self.path = path

    def __str__(self) -> str:
        parts = [f"{self.method} {self.path}".strip()]
        parts.append(f"HTTP {self.status}" if self.status is not None else "no response")
        if self.codes:
            parts.append(", ".join(self.codes))
        text = ": ".join(p for p in parts if p) + f": {self.message}"
        if self.correlation_id:
            text += f" (correlation id {self.correlation_id})"
        # The message quotes a server's answer, which may echo a credential: scrubbed at its source too.
        return redact(text)


class AuthenticationError(CommercetoolsError):
    """The token endpoint refused the client: ``invalid_client`` (id/secret), ``invalid_scope`` ..."""


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and when to replace it (``refresh_at``, on the manager's clock)."""

    value: str
    scopes: tuple[str, ...]
    expires_in: float
    refresh_at: float
    expires_at: float

    def __repr__(self) -> str:
        return f"Token(<redacted>, scopes={self.scopes!r}, expires_in={self.expires_in:g})"


def _error_details(response: httpx.Response, secrets: Sequence[str]) -> tuple[str, list[str]]:
    """Return (message, error codes) from a commercetools error body, or the reason phrase, with ``secrets``
    and the process's secrets redacted (an auth server may echo what it was sent)."""
    message, codes = _raw_error_details(response)
    return redact(redact(message, secrets)), [redact(redact(code, secrets)) for code in codes]


def _raw_error_details(response: httpx.Response) -> tuple[str, list[str]]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return one_line(response.text, _MESSAGE_LIMIT) or response.reason_phrase, []
    if not isinstance(body, dict):
        return response.reason_phrase, []
    codes = [
        str(error["code"])
        for error in body.get("errors") or ()
        if isinstance(error, dict) and isinstance(error.get("code"), str)
    ]
    # The OAuth endpoints answer {"error": "invalid_client", "error_description": ...} as well.
    if isinstance(body.get("error"), str) and body["error"] not in codes:
        codes.insert(0, body["error"])
    message = body.get("message") or body.get("error_description") or response.reason_phrase
    return one_line(str(message), _MESSAGE_LIMIT), codes


def _encodable(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


class TokenManager:
    """Fetch, cache and refresh a client-credentials token; one refresh at a time for any number of callers.

    ``clock`` is a monotonic clock (tests pass a fake one to age tokens without waiting). The token endpoint's
    502/503/504/429 answers and connection failures are retried like the API's.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        auth_url: str,
        client_id: str,
        client_secret: str,
        scopes: Sequence[str] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._url = auth_url.rstrip("/") + "/oauth/token"
        self._client_id = client_id
        self._secret = Secret(client_secret)
        # What the token request carries: the secret, and the Basic credential made of it (base64 of
        # id:secret; httpx encodes it as UTF-8, other clients as latin-1).
        pair = f"{client_id}:{client_secret}"
        self._credentials = tuple(
            Secret(value)
            for value in {
                client_secret,
                *(
                    base64.b64encode(pair.encode(c)).decode()
                    for c in ("utf-8", "latin-1")
                    if _encodable(pair, c)
                ),
            }
        )
        self._scopes = tuple(scopes)
        self._clock = clock
        self._timeout = timeout
        self._attempts = attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._sleep = sleep
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    def secrets(self) -> tuple[str, ...]:
        """Return what must never appear in a message: the client secret, its Basic credential, the token."""
        current = (self._token.value,) if self._token is not None else ()
        return (*(credential.reveal() for credential in self._credentials), *current)

    async def token(self) -> Token:
        """Return a token that is not due for refresh, fetching one if needed."""
        token = self._token
        if token is not None and self._clock() < token.refresh_at:
            return token
        async with self._lock:
            # Whoever held the lock before us may have refreshed already.
            token = self._token
            if token is not None and self._clock() < token.refresh_at:
                return token
            try:
                self._token = await self._fetch()
            except AuthenticationError as exc:
                # Refreshing early leaves time to try again: a token that has not expired still serves,
                # unless the auth server said the credentials themselves are wrong.
                if token is not None and self._clock() < token.expires_at and exc.status not in (400, 401):
                    return token
                raise
            return self._token

    async def refresh(self, stale: Token) -> Token:
        """Replace ``stale`` (the server refused it); callers that saw the same token share one refresh."""
        async with self._lock:
            if self._token is not None and self._token.value != stale.value:
                return self._token
            self._token = await self._fetch()
            return self._token

    async def _fetch(self) -> Token:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._fetch_once()
            except AuthenticationError as exc:
                transient = exc.status is None or exc.status in _RETRY_STATUSES
                if not transient or attempt >= self._attempts:
                    raise
            await self._sleep(backoff(attempt, self._backoff_base, self._backoff_cap))

    async def _fetch_once(self) -> Token:
        form = {"grant_type": "client_credentials"}
        if self._scopes:
            form["scope"] = " ".join(self._scopes)
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(
                    self._url,
                    data=form,
                    auth=httpx.BasicAuth(self._client_id, self._secret.reveal()),
                    headers={"Accept": "application/json"},
                )
        except (httpx.TransportError, TimeoutError) as exc:
            raise AuthenticationError(
                f"cannot reach the auth server: {type(exc).__name__}", method="POST", path=self._url
            ) from None
        self.fetches += 1
        if response.status_code != 200:
            message, codes = _error_details(response, self.secrets())
            raise AuthenticationError(
                message,
                status=response.status_code,
                codes=codes,
                correlation_id=response.headers.get(_CORRELATION_HEADER),
                method="POST",
                path=self._url,
            )
        try:
            body = orjson.loads(response.content)
            value = str(body["access_token"])
            expires_in = float(body.get("expires_in") or 0) or 172800.0
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise AuthenticationError(
                "the token response is not the expected JSON", status=200, method="POST", path=self._url
            ) from None
        scopes = tuple(str(body.get("scope") or "").split())
        return Token(value, scopes, expires_in, started + expires_in * REFRESH_AT_SHARE, started + expires_in)


class CommercetoolsClient:
    """Calls to one commercetools project. Use as an async context manager, or call ``aclose``.

    ``transport`` replaces the network (tests); ``sleep`` and ``clock`` replace time (tests).
    """

    def __init__(
        self,
        *,
        project_key: str,
        api_url: str,
        auth_url: str,
        client_id: str,
        client_secret: str,
        scopes: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.project_key = project_key
        self._api_url = api_url.rstrip("/")
        self._timeout = timeout
        self._attempts = attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
            transport=transport,
        )
        self.tokens = TokenManager(
            self._client,
            auth_url,
            client_id,
            client_secret,
            scopes,
            clock=clock,
            timeout=timeout,
            attempts=attempts,
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            sleep=sleep,
        )

    @classmethod
    def from_options(cls, options: CommercetoolsOptions, **overrides: Any) -> CommercetoolsClient:
        """Build a client for the project and API client ``options`` name."""
        return cls(
            project_key=options.project_key,
            api_url=options.api_url,
            auth_url=options.auth_url,
            client_id=options.client_id,
            client_secret=options.client_secret.get_secret_value(),
            scopes=list(options.scopes),
            **overrides,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- the calls ctsync makes ---

    async def granted_scopes(self) -> tuple[str, ...]:
        """Return the scopes the token endpoint granted (fetching a token if none is cached)."""
        return (await self.tokens.token()).scopes

    async def get_project(self) -> dict[str, Any]:
        return await self._json("GET", "")

    async def get_subscription(self, key: str) -> dict[str, Any] | None:
        """Return the subscription with ``key``, or None when there is none."""
        try:
            return await self._json("GET", f"/subscriptions/key={key}")
        except CommercetoolsError as exc:
            if exc.status == 404:
                return None
            raise

    async def create_subscription(self, draft: Mapping[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/subscriptions", body=draft)

    async def update_subscription(
        self, key: str, version: int, actions: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        return await self._json(
            "POST", f"/subscriptions/key={key}", body={"version": version, "actions": list(actions)}
        )

    async def query_pages(
        self, resource_path: str, where: str | None = None, limit: int = 500
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield every resource of ``resource_path`` (``products``, ``orders``...) a page at a time.

        Pages follow a cursor on ``id`` (sorted by id, ``where id > "<last id>"``) rather than offsets, which
        commercetools caps at 10,000 and which skip or repeat resources created meanwhile; ``withTotal=false``
        spares the server the count.
        """
        if not 1 <= limit <= 500:
            raise ValueError("limit must be from 1 to 500")
        path = "/" + resource_path.strip("/")
        last_id: str | None = None
        while True:
            conditions = [f"({where})"] if where else []
            if last_id is not None:
                conditions.append(f'id > "{last_id}"')
            params: list[tuple[str, str]] = [
                ("limit", str(limit)),
                ("sort", "id asc"),
                ("withTotal", "false"),
            ]
            if conditions:
                params.append(("where", " and ".join(conditions)))
            page = await self._json("GET", path, params=params)
            results = [r for r in page.get("results") or () if isinstance(r, dict)]
            if results:
                yield results
            if len(results) < limit:
                return
            last_id = str(results[-1]["id"])

    # --- the request loop ---

    async def _json(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        response = await self.request(method, path, params=params, body=body)
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise CommercetoolsError(
                "the response is not JSON",
                status=response.status_code,
                correlation_id=response.headers.get(_CORRELATION_HEADER),
                method=method,
                path=self._display(path),
            ) from None
        if not isinstance(data, dict):
            raise CommercetoolsError(
                "the response is not a JSON object",
                status=response.status_code,
                method=method,
                path=self._display(path),
            )
        return data

    def _display(self, path: str) -> str:
        return f"/{self.project_key}{path}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        """Send ``method`` to ``/<projectKey><path>``; return the 2xx response or raise CommercetoolsError."""
        url = f"{self._api_url}/{self.project_key}{path}"
        display = self._display(path)
        content = orjson.dumps(body) if body is not None else None
        idempotent = method in ("GET", "HEAD")
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            token = await self.tokens.token()
            correlation_id = f"ctsync-{uuid.uuid4()}"
            headers = {"Authorization": f"Bearer {token.value}", _CORRELATION_HEADER: correlation_id}
            if content is not None:
                headers["Content-Type"] = "application/json"
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._client.request(
                        method, url, params=list(params), content=content, headers=headers
                    )
            except (httpx.TransportError, TimeoutError) as exc:
                # A write may have reached the server before the connection dropped; only a failed connect
                # proves it did not.
                retryable = idempotent or isinstance(exc, httpx.ConnectError)
                if retryable and attempt < self._attempts:
                    await self._sleep(backoff(attempt, self._backoff_base, self._backoff_cap))
                    continue
                raise CommercetoolsError(
                    f"no response: {type(exc).__name__}",
                    correlation_id=correlation_id,
                    method=method,
                    path=display,
                ) from None
            if response.is_success:
                return response
            message, codes = _error_details(response, (*self.tokens.secrets(), token.value))
            answered_id = response.headers.get(_CORRELATION_HEADER) or correlation_id
            if response.status_code == 401 and not refreshed and "invalid_client" not in codes:
                refreshed = True
                await self.tokens.refresh(token)
                attempt -= 1  # the refresh is not a retry of a failing server
                continue
            if response.status_code in _RETRY_STATUSES and attempt < self._attempts:
                delay = backoff(attempt, self._backoff_base, self._backoff_cap)
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.isdigit():
                    delay = min(float(retry_after), self._backoff_cap)
                await self._sleep(delay)
                continue
            raise CommercetoolsError(
                message,
                status=response.status_code,
                codes=codes,
                correlation_id=answered_id,
                method=method,
                path=display,
            )
