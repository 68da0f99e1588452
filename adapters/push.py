"""An HTTP endpoint for Pub/Sub push subscriptions (``CTSYNC_SOURCE=push``), served by uvicorn in the
service's own event loop.

Each POST carries one message in Pub/Sub's push envelope. The answer waits until the pipeline settled the
message: 2xx once it was delivered, ignored or dead-lettered (acked); 503 when it was handed back (nacked)
or not settled within ``ANSWER_TIMEOUT_SECONDS``; 429 when ``CTSYNC_MAX_IN_FLIGHT`` requests already wait.
Any non-2xx makes Pub/Sub redeliver later with its own backoff, so a saturated or stopping service sheds
load instead of queueing it.

With ``PUSH_AUDIENCE`` set, the Google-signed OIDC token Pub/Sub attaches is verified: signature (Google's
published certificates, cached), issuer, expiry, audience, and ``PUSH_SERVICE_ACCOUNT`` as the verified
email. Missing or invalid tokens get 401; valid tokens for another audience or account get 403. Both
settings are required unless ``PUSH_ALLOW_UNAUTHENTICATED=true`` (configuration checks refuse to start).

Bounds against hostile or broken clients: a request takes its in-flight place before its body is read; a
body is counted as it arrives and refused with 413 past ``MAX_BODY_BYTES`` (chunked or not) and with 408
when it does not arrive within ``BODY_TIMEOUT_SECONDS``; headers must arrive within
``PUSH_HEADER_TIMEOUT_SECONDS``; at most ``PUSH_MAX_CONNECTIONS`` connections are open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import orjson
from google.auth import jwt
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters._http_server import EmbeddedServer, ListenAddress, guarded_protocol, listen_socket, serve
from consumer import audit
from consumer.ports import Envelope, Fetched, Source
from consumer.retry import backoff_delay

GOOGLE_CERTS_URL: Final = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS: Final = frozenset({"accounts.google.com", "https://accounts.google.com"})
# Pub/Sub's longest push acknowledgement deadline; past it Pub/Sub has given up on the request anyway.
ANSWER_TIMEOUT_SECONDS: Final = 600.0
# A 10 MB Pub/Sub message grows by a third in base64, plus the envelope.
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
# Pub/Sub sends a body at once; one that trickles in holds an in-flight place, so it gets a deadline.
BODY_TIMEOUT_SECONDS: Final = 30.0
CERTS_TIMEOUT_SECONDS: Final = 10.0
CERTS_DEFAULT_MAX_AGE: Final = 300.0
# An unknown key id refetches the certificates at most this often, so junk tokens cannot hammer Google.
CERTS_MIN_REFRESH_SECONDS: Final = 30.0
# After a failed fetch, the next waits 1, 2, 4 ... 60 s; meanwhile the last good certificates serve.
CERTS_RETRY_FIRST_SECONDS: Final = 1.0
CERTS_RETRY_CAP_SECONDS: Final = 60.0
# Certificates are served past their max-age at most this long while Google cannot be reached.
CERTS_MAX_STALE_SECONDS: Final = 6 * 3600.0
CLOCK_SKEW_SECONDS: Final = 10
SHUTDOWN_GRACE_SECONDS: Final = 5.0

PUSH_REJECTED: Final = audit.PUSH_REJECTED
PUSH_UNAUTHORIZED: Final = audit.PUSH_UNAUTHORIZED

# google-auth's jwt.decode carries no annotations.
_jwt_decode: Callable[..., Any] = jwt.decode
_MAX_AGE = re.compile(r"max-age=(\d+)")


class MalformedPush(ValueError):
    """The request is not a Pub/Sub push envelope; the message says why (never quoting the body)."""


@dataclass(frozen=True, slots=True)
class PushedMessage:
    data: bytes
    message_id: str
    publish_time: str | None
    subscription: str | None
    delivery_attempt: int | None
    attributes: Mapping[str, str]


def parse_push_envelope(body: bytes) -> PushedMessage:
    """Decode ``{"message": {"data", "messageId", "attributes", "publishTime"}, "subscription",
    "deliveryAttempt"}``; raise MalformedPush with the reason."""
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedPush("the body is not JSON") from None
    if not isinstance(envelope, dict):
        raise MalformedPush("the body is not a JSON object")
    message = envelope.get("message")
    if not isinstance(message, dict):
        raise MalformedPush("no message object")
    message_id = message.get("messageId", message.get("message_id"))
    if not isinstance(message_id, str) or not message_id:
        raise MalformedPush("message.messageId is missing")
    data = message.get("data", "")
    if not isinstance(data, str):
        raise MalformedPush("message.data is not a string")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPush("message.data is not base64") from None
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        raise MalformedPush("message.attributes is not an object of strings")
    attempt = envelope.get("deliveryAttempt")
    if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool)):
        raise MalformedPush("deliveryAttempt is not an integer")
    publish_time = message.get("publishTime", message.get("publish_time"))
    subscription = envelope.get("subscription")
    return PushedMessage(
        data=decoded,
        message_id=message_id,
        publish_time=publish_time if isinstance(publish_time, str) else None,
        subscription=subscription if isinstance(subscription, str) else None,
        delivery_attempt=attempt,
        attributes=attributes,
    )


# -------------------------------------------------------------------------------------------------- OIDC


class TokenRejected(Exception):
    """Why a push request's token is refused: 401 (missing, invalid) or 403 (not for us)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class CertificatesUnavailable(Exception):
    """Google's certificates could not be fetched: the request is answered 503 and Pub/Sub retries."""


def _token_problem(exc: Exception) -> str:
    # google-auth's messages may quote parts of the token; only a category is reported.
    text = str(exc)
    if "too late" in text or "expired" in text.lower():
        return "the token has expired"
    if "too early" in text:
        return "the token is not valid yet"
    if "signature" in text.lower():
        return "the token's signature does not verify"
    if "Certificate for key id" in text:
        return "the token is signed by an unknown key"
    return "the token is malformed"


def _segment(text: str) -> Any:
    return orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def parse_unverified(token: str, now: float | None = None) -> tuple[str, dict[str, Any]]:
    """Return the key id and claims of a token before anything is fetched for it, or raise TokenRejected
    for what no certificate can make valid: not three parts, not RS256, no key id, expired, not Google's."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenRejected(401, "the token is malformed")
    try:
        header, claims = _segment(parts[0]), _segment(parts[1])
    except (binascii.Error, ValueError):
        raise TokenRejected(401, "the token is malformed") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenRejected(401, "the token is malformed")
    kid = header.get("kid")
    if header.get("alg") != "RS256" or not isinstance(kid, str) or not kid:
        raise TokenRejected(401, "the token is malformed")
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise TokenRejected(401, "the token is malformed")
    if expires + CLOCK_SKEW_SECONDS < (time.time() if now is None else now):
        raise TokenRejected(401, "the token has expired")
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise TokenRejected(401, "the token was not issued by Google")
    return kid, claims


class OidcVerifier:
    """Verify Pub/Sub's Google-signed OIDC tokens against cached Google certificates.

    A token is parsed before any certificate is fetched, so junk costs nothing outbound. The certificates
    are cached for their max-age; then the current ones keep serving while one refresh runs in the
    background. A failed refresh is retried with backoff, never more than one at a time, and until it
    succeeds the last good certificates serve (for at most ``CERTS_MAX_STALE_SECONDS``): Google being
    unreachable does not make valid pushes fail, nor make every request wait for a fetch.
    """

    def __init__(
        self,
        audience: str,
        service_account: str | None,
        *,
        certs_url: str = GOOGLE_CERTS_URL,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.audience = audience
        self.service_account = service_account
        self.certs_url = certs_url
        self._http = http or httpx.AsyncClient(timeout=CERTS_TIMEOUT_SECONDS)
        self._certs: dict[str, str] = {}
        self._expires = 0.0
        self._fetched = -math.inf
        self._next_attempt = 0.0
        self._failures = 0
        self._failure = ""
        self._refreshing: asyncio.Task[None] | None = None

    async def _fetch(self) -> None:
        try:
            response = await self._http.get(self.certs_url)
            response.raise_for_status()
            certs = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise CertificatesUnavailable(
                f"cannot fetch Google's certificates: {type(exc).__name__}"
            ) from exc
        if not isinstance(certs, dict) or not certs:
            raise CertificatesUnavailable("Google's certificates are not a JSON object of PEM certificates")
        match = _MAX_AGE.search(response.headers.get("cache-control", ""))
        max_age = float(match.group(1)) if match else CERTS_DEFAULT_MAX_AGE
        now = time.monotonic()
        self._certs, self._expires, self._fetched = certs, now + max_age, now

    async def _refresh_once(self) -> None:
        try:
            await self._fetch()
        except CertificatesUnavailable as exc:
            self._failures += 1
            self._failure = str(exc)
            wait = backoff_delay(self._failures, CERTS_RETRY_FIRST_SECONDS, CERTS_RETRY_CAP_SECONDS)
            self._next_attempt = time.monotonic() + wait
        else:
            self._failures, self._failure, self._next_attempt = 0, "", 0.0

    def _start_refresh(self) -> asyncio.Task[None]:
        """Start a refresh unless one is in flight; return the one in flight."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_once(), name="ctsync-push-certs")
        return self._refreshing

    def _usable(self, now: float) -> bool:
        return bool(self._certs) and now < self._expires + CERTS_MAX_STALE_SECONDS

    async def _certificates_for(self, kid: str) -> dict[str, str]:
        now = time.monotonic()
        may_fetch = now >= self._next_attempt
        if self._usable(now) and kid in self._certs:
            if now >= self._expires and may_fetch:
                self._start_refresh()  # the current ones serve meanwhile
            return self._certs
        # An unknown key id: Google rotated its keys, or nothing was fetched yet. Junk key ids must not
        # make a fetch each, so a known set is refetched for them at most every CERTS_MIN_REFRESH_SECONDS.
        in_flight = self._refreshing is not None and not self._refreshing.done()
        rate_limited = bool(self._certs) and now - self._fetched < CERTS_MIN_REFRESH_SECONDS
        if in_flight or (may_fetch and not rate_limited):
            # Shielded: a request that gives up does not cancel the fetch the others wait for.
            await asyncio.shield(self._start_refresh())
        if not self._usable(time.monotonic()):
            raise CertificatesUnavailable(self._failure or "Google's certificates are not available yet")
        return self._certs

    async def verify(self, authorization: str | None) -> dict[str, Any]:
        """Return the token's claims, or raise TokenRejected / CertificatesUnavailable."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenRejected(401, "no Bearer token")
        kid, _ = parse_unverified(token)
        certs = await self._certificates_for(kid)
        if kid not in certs:
            raise TokenRejected(401, "the token is signed by an unknown key")
        claims = self._decode(token, {kid: certs[kid]})
        if claims is None:
            raise TokenRejected(401, "the token is signed by an unknown key")
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise TokenRejected(401, "the token was not issued by Google")
        if claims.get("aud") != self.audience:
            raise TokenRejected(403, "the token is for another audience (PUSH_AUDIENCE)")
        if self.service_account is not None and (
            claims.get("email") != self.service_account or claims.get("email_verified") is not True
        ):
            raise TokenRejected(403, "the token is for another service account (PUSH_SERVICE_ACCOUNT)")
        return claims

    @staticmethod
    def _decode(token: str, certs: Mapping[str, str]) -> dict[str, Any] | None:
        """Return verified claims (audience checked by the caller), None for an unknown key id."""
        try:
            claims: Any = _jwt_decode(
                token, certs=certs, verify=True, clock_skew_in_seconds=CLOCK_SKEW_SECONDS
            )
        except ValueError as exc:
            problem = _token_problem(exc)
            if problem == "the token is signed by an unknown key":
                return None
            raise TokenRejected(401, problem) from None
        if not isinstance(claims, dict):
            raise TokenRejected(401, "the token is malformed")
        return claims

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        await self._http.aclose()


# ------------------------------------------------------------------------------------------------ source


def _error(status: int, reason: str, *, close: bool = False) -> Response:
    # close: the rest of the body is not read, so the connection cannot carry another request.
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


class PushSource:
    """Pub/Sub push deliveries become envelopes; each request waits for its envelope's ack or nack."""

    name = "push"

    def __init__(
        self,
        *,
        max_in_flight: int,
        verifier: OidcVerifier | None = None,
        answer_timeout: float = ANSWER_TIMEOUT_SECONDS,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
        header_timeout: float = 10.0,
        max_connections: int = 256,
        keep_alive: int = 5,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.verifier = verifier
        self.answer_timeout = answer_timeout
        self.body_timeout = body_timeout
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.keep_alive = keep_alive
        self.log = audit.get_logger("ctsync.push").bind()
        self.app = Starlette(routes=[Route("/{path:path}", self._receive, methods=["POST"])])
        self._ready: deque[Envelope] = deque()
        self._arrived = asyncio.Event()
        self._waiting = 0
        self._closing = False
        self._server: EmbeddedServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def authenticated(self) -> bool:
        """Whether every push must carry a Google OIDC token for PUSH_AUDIENCE from PUSH_SERVICE_ACCOUNT."""
        return self.verifier is not None and self.verifier.service_account is not None

    @property
    def address(self) -> ListenAddress:
        """Where the endpoint listens (the real port when PUSH_LISTEN asked for port 0)."""
        assert self._socket is not None
        host, port = self._socket.getsockname()[:2]
        return ListenAddress(host, port)

    async def start(self, listen: ListenAddress) -> None:
        """Listen on ``listen`` (raising OSError when it cannot) and serve in this event loop."""
        self._socket = listen_socket(listen, "PUSH_LISTEN")
        self._server, self._serving = await serve(
            self.app,
            self._socket,
            "ctsync-push",
            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_SECONDS),
            http=guarded_protocol(self.header_timeout, self.max_connections),
            # uvicorn answers 503 to a request arriving while this many connections are open.
            limit_concurrency=self.max_connections,
            timeout_keep_alive=self.keep_alive,
        )

    def problem(self) -> str | None:
        """Why this source is not ready, for /readyz: the endpoint stopped serving."""
        if self._serving is not None and self._serving.done():
            return "the push endpoint stopped serving"
        return None

    async def _receive(self, request: Request) -> Response:
        if self._closing:
            return _error(503, "ctsync is stopping")
        if self.verifier is not None:
            try:
                await self.verifier.verify(request.headers.get("authorization"))
            except TokenRejected as rejected:
                self.log.warning(PUSH_UNAUTHORIZED, status=rejected.status, reason=rejected.reason)
                return _error(rejected.status, rejected.reason)
            except CertificatesUnavailable as exc:
                self.log.error(PUSH_UNAUTHORIZED, status=503, reason=str(exc))
                return _error(503, "cannot verify the token now")
        if self._waiting >= self.max_in_flight:
            return _error(429, "saturated: CTSYNC_MAX_IN_FLIGHT messages are waiting")
        # The place is taken before the body is read: slow bodies count against the bound too.
        self._waiting += 1
        try:
            body = await self._read_body(request)
            if isinstance(body, Response):
                return body
            try:
                pushed = parse_push_envelope(body)
            except MalformedPush as exc:
                self.log.warning(PUSH_REJECTED, status=400, reason=str(exc), size=len(body))
                return _error(400, str(exc))
            return await self._hand_over(pushed)
        finally:
            self._waiting -= 1

    async def _read_body(self, request: Request) -> bytes | Response:
        """Return the body, counted as it arrives; or the answer when it is too large or too slow."""
        too_large = "the body is larger than a Pub/Sub push envelope can be"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, too_large, close=True)
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        self.log.warning(PUSH_REJECTED, status=413, reason=too_large, size=len(body))
                        return _error(413, too_large, close=True)
        except TimeoutError:
            self.log.warning(
                PUSH_REJECTED, status=408, reason="the body was not sent in time", size=len(body)
            )
            return _error(408, "the body was not sent in time", close=True)
        except ClientDisconnect:
            return _error(400, "the client went away", close=True)
        return bytes(body)

    async def _hand_over(self, pushed: PushedMessage) -> Response:
        settled: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settle(ok: bool) -> None:
            if not settled.done():
                settled.set_result(ok)

        envelope = Envelope(
            body=pushed.data,
            position=pushed.message_id,
            ack=lambda: settle(True),
            nack=lambda: settle(False),
            source_fields={
                "message_id": pushed.message_id,
                "delivery_attempt": pushed.delivery_attempt,
                "publish_time": pushed.publish_time,
                "subscription": pushed.subscription,
            },
        )
        self._ready.append(envelope)
        self._arrived.set()
        try:
            async with asyncio.timeout(self.answer_timeout):
                acked = await settled
        except TimeoutError:
            return _error(503, "not settled in time; Pub/Sub will redeliver")
        if acked:
            return Response(status_code=204)
        return _error(503, "handed back; Pub/Sub will redeliver")

    async def fetch(self, max_count: int) -> Fetched:
        ready = self._ready
        if not ready:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._arrived.wait()
        envelopes: list[Envelope] = []
        while ready and len(envelopes) < max_count:
            envelopes.append(ready.popleft())
        return Fetched(envelopes, more_ready=bool(ready))

    async def close(self) -> None:
        """Answer what waits unfetched with 503, stop listening, let answers in progress finish."""
        self._closing = True
        while self._ready:
            self._ready.popleft().nack()
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_SECONDS + 2):
                    await self._serving
            except TimeoutError:
                self._serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._serving
        elif self._socket is not None:
            self._socket.close()
        if self.verifier is not None:
            await self.verifier.close()


@dataclass(frozen=True, slots=True)
class PushOptions:
    """Where the push endpoint listens, whose tokens it accepts, and its bounds."""

    listen: ListenAddress
    audience: str | None = None
    service_account: str | None = None
    max_in_flight: int = 10_000
    header_timeout_seconds: float = 10.0
    max_connections: int = 256
    keep_alive_seconds: int = 5


async def open_source(options: PushOptions, *, certs_url: str = GOOGLE_CERTS_URL) -> Source:
    """Start the push endpoint on PUSH_LISTEN; ``certs_url`` replaces Google's certificates (tests)."""
    verifier = (
        OidcVerifier(options.audience, options.service_account, certs_url=certs_url)
        if options.audience is not None
        else None
    )
    source = PushSource(
        max_in_flight=options.max_in_flight,
        verifier=verifier,
        body_timeout=BODY_TIMEOUT_SECONDS,
        header_timeout=options.header_timeout_seconds,
        max_connections=options.max_connections,
        keep_alive=options.keep_alive_seconds,
    )
    if not source.authenticated:
        # Only reachable with PUSH_ALLOW_UNAUTHENTICATED=true: configuration checks refuse it otherwise.
        audit.get_logger().warning(
            audit.CONFIG_WARNING,
            variable="PUSH_ALLOW_UNAUTHENTICATED",
            reason=(
                "the push endpoint accepts requests without a Google OIDC token"
                if verifier is None
                else "the push endpoint accepts a token any Google account mints for PUSH_AUDIENCE "
                "(PUSH_SERVICE_ACCOUNT is not set)"
            ),
        )
    try:
        await source.start(options.listen)
    except BaseException:
        await source.close()
        raise
    return source
