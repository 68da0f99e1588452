"""The iPaaS.com hook client: ``HttpHookSink`` POSTs one batch of notifications per call (a dry run's sink is
``consumer.dry_run.DryRunSink``).

It implements ``consumer.ports.Sink``, makes exactly one attempt per ``send`` and reports
what came of it as a ``HookResponse``; retries, batch splitting and throttling belong to the core, which
counts every attempt against the subscription's throttle. Transport failures (timeouts, refused or dropped
connections) are reported with ``status=None``, never raised. The webhook key is sent only in the
``Authorization`` header: it is kept out of reprs, of ``HookResponse.detail`` and of exception messages.

A hostile or broken hook cannot make the client hold much: at most ``BODY_READ_LIMIT`` bytes of any answer
are read (the status decides, the rest is discarded with the connection), and a redirect is never followed
(the key would go to another address); its ``Location`` is reported instead.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
import zlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
import orjson

from adapters._text import USER_AGENT, Secret, one_line
from consumer.audit import display_url, redact
from consumer.ports import HookResponse
from consumer.routing import Notification

DETAIL_LIMIT = 300
# The most of an answer's body ever read, compressed or not; the rest is left unread.
BODY_READ_LIMIT = 64 * 1024
_CONNECT_TIMEOUT_CAP = 10.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DELTA_SECONDS = re.compile(r"-?\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Return a ``Retry-After`` value (delta-seconds or HTTP-date) as seconds from ``now``, more than 0.

    Return None when the header is absent, unparseable, zero, negative or a date already past: none of
    them says how long to wait, so the caller backs off on its own instead of retrying at once. A date
    without a zone, and a naive ``now``, are UTC.
    """
    if value is None or not (text := value.strip()):
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if seconds > 0 else None
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
    return seconds if math.isfinite(seconds) and seconds > 0 else None


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
                if status in _REDIRECTS:
                    detail = redirect_detail(self._url, response)
                elif response.is_success:
                    # Only the status matters; a small body is read so the connection goes back to the pool.
                    await read_capped(response)
                else:
                    detail = await snippet(response)
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

    def _redact(self, text: str) -> str:
        # The key by value, whatever its length, and every other secret the process knows.
        return redact(redact(text, (self._key.reveal(),)))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"HttpHookSink(url={str(self._url)!r}, max_connections={self._max_connections})"


@dataclass(frozen=True, slots=True)
class HookProbe:
    """What the hook answered to ``probe_hook``: ``status`` None when nothing arrived."""

    status: int | None
    detail: str


async def read_capped(response: httpx.Response, limit: int = BODY_READ_LIMIT) -> bytes:
    """Return at most ``limit`` bytes of ``response``'s body as sent (not decompressed); the rest is never
    read, and httpx then closes the connection instead of reusing it."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    except httpx.StreamConsumed:  # a transport that answered with the body already read (tests)
        return response.content[:limit]
    return b"".join(chunks)[:limit]


def _decoded(raw: bytes, encoding: str, limit: int) -> bytes | None:
    """Decompress at most ``limit`` bytes of a gzip/deflate body (a small bomb stays small); None when the
    encoding is unknown or the data broken."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw[:limit]
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    try:
        decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32 if encoding != "deflate" else zlib.MAX_WBITS)
        return decompressor.decompress(raw, limit)
    except zlib.error:
        return None


async def snippet(response: httpx.Response, limit: int = DETAIL_LIMIT) -> str:
    """Return the start of an error body on one line, or the reason phrase when it is empty."""
    raw = await read_capped(response)
    body = _decoded(raw, response.headers.get("content-encoding", ""), BODY_READ_LIMIT)
    if body is None:
        return f"{response.reason_phrase} (undecodable body)"
    return one_line(body.decode("utf-8", errors="replace"), limit) or response.reason_phrase


def redirect_detail(url: httpx.URL, response: httpx.Response) -> str:
    """Say which hook URL redirected where, without credentials, query or fragment of either."""
    location = response.headers.get("location", "")
    target = display_url(str(url.join(location))) if location else "no Location"
    return f"IPAAS_HOOK_URL {display_url(str(url))} redirects to {target}; redirects are not followed"


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
            async with (
                asyncio.timeout(seconds),
                client.stream("POST", url, content=b'{"notifications":[]}', headers=headers) as response,
            ):
                if response.status_code in _REDIRECTS:
                    detail = redirect_detail(httpx.URL(url), response)
                else:
                    detail = await snippet(response, 160)
        except (httpx.TransportError, TimeoutError) as exc:
            return HookProbe(None, f"no response: {type(exc).__name__}")
    return HookProbe(response.status_code, redact(redact(detail, (api_key,))))
