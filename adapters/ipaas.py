"""The iPaaS.com hook client: ``HttpHookSink`` POSTs one batch of notifications per call; ``DryRunSink`` logs.

Both implement ``consumer.ports.Sink``. The HTTP sink makes exactly one attempt per ``send`` and reports
what came of it as a ``HookResponse``; retries, batch splitting and throttling belong to the core, which
counts every attempt against the subscription's throttle. Transport failures (timeouts, refused or dropped
connections) are reported with ``status=None``, never raised. The webhook key is sent only in the
``Authorization`` header: it is kept out of reprs, of ``HookResponse.detail`` and of exception messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import orjson

from adapters._text import USER_AGENT, Secret, one_line
from consumer.ports import HookResponse
from consumer.routing import Notification

DETAIL_LIMIT = 300
_SNIPPET_READ_LIMIT = 4096
_CONNECT_TIMEOUT_CAP = 10.0
_MIN_REDACTED_KEY = 8
_DELTA_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Return a ``Retry-After`` value (delta-seconds or HTTP-date) as seconds from ``now``, at least 0.

    Return None when the header is absent or unparseable. A date without a zone, and a naive ``now``, are UTC.
    """
    if value is None or not (text := value.strip()):
        return None
    if _DELTA_SECONDS.fullmatch(text):
        return max(0.0, float(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    seconds = (when - now).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _BearerAuth(httpx.Auth):
    """Set ``Authorization: Bearer <key>`` on each request; its repr never shows the key."""

    def __init__(self, key: Secret) -> None:
        self._key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._key.reveal()}"
        yield request

    def __repr__(self) -> str:
        return "_BearerAuth(<redacted>)"


def _transport_detail(exc: httpx.TransportError) -> str:
    """Describe a transport error as ``<kind>: <class>[: <message>]``."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout: {name}"
    if isinstance(exc, httpx.NetworkError):
        kind = "connection"
    elif isinstance(exc, httpx.ProtocolError):
        kind = "protocol"
    else:
        kind = "transport"
    message = str(exc)
    return f"{kind}: {name}: {message}" if message else f"{kind}: {name}"


class HttpHookSink:
    """POST notification batches to an iPaaS.com hook URL, one attempt per ``send``.

    ``timeout`` bounds each call as a whole (and the connect, write, read and pool-wait phases);
    ``max_connections`` caps the pooled connections, idle ones included. ``transport`` replaces the network
    (tests); the pool limits then belong to that transport.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_connections: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._url = httpx.URL(url)
        if self._url.scheme not in ("http", "https") or not self._url.host:
            raise ValueError("the hook URL must be an absolute http(s) URL")
        self._key = Secret(api_key)
        self._timeout = timeout
        self._max_connections = max_connections
        self._client = httpx.AsyncClient(
            auth=_BearerAuth(self._key) if api_key else None,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=httpx.Timeout(
                connect=min(timeout, _CONNECT_TIMEOUT_CAP), read=timeout, write=timeout, pool=timeout
            ),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            transport=transport,
        )

    async def send(self, notifications: Sequence[Notification], correlation_id: str) -> HookResponse:
        """POST ``notifications`` once and report the status, duration, ``Retry-After`` and a short detail."""
        if not notifications:
            raise ValueError("a hook request needs at least one notification")
        body = orjson.dumps({"notifications": [n.as_json() for n in notifications]})
        headers = {"Content-Type": "application/json", "x-correlation-id": correlation_id}
        status: int | None = None
        retry_after: float | None = None
        detail = failure = ""
        started = time.perf_counter()
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._client.stream("POST", self._url, content=body, headers=headers) as response,
            ):
                status = response.status_code
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if response.is_success:
                    # Read the (small) body so the connection goes back to the pool; only the status matters.
                    with contextlib.suppress(httpx.DecodingError):
                        await response.aread()
                else:
                    detail = await self._snippet(response)
        except TimeoutError:  # asyncio.timeout's deadline for the whole call
            failure = f"timeout: no complete response within {self._timeout:g}s"
        except httpx.TransportError as exc:
            failure = _transport_detail(exc)
        if failure:
            # With a status the server did answer (a 2xx was accepted); only the body was cut short.
            detail = failure if status is None else f"{failure} (while reading the body of a {status})"
        return HookResponse(
            status=status,
            duration_ms=(time.perf_counter() - started) * 1000,
            retry_after=retry_after,
            detail=self._redact(detail),
        )

    async def _snippet(self, response: httpx.Response) -> str:
        """Return the start of an error body on one line, or the reason phrase when it is empty."""
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size >= _SNIPPET_READ_LIMIT:
                    break  # the rest is not read; httpx then closes this connection instead of reusing it
        except httpx.DecodingError:
            return f"{response.reason_phrase} (undecodable body)"
        text = b"".join(chunks)[:_SNIPPET_READ_LIMIT].decode("utf-8", errors="replace")
        return one_line(text, DETAIL_LIMIT) or response.reason_phrase

    def _redact(self, text: str) -> str:
        # A key this short cannot be hidden by replacing it without mangling ordinary words.
        key = self._key.reveal()
        return text.replace(key, "<redacted>") if len(key) >= _MIN_REDACTED_KEY else text

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"HttpHookSink(url={str(self._url)!r}, max_connections={self._max_connections})"


class DryRunSink:
    """Send nothing: pass each batch to ``log`` and answer as if iPaaS.com had accepted it."""

    def __init__(self, log: Callable[..., None] | None = None) -> None:
        self._log = log

    async def send(self, notifications: Sequence[Notification], correlation_id: str) -> HookResponse:
        """Log the batch that would have been sent and report a 200."""
        if self._log is not None:
            self._log(notifications=[n.as_json() for n in notifications], correlation_id=correlation_id)
        return HookResponse(status=200, detail="dry-run")

    async def close(self) -> None:
        """Nothing to close."""
        return None

    def __repr__(self) -> str:
        return "DryRunSink()"


@dataclass(frozen=True, slots=True)
class HookProbe:
    """What the hook answered to ``probe_hook``: ``status`` None when nothing arrived."""

    status: int | None
    detail: str


async def probe_hook(url: str, api_key: str, *, seconds: float = 10.0) -> HookProbe:
    """POST ``{"notifications": []}`` to the hook with the webhook key, the request ``ctsync check`` uses.

    An empty batch names no record, so iPaaS.com has nothing to queue or fetch: it tests the URL and the key
    without creating work. (It does count once against the subscription's throttle window.)
    """
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "x-correlation-id": f"ctsync-check-{uuid.uuid4()}",
        "User-Agent": USER_AGENT,
    }
    async with httpx.AsyncClient(timeout=seconds, follow_redirects=False) as client:
        try:
            async with asyncio.timeout(seconds):
                response = await client.post(url, content=b'{"notifications":[]}', headers=headers)
        except (httpx.TransportError, TimeoutError) as exc:
            return HookProbe(None, f"no response: {type(exc).__name__}")
    detail = one_line(response.text, 160) or response.reason_phrase
    if len(api_key) >= 8:
        detail = detail.replace(api_key, "<redacted>")
    return HookProbe(response.status_code, detail)
