"""A local iPaaS.com hook server for tests: a real HTTP/1.1 server on loopback.

It checks each request the way iPaaS.com's hook API does (shared docs ``ipaas.md``), measures what
iPaaS.com would enforce (requests in any moving window, requests in flight), can enforce those limits itself,
and answers with scripted faults. Every method is thread-safe; faults and settings may change while it runs.

Usage::

    with HookServer(limit=5, window_seconds=1.0) as hooks:
        hooks.faults.push(Fault.status(429, retry_after=1))   # the next request
        hooks.faults.push(Fault.status(503), times=2)         # then the two after it
        hooks.faults.always = Fault.delay(0.05)               # every other request is slow
        hooks.reject_external_ids = {"bad-id"}                # 400 for any request naming it
        env = {**os.environ, **hooks.env()}                   # IPAAS_HOOK_URL, IPAAS_WEBHOOK_API_KEY, ...
        ...  # run ctsync against it
        hooks.wait_for_notifications(10, timeout=5)
        assert hooks.max_in_window(1.0) <= 5 and hooks.peak_in_flight <= 2

In pytest, use the ``hook_server`` and ``hook_server_factory`` fixtures defined here: import them into a
``conftest.py`` (``from hookserver import hook_server_fixture, hook_server_factory_fixture  # noqa: F401``)
or list this module in ``pytest_plugins``. Each test gets its own server (starting one takes about a
millisecond), so no state leaks between tests.

Order of checks for each request: arrival is recorded and the enforced limits are checked (atomically);
the body is read; a scripted fault, if any, wins; then an enforced-limit 429; then method (405),
``Authorization`` (401), ``Content-Type`` (415), body and ``x-correlation-id`` (400), rejected external ids
(400 or 422); else success (200 by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import secrets
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

MAX_BODY_BYTES = 16 * 1024 * 1024
SUCCESS_STATUSES = (200, 202, 204)
NOTIFICATION_FIELDS = frozenset({"scope", "external_id"})


def max_in_window(times: Iterable[float], seconds: float) -> int:
    """Return the most of ``times`` that fall in any half-open window ``[t, t + seconds)``.

    Two arrivals exactly ``seconds`` apart are not in the same window, matching a limiter that counts the
    arrivals of the last ``seconds`` seconds.
    """
    if seconds <= 0:
        raise ValueError("the window must be longer than 0 seconds")
    ordered = sorted(times)
    best, first = 0, 0
    for last, t in enumerate(ordered):
        while t - ordered[first] >= seconds:
            first += 1
        best = max(best, last - first + 1)
    return best


@dataclass(frozen=True, slots=True)
class Fault:
    """How to answer one request instead of the normal way.

    ``delay_seconds`` is waited first (the request stays in flight). Then the connection is closed without a
    response when ``drop_connection``, or ``status_code`` is answered with ``retry_after``, ``headers`` and
    ``body``; with neither, the request is handled normally after the delay. Build faults with the class
    methods: ``Fault.status(503)``, ``Fault.status(429, retry_after=2)``, ``Fault.delay(0.5)``,
    ``Fault.drop()``; hostile ones: ``Fault.redirect(302, url)``, ``Fault.huge_body(200, size)`` (streamed,
    see ``HookServer.huge_body_bytes_sent``), ``Fault.echo_key(400)``.
    """

    status_code: int | None = None
    retry_after: float | str | datetime | None = None
    http_date: bool = False
    delay_seconds: float = 0.0
    drop_connection: bool = False
    body: bytes | str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body_size: int = 0
    echo_authorization: bool = False

    @classmethod
    def status(
        cls,
        code: int,
        *,
        retry_after: float | str | datetime | None = None,
        http_date: bool = False,
        body: bytes | str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        delay: float = 0.0,
    ) -> Fault:
        """Answer ``code``; ``retry_after`` in seconds (``http_date=True`` sends now + that as an HTTP-date),
        a datetime (sent as an HTTP-date) or a raw header string; ``body`` replaces the JSON error body."""
        return cls(code, retry_after, http_date, delay, False, body, tuple(headers))

    @classmethod
    def huge_body(cls, code: int, size: int) -> Fault:
        """Answer ``code`` with a body of ``size`` bytes, written in pieces as the client reads (a hostile
        or broken hook's endless answer); the request counts as accepted when ``code`` is a 2xx."""
        return cls(code, body_size=size)

    @classmethod
    def echo_key(cls, code: int) -> Fault:
        """Answer ``code`` with a body quoting the request's ``Authorization`` header, as a careless hook
        might in an error message."""
        return cls(code, echo_authorization=True)

    @classmethod
    def redirect(cls, code: int, location: str) -> Fault:
        """Answer a redirect ``code`` (301, 302, 303, 307, 308) to ``location``."""
        return cls(code, headers=(("Location", location),), body="")

    @classmethod
    def delay(cls, seconds: float, then: Fault | None = None) -> Fault:
        """Wait ``seconds`` before answering normally, or as ``then`` says."""
        return replace(then or cls(), delay_seconds=seconds)

    @classmethod
    def drop(cls, after: float = 0.0) -> Fault:
        """Close the connection without any response, ``after`` seconds after reading the request."""
        return cls(drop_connection=True, delay_seconds=after)

    def retry_after_header(self) -> str | None:
        """Render ``retry_after`` as a header value at answer time."""
        value = self.retry_after
        if value is None:
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, datetime):
            return format_datetime(value.astimezone(UTC), usegmt=True)
        if self.http_date:
            # HTTP-dates have whole seconds: round up so the client waits at least ``value`` seconds.
            when = datetime.fromtimestamp(math.ceil(time.time() + value), UTC)
            return format_datetime(when, usegmt=True)
        return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, slots=True)
class HookRequest:
    """One request as it arrived; ``notifications`` holds the well-formed ones, even in a rejected body."""

    index: int
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    notifications: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """Return the first header called ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    @property
    def correlation_id(self) -> str | None:
        return self.header("x-correlation-id")

    @property
    def external_ids(self) -> tuple[str, ...]:
        return tuple(external_id for _, external_id in self.notifications)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One answered request: what arrived, when (``time.monotonic``), and how it was answered.

    ``status`` is None when the connection was dropped; ``reason`` says why it was answered so ("accepted",
    "fault", "throttled: window", "unauthorized", "invalid: ...").
    """

    request: HookRequest
    arrival: float
    finished: float
    status: int | None
    reason: str
    fault: Fault | None = None
    response_headers: tuple[tuple[str, str], ...] = ()

    @property
    def index(self) -> int:
        return self.request.index

    @property
    def correlation_id(self) -> str | None:
        return self.request.correlation_id

    @property
    def notifications(self) -> tuple[tuple[str, str], ...]:
        return self.request.notifications

    @property
    def count(self) -> int:
        return len(self.request.notifications)

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return self.request.headers

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(slots=True)
class _Rule:
    fault: Fault
    remaining: int | None
    predicate: Callable[[HookRequest], bool] | None = None


class FaultPlan:
    """Which requests get a fault: scripted ones first, in order, then ``when`` rules, then ``always``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: list[_Rule] = []
        self._rules: list[_Rule] = []
        self._always: Fault | None = None

    def push(self, *faults: Fault, times: int = 1) -> None:
        """Answer the next requests with ``faults``, in order, each for ``times`` requests."""
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._script.extend(_Rule(fault, times) for fault in faults)

    def when(
        self, predicate: Callable[[HookRequest], bool], fault: Fault, *, times: int | None = None
    ) -> None:
        """Answer requests matching ``predicate`` with ``fault``: the first ``times`` of them, or all."""
        with self._lock:
            self._rules.append(_Rule(fault, times, predicate))

    @property
    def always(self) -> Fault | None:
        """The fault for every request no script or rule took; None for none."""
        return self._always

    @always.setter
    def always(self, fault: Fault | None) -> None:
        with self._lock:
            self._always = fault

    @property
    def pending(self) -> int:
        """How many scripted answers are left."""
        with self._lock:
            return sum(rule.remaining or 0 for rule in self._script)

    def clear(self) -> None:
        """Forget every scripted fault, rule and ``always``."""
        with self._lock:
            self._script.clear()
            self._rules.clear()
            self._always = None

    def take(self, request: HookRequest) -> Fault | None:
        """Return the fault for ``request`` and use it up."""
        with self._lock:
            if self._script:
                rule = self._script[0]
                rule.remaining = (rule.remaining or 1) - 1
                if rule.remaining <= 0:
                    self._script.pop(0)
                return rule.fault
            for rule in self._rules:
                assert rule.predicate is not None
                if rule.predicate(request):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    return rule.fault
            return self._always


@dataclass(slots=True)
class _Answer:
    status: int
    body: bytes = b""
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False
    body_size: int = 0


class _BodyError(Exception):
    """The body could not be read; ``status`` None means the client went away."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json_error(status: int, message: str, reason: str, /, **extra: Any) -> _Answer:
    body = json.dumps({"error": message, **extra}).encode()
    return _Answer(status, body, reason, [("Content-Type", "application/json")])


def parse_notifications(body: bytes) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """Check a hook body strictly; return the well-formed notifications and the first problem, or None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return (), f"the body is not JSON: {exc}"
    if not isinstance(data, dict):
        return (), "the body must be a JSON object"
    items = data.get("notifications")
    if not isinstance(items, list):
        return (), "notifications must be an array"
    found: list[tuple[str, str]] = []
    problem = None
    unknown = sorted(set(data) - {"notifications"})
    if unknown:
        problem = f"unknown top-level field(s): {', '.join(unknown)}"
    if not items:
        problem = problem or "notifications is empty"
    for i, item in enumerate(items):
        where = f"notifications[{i}]"
        if not isinstance(item, dict):
            problem = problem or f"{where} must be an object"
            continue
        extra = sorted(set(item) - NOTIFICATION_FIELDS)
        if extra:
            problem = problem or f"{where}: unknown field(s) {', '.join(extra)}"
        scope, external_id = item.get("scope"), item.get("external_id")
        if not isinstance(scope, str) or not scope:
            problem = problem or f"{where}.scope must be a non-empty string"
        elif not isinstance(external_id, str) or not external_id:
            problem = problem or f"{where}.external_id must be a non-empty string"
        else:
            found.append((scope, external_id))
    return tuple(found), problem


def _read_chunked(rfile: io.BufferedIOBase) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise _BodyError(None, "incomplete chunked body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BodyError(400, "malformed chunk size") from None
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers are ignored
            return b"".join(parts)
        total += size
        if total > MAX_BODY_BYTES:
            raise _BodyError(413, "the body is too large")
        data = rfile.read(size)
        if len(data) < size:
            raise _BodyError(None, "incomplete chunked body")
        parts.append(data)
        rfile.readline(3)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: without it, 40 ms per answer
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.hooks._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.hooks._connection_closed(self.connection)

    def _any_method(self) -> None:
        self.server.hooks._handle(self)

    do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _any_method

    def read_body(self) -> bytes:
        """Read the request body (Content-Length or chunked)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return _read_chunked(self.rfile)
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command in ("GET", "DELETE", "OPTIONS"):
                return b""
            raise _BodyError(411, "Content-Length is required")
        try:
            size = int(length)
        except ValueError:
            raise _BodyError(400, "malformed Content-Length") from None
        if size < 0:
            raise _BodyError(400, "malformed Content-Length")
        if size > MAX_BODY_BYTES:
            raise _BodyError(413, "the body is too large")
        body = self.rfile.read(size)
        if len(body) < size:
            raise _BodyError(None, "incomplete body")
        return body

    def write_answer(self, answer: _Answer) -> None:
        """Send ``answer``; a client that already left is not an error."""
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value)
            if answer.status != 204 and answer.status >= 200:
                self.send_header("Content-Length", str(answer.body_size or len(answer.body)))
            if answer.close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if answer.body and answer.status != 204 and self.command != "HEAD":
                self.wfile.write(answer.body)
            piece = b"x" * 65536
            left = answer.body_size
            while left > 0 and not self.server.hooks._stopping.is_set():
                self.wfile.write(piece[:left])
                self.server.hooks._body_sent(min(left, len(piece)))
                left -= len(piece)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], hooks: HookServer) -> None:
        self.hooks = hooks
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            self.hooks._error(traceback.format_exc())


class HookServer:
    """A real iPaaS.com-like hook server on a free loopback port, run in a background thread.

    ``api_key`` is the Bearer key it expects (random by default); ``status`` the success status (200, 202,
    204). ``limit``/``window_seconds`` and ``max_concurrent`` make it answer 429 over those limits, like
    iPaaS.com's throttle (requests it answered 429 for the window limit do not use up the window);
    ``retry_after_on_429`` adds a ``Retry-After`` to those 429s. Without them it only measures.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        status: int = 200,
        path: str = "/hooks/ctsync",
        limit: int | None = None,
        window_seconds: float = 60.0,
        max_concurrent: int | None = None,
        retry_after_on_429: bool = False,
        reject_status: int = 400,
        require_correlation_id: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key if api_key is not None else "hook-key-" + secrets.token_urlsafe(12)
        self.success_status = status
        self.path = path
        self.limit = limit
        self.window_seconds = window_seconds
        self.max_concurrent = max_concurrent
        self.retry_after_on_429 = retry_after_on_429
        self.reject_status = reject_status
        self.require_correlation_id = require_correlation_id
        self.faults = FaultPlan()
        self._host, self._port = host, port
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._generation = 0
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._reject: frozenset[str] = frozenset()
        self._connections: set[socket.socket] = set()
        self._in_flight = 0
        self._clear()

    def _clear(self) -> None:
        self._next_index = 0
        self._arrivals: list[float] = []
        self._admitted: list[float] = []
        self._records: list[RequestRecord] = []
        self._accepted: list[tuple[str, str]] = []
        self._peak_in_flight = self._in_flight
        self._peak_connections = len(self._connections)
        self._window_violations = 0
        self._concurrency_violations = 0
        self._errors: list[str] = []
        self._huge_body_bytes_sent = 0

    # lifecycle

    def start(self) -> HookServer:
        """Bind a free loopback port and serve in a daemon thread; return self."""
        if self._httpd is not None:
            raise RuntimeError("the hook server is already started")
        self._stopping.clear()
        self._httpd = _HTTPServer((self._host, self._port), self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, name=f"hookserver-{self._port}"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: cut slow answers short, close every connection and free the port."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HookServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every measurement, record and fault (the settings stay)."""
        self.faults.clear()
        with self._lock:
            self._clear()
            self._notify()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The hook URL, e.g. ``http://127.0.0.1:PORT/hooks/ctsync`` (any path is accepted)."""
        return f"http://{self._host}:{self._port}{self.path}"

    def env(self) -> dict[str, str]:
        """Return ctsync's environment for this server: hook URL and key, and the limits it enforces."""
        env = {"IPAAS_HOOK_URL": self.url, "IPAAS_WEBHOOK_API_KEY": self.api_key}
        if self.limit is not None:
            env["IPAAS_THROTTLE_LIMIT"] = str(self.limit)
            env["IPAAS_THROTTLE_SECONDS"] = f"{self.window_seconds:g}"
        if self.max_concurrent is not None:
            env["IPAAS_CONCURRENT_CONNECTIONS"] = str(self.max_concurrent)
        return env

    @property
    def reject_external_ids(self) -> frozenset[str]:
        """External ids whose requests are answered ``reject_status`` with a body naming them."""
        return self._reject

    @reject_external_ids.setter
    def reject_external_ids(self, ids: Iterable[str]) -> None:
        self._reject = frozenset(ids)

    def reject(self, *external_ids: str, status: int | None = None) -> None:
        """Add ``external_ids`` to the rejected ones; ``status`` (400 or 422) replaces ``reject_status``."""
        if status is not None:
            self.reject_status = status
        self._reject = self._reject | frozenset(external_ids)

    # measurements

    @property
    def requests(self) -> list[RequestRecord]:
        """Every answered request, in the order answered."""
        with self._lock:
            return list(self._records)

    @property
    def request_count(self) -> int:
        """Requests that arrived, including those still being answered."""
        with self._lock:
            return len(self._arrivals)

    @property
    def arrivals(self) -> list[float]:
        """The ``time.monotonic()`` arrival of every request, in arrival order."""
        with self._lock:
            return list(self._arrivals)

    @property
    def notifications(self) -> list[tuple[str, str]]:
        """Accepted notifications as ``(scope, external_id)``, in the order accepted."""
        with self._lock:
            return list(self._accepted)

    @property
    def correlation_ids(self) -> list[str | None]:
        with self._lock:
            return [record.correlation_id for record in self._records]

    @property
    def statuses(self) -> list[int | None]:
        """The status of each answered request in order (None for a dropped connection)."""
        with self._lock:
            return [record.status for record in self._records]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most requests being handled at once (from headers read to just before the answer is sent)."""
        with self._lock:
            return self._peak_in_flight

    @property
    def huge_body_bytes_sent(self) -> int:
        """Bytes of ``Fault.huge_body`` answers the clients took before they stopped reading (the kernel's
        socket buffers included)."""
        with self._lock:
            return self._huge_body_bytes_sent

    def _body_sent(self, size: int) -> None:
        with self._lock:
            self._huge_body_bytes_sent += size

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def peak_connections(self) -> int:
        """The most TCP connections open at once, idle keep-alive ones included."""
        with self._lock:
            return self._peak_connections

    @property
    def window_violations(self) -> int:
        """Requests that arrived over ``limit`` in ``window_seconds`` (0 when no limit is set)."""
        with self._lock:
            return self._window_violations

    @property
    def concurrency_violations(self) -> int:
        """Requests that arrived while ``max_concurrent`` were already in flight."""
        with self._lock:
            return self._concurrency_violations

    @property
    def violations(self) -> int:
        with self._lock:
            return self._window_violations + self._concurrency_violations

    @property
    def errors(self) -> list[str]:
        """Tracebacks of bugs in the server itself (the ``hook_server`` fixtures fail the test on any)."""
        with self._lock:
            return list(self._errors)

    def max_in_window(self, seconds: float, where: Callable[[RequestRecord], bool] | None = None) -> int:
        """Return the most requests that arrived in any ``seconds``-long window (all arrivals, or the
        answered requests ``where`` selects)."""
        if where is None:
            return max_in_window(self.arrivals, seconds)
        return max_in_window((r.arrival for r in self.requests if where(r)), seconds)

    def summary(self) -> str:
        """Describe what the server saw, for assertion messages."""
        with self._lock:
            statuses = Counter(str(record.status) for record in self._records)
            return (
                f"{len(self._arrivals)} requests ({dict(statuses)}), {len(self._accepted)} notifications "
                f"accepted, {self._in_flight} in flight, peak in flight {self._peak_in_flight}, "
                f"{self._window_violations + self._concurrency_violations} violations, "
                f"{self.faults.pending} scripted faults pending"
            )

    # waiting

    def wait_for(
        self, predicate: Callable[[], T | None], timeout: float = 5.0, *, what: str = "the condition"
    ) -> T:
        """Return ``predicate()`` once it is truthy, re-checking on every answered request and at least every
        50 ms; raise AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                generation = self._generation
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; server saw {self.summary()}"
                )
            with self._changed:
                if self._generation == generation:
                    self._changed.wait(min(remaining, 0.05))

    async def wait_for_async(
        self,
        predicate: Callable[[], T | None],
        timeout: float = 5.0,  # noqa: ASYNC109 (the same signature as wait_for)
        *,
        what: str = "the condition",
    ) -> T:
        """Like ``wait_for``, without blocking the event loop (polls every 10 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}; server saw {self.summary()}"
                )
            await asyncio.sleep(0.01)

    def wait_for_notifications(self, count: int, timeout: float = 5.0) -> list[tuple[str, str]]:
        """Wait until at least ``count`` notifications were accepted; return them all."""

        def enough() -> list[tuple[str, str]] | None:
            accepted = self.notifications
            return accepted if len(accepted) >= count else None

        return self.wait_for(enough, timeout, what=f"{count} accepted notifications")

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RequestRecord]:
        """Wait until at least ``count`` requests were answered; return their records."""

        def enough() -> list[RequestRecord] | None:
            records = self.requests
            return records if len(records) >= count else None

        return self.wait_for(enough, timeout, what=f"{count} answered requests")

    # the handler side

    def _notify(self) -> None:
        self._generation += 1
        self._changed.notify_all()

    def _error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    def _connection_opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            self._peak_connections = max(self._peak_connections, len(self._connections))

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _arrive(self, now: float) -> tuple[int, _Answer | None]:
        """Count an arrival and decide, atomically with it, whether it breaks an enforced limit."""
        with self._lock:
            index = self._next_index
            self._next_index += 1
            self._arrivals.append(now)
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            if self.max_concurrent is not None and self._in_flight > self.max_concurrent:
                self._concurrency_violations += 1
                return index, _json_error(
                    429, f"over {self.max_concurrent} concurrent connections", "throttled: concurrency"
                )
            if self.limit is not None:
                since = now - self.window_seconds
                in_window = [t for t in self._admitted if t > since]
                if len(in_window) >= self.limit:
                    self._window_violations += 1
                    answer = _json_error(
                        429,
                        f"over {self.limit} requests in {self.window_seconds:g} seconds",
                        "throttled: window",
                    )
                    if self.retry_after_on_429:
                        wait = in_window[-self.limit] + self.window_seconds - now
                        answer.headers.append(("Retry-After", str(max(1, math.ceil(wait)))))
                    return index, answer
                self._admitted = [*in_window, now]
            return index, None

    def _handle(self, handler: _Handler) -> None:
        arrival = time.monotonic()
        index, throttled = self._arrive(arrival)
        request = HookRequest(index, handler.command, handler.path, tuple(handler.headers.items()), b"", ())
        answer: _Answer | None = None
        fault: Fault | None = None
        reason = "dropped"
        try:
            try:
                body = handler.read_body()
                body_error: _BodyError | None = None
            except _BodyError as exc:
                body, body_error = b"", exc
            request = replace(request, body=body, notifications=parse_notifications(body)[0] if body else ())
            if body_error is not None and body_error.status is None:
                reason = f"dropped: {body_error}"
            else:
                fault = self.faults.take(request)
                if fault is not None and fault.delay_seconds > 0:
                    self._stopping.wait(fault.delay_seconds)
                if fault is not None and fault.drop_connection:
                    reason = "fault: dropped"
                else:
                    answer = self._decide(request, body_error, fault, throttled)
                    reason = answer.reason
        except Exception:
            self._error(traceback.format_exc())
            answer = _json_error(500, "hook server bug", "server error")
            reason = answer.reason
        finally:
            record = RequestRecord(
                request,
                arrival,
                time.monotonic(),
                answer.status if answer else None,
                reason,
                fault,
                tuple(answer.headers) if answer else (),
            )
            # The request leaves "in flight" before its answer is written: a client that sends its next
            # request as soon as it reads this answer must not look like two requests in flight.
            with self._lock:
                self._in_flight -= 1
                self._records.append(record)
                if record.accepted:
                    self._accepted.extend(request.notifications)
                self._notify()
        if answer is None:
            handler.close_connection = True
        else:
            handler.write_answer(answer)

    def _decide(
        self,
        request: HookRequest,
        body_error: _BodyError | None,
        fault: Fault | None,
        throttled: _Answer | None,
    ) -> _Answer:
        if fault is not None and fault.status_code is not None:
            answer = self._fault_answer(fault)
            if fault.echo_authorization:
                quoted = request.header("authorization") or ""
                answer.body = json.dumps({"error": f"refused credentials: {quoted}"}).encode()
            return answer
        if throttled is not None:
            return throttled
        if request.method != "POST":
            answer = _json_error(405, f"method {request.method} is not allowed", "invalid: method")
            answer.headers.append(("Allow", "POST"))
            return answer
        if body_error is not None:
            answer = _json_error(body_error.status or 400, str(body_error), f"invalid: {body_error}")
            answer.close = True
            return answer
        if not _bearer_matches(request.header("authorization"), self.api_key):
            answer = _json_error(401, "missing or invalid Bearer token", "unauthorized")
            answer.headers.append(("WWW-Authenticate", "Bearer"))
            return answer
        media_type = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return _json_error(415, "Content-Type must be application/json", "invalid: content type")
        notifications, problem = parse_notifications(request.body)
        if problem is not None:
            return _json_error(400, problem, f"invalid: {problem}")
        if self.require_correlation_id and not request.correlation_id:
            return _json_error(400, "the x-correlation-id header is required", "invalid: no correlation id")
        rejected = [n for n in notifications if n[1] in self._reject]
        if rejected:
            return _json_error(
                self.reject_status,
                "rejected notification(s): " + ", ".join(external_id for _, external_id in rejected),
                "rejected",
                rejected=[{"scope": scope, "external_id": external_id} for scope, external_id in rejected],
            )
        status = self.success_status
        if status == 204:
            return _Answer(204, reason="accepted")
        return _Answer(
            status,
            json.dumps({"accepted": len(notifications)}).encode(),
            "accepted",
            [("Content-Type", "application/json")],
        )

    @staticmethod
    def _fault_answer(fault: Fault) -> _Answer:
        assert fault.status_code is not None
        if fault.body_size:
            kind = [("Content-Type", "text/plain")]
            return _Answer(fault.status_code, b"", "fault", kind, body_size=fault.body_size)
        if fault.body is None:
            answer = _json_error(fault.status_code, "injected fault", "fault", status=fault.status_code)
        else:
            body = fault.body.encode() if isinstance(fault.body, str) else fault.body
            kind = "application/json" if body.lstrip()[:1] in (b"{", b"[") else "text/plain; charset=utf-8"
            answer = _Answer(fault.status_code, body, "fault", [("Content-Type", kind)])
        header = fault.retry_after_header()
        if header is not None:
            answer.headers.append(("Retry-After", header))
        answer.headers.extend(fault.headers)
        return answer

    def __repr__(self) -> str:
        return f"HookServer({self.url}, {self.summary()})"


def _bearer_matches(header: str | None, key: str) -> bool:
    if header is None:
        return False
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def http_date_in(seconds: float) -> str:
    """Return the HTTP-date ``seconds`` from now (for building Retry-After values by hand)."""
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


@pytest.fixture(name="hook_server_factory")
def hook_server_factory_fixture() -> Iterator[Callable[..., HookServer]]:
    """Yield ``make(**HookServer options) -> started HookServer``; every server is stopped after the test,
    which fails if a server hit a bug of its own."""
    servers: list[HookServer] = []

    def make(**options: Any) -> HookServer:
        server = HookServer(**options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    errors = [error for server in servers for error in server.errors]
    assert not errors, "the hook server failed:\n" + "\n".join(errors)


@pytest.fixture(name="hook_server")
def hook_server_fixture(hook_server_factory: Callable[..., HookServer]) -> HookServer:
    """A started HookServer with the default settings."""
    return hook_server_factory()
