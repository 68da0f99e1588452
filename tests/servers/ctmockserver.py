"""commercetools for tests: ``@labdigital/commercetools-mock`` (npm, pinned in tests/ctmock) behind a proxy.

The session fixture ``ctmock`` installs the mock with npm when ``tests/ctmock/node_modules`` is missing,
starts it on a free port and waits for its "ready" line. The function fixture ``ct_proxy`` puts a
``CtProxy`` in front of it for one test; the proxy adds what the mock lacks, the way commercetools behaves:

- client credentials are checked (the mock issues a token to anyone): an unknown client or a wrong secret gets
  ``401 invalid_client``; a requested scope the client lacks gets ``400 invalid_scope``; the token response's
  ``scope`` is what was granted (the mock answers "todo");
- tokens live ``token_lifetime`` seconds (``expires_in`` says so and older tokens get ``401 invalid_token``),
  and ``revoke_tokens()`` invalidates every token issued so far (a 401 in the middle of a run);
- ``faults`` answers the next API requests with a status (502/503...) instead of forwarding them, and
  ``token_faults`` the next token requests;
- ``sort=id asc`` is honoured (the mock ignores sort for most resources), for the client's cursor paging;
- reading the project itself (``GET /<projectKey>``) takes ``view_project_settings`` (or a manage scope),
  as in commercetools: other scopes get ``403 insufficient_scope``.

Usage::

    def test_x(ct_proxy: CtProxy) -> None:
        client_id, secret = ct_proxy.add_client(scopes=["view_products:proj", "manage_subscriptions:proj"])
        env = ct_proxy.env("proj", client_id, secret)   # CTP_* variables
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

CTMOCK_DIR = Path(__file__).resolve().parent / "ctmock"
START_TIMEOUT = 30.0
INSTALL_TIMEOUT = 300.0


@dataclass
class CtMock:
    """The running commercetools-mock process."""

    process: subprocess.Popen[str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _install() -> None:
    if (CTMOCK_DIR / "node_modules" / "@labdigital" / "commercetools-mock").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: commercetools-mock tests need Node 20 and npm")
    command = "ci" if (CTMOCK_DIR / "package-lock.json").exists() else "install"
    done = subprocess.run(
        [npm, command, "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=CTMOCK_DIR,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    if done.returncode != 0:
        pytest.fail(f"npm {command} in {CTMOCK_DIR} failed:\n{done.stderr[-2000:]}")


def start_ctmock() -> CtMock:
    """Install (if needed) and start commercetools-mock on a free port; return once it is listening."""
    _install()
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: commercetools-mock tests need Node 20")
    process = subprocess.Popen(
        [node, "ctmock.mjs", "0"],
        cwd=CTMOCK_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    port: list[int] = []
    ready = threading.Event()
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith("ready ") and not port:
                port.append(int(line.split()[1]))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True, name="ctmock-output").start()
    if not ready.wait(START_TIMEOUT) or not port:
        process.kill()
        pytest.fail("commercetools-mock did not start:\n" + "".join(output[-40:]))
    return CtMock(process, port[0])


@dataclass
class _Client:
    secret: str
    scopes: tuple[str, ...]


@dataclass
class FaultQueue:
    """Statuses to answer the next API requests with, in order."""

    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def push(self, status: int, times: int = 1) -> None:
        with self.lock:
            self.statuses.extend([status] * times)

    def pop(self) -> int | None:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else None


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: int


class CtProxy:
    """A commercetools-like front for the mock (see the module docstring). Thread-safe."""

    def __init__(self, upstream_port: int, *, token_lifetime: float = 172800.0) -> None:
        self.upstream_port = upstream_port
        self.token_lifetime = token_lifetime
        self.faults = FaultQueue()
        self.token_faults = FaultQueue()
        self.token_requests = 0
        self.seen: list[Seen] = []
        self._clients: dict[str, _Client] = {}
        self._issued: dict[str, float] = {}
        self._granted: dict[str, tuple[str, ...]] = {}
        self._revoked_before = 0.0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True

    def start(self) -> CtProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_client(self, scopes: list[str], client_id: str | None = None) -> tuple[str, str]:
        """Register an API client allowed ``scopes``; return (client id, secret)."""
        client_id = client_id or "client-" + secrets.token_hex(4)
        secret = "ct-secret-" + secrets.token_urlsafe(16)
        with self._lock:
            self._clients[client_id] = _Client(secret, tuple(scopes))
        return client_id, secret

    def env(
        self, project: str, client_id: str, secret: str, scopes: list[str] | None = None
    ) -> dict[str, str]:
        """Return the CTP_* variables for this proxy (CTP_SCOPES only when ``scopes`` is given)."""
        env = {
            "CTP_PROJECT_KEY": project,
            "CTP_CLIENT_ID": client_id,
            "CTP_CLIENT_SECRET": secret,
            "CTP_AUTH_URL": self.url,
            "CTP_API_URL": self.url,
        }
        if scopes is not None:
            env["CTP_SCOPES"] = " ".join(scopes)
        return env

    def revoke_tokens(self) -> None:
        """Invalidate every token issued so far (their next use gets 401 invalid_token)."""
        with self._lock:
            self._revoked_before = time.monotonic()

    def api_requests(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if not s.path.startswith("/oauth")]

    # --- request handling (called from the server's threads) ---

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.seen.append(Seen(method, path, status))

    def token(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.token_requests += 1
        fault = self.token_faults.pop()
        if fault is not None:
            return fault, _oauth_error(fault, "temporarily_unavailable", "injected fault")
        client_id, secret = _basic(headers.get("Authorization"))
        with self._lock:
            client = self._clients.get(client_id or "")
        if client is None or secret is None or not secrets.compare_digest(client.secret, secret):
            message = "Please provide valid client credentials using HTTP Basic Authentication."
            return 401, _oauth_error(401, "invalid_client", message)
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        if form.get("grant_type") != "client_credentials":
            return 400, _oauth_error(400, "unsupported_grant_type", "grant_type must be client_credentials")
        requested = tuple(form.get("scope", "").split())
        unknown = [s for s in requested if s not in client.scopes]
        if unknown:
            return 400, _oauth_error(400, "invalid_scope", f"Invalid scopes: {' '.join(unknown)}")
        granted = requested or client.scopes
        query = urlencode({"grant_type": "client_credentials", "scope": " ".join(granted)})
        status, _, answer = self.forward(
            "POST", f"/oauth/token?{query}", {"Authorization": headers.get("Authorization")}, b""
        )
        data = json.loads(answer)
        if status == 200:
            data["scope"] = " ".join(granted)
            data["expires_in"] = int(self.token_lifetime) if self.token_lifetime >= 1 else self.token_lifetime
            with self._lock:
                self._issued[data["access_token"]] = time.monotonic()
                self._granted[data["access_token"]] = granted
        return status, data

    def token_problem(self, authorization: str | None) -> bool:
        scheme, _, value = (authorization or "").partition(" ")
        with self._lock:
            issued = self._issued.get(value.strip())
            revoked_before = self._revoked_before
        if scheme.lower() != "bearer" or issued is None:
            return True
        return issued <= revoked_before or time.monotonic() - issued > self.token_lifetime

    def may_read_project(self, authorization: str | None, project: str) -> bool:
        token = (authorization or "").partition(" ")[2].strip()
        with self._lock:
            granted = self._granted.get(token, ())
        allowed = {
            f"{p}:{project}" for p in ("view_project_settings", "manage_project_settings", "manage_project")
        }
        return not allowed.isdisjoint(granted)

    def forward(
        self, method: str, target: str, headers: dict[str, Any], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        return _forward(self.upstream_port, method, target, headers, body, timeout=10)


def _oauth_error(status: int, code: str, message: str) -> dict[str, Any]:
    return {
        "statusCode": status,
        "message": message,
        "errors": [{"code": code, "message": message}],
        "error": code,
        "error_description": message,
    }


def _basic(header: str | None) -> tuple[str | None, str | None]:
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except ValueError:
        return None, None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep else (None, None)


def _forward(
    port: int, method: str, target: str, headers: dict[str, Any], body: bytes, *, timeout: float
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send one request to the mock on ``port`` as it came (headers that are None left out)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = {k: v for k, v in headers.items() if v is not None}
        connection.request(method, target, body=body or None, headers=sent)
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


# More than any test creates: the mock has no upper bound on ``limit``.
_ALL: int = 1_000_000


def sorted_page(
    forward: Callable[[str, str, dict[str, Any], bytes], tuple[int, Any, bytes]],
    path: str,
    query: list[tuple[str, str]],
    headers: dict[str, Any],
) -> tuple[int, bytes]:
    """Answer a ``sort=id asc`` query the mock would not sort: fetch every match, sort by id, cut to the
    limit (a cursor pager over an unsorted answer would skip resources)."""
    limit = int(dict(query).get("limit", "20"))
    rest = [(k, v) for k, v in query if k not in ("sort", "limit", "offset")]
    status, _, body = forward("GET", f"{path}?{urlencode([*rest, ('limit', str(_ALL))])}", headers, b"")
    if status != 200:
        return status, body
    page = json.loads(body)
    results = sorted(page.get("results", []), key=lambda r: r["id"])[:limit]
    page.update(results=results, count=len(results), limit=limit, offset=0)
    page.pop("total", None)
    return status, json.dumps(page).encode()


def _handler(proxy: CtProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            proxy._record(self.command, self.path, status)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header(
                "X-Correlation-ID", self.headers.get("X-Correlation-ID") or "proxy-" + secrets.token_hex(6)
            )
            self.end_headers()
            self.wfile.write(body)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            if path == "/oauth/token":
                status, data = proxy.token(self.headers, body)
                self._answer(status, json.dumps(data).encode())
                return
            fault = proxy.faults.pop()
            if fault is not None:
                error = {
                    "statusCode": fault,
                    "message": "injected fault",
                    "errors": [
                        {
                            "code": "BadGateway" if fault == 502 else "OverCapacity",
                            "message": "injected fault",
                        }
                    ],
                }
                self._answer(fault, json.dumps(error).encode())
                return
            if proxy.token_problem(self.headers.get("Authorization")):
                error = {
                    "statusCode": 401,
                    "message": "invalid_token",
                    "errors": [{"code": "invalid_token", "message": "invalid_token"}],
                }
                self._answer(401, json.dumps(error).encode())
                return
            segments = [s for s in path.split("/") if s]
            authorization = self.headers.get("Authorization")
            if (
                self.command == "GET"
                and len(segments) == 1
                and not proxy.may_read_project(authorization, segments[0])
            ):
                missing = f"view_project_settings:{segments[0]}"
                message = f"Insufficient scope. One of the following scopes is missing: {missing}"
                error = {
                    "statusCode": 403,
                    "message": message,
                    "errors": [{"code": "insufficient_scope", "message": message}],
                }
                self._answer(403, json.dumps(error).encode())
                return
            headers = {
                "Authorization": self.headers.get("Authorization"),
                "Content-Type": self.headers.get("Content-Type"),
            }
            query = dict(parse_qsl(urlsplit(self.path).query))
            if self.command == "GET" and query.get("sort") == "id asc":
                parts = urlsplit(self.path)
                status, answer = sorted_page(proxy.forward, parts.path, parse_qsl(parts.query), headers)
            else:
                status, _, answer = proxy.forward(self.command, self.path, headers, body)
            self._answer(status, answer)

        do_GET = do_POST = do_DELETE = _handle

    return Handler


@pytest.fixture(scope="session")
def ctmock() -> Iterator[CtMock]:
    """The commercetools-mock process, started once per session."""
    mock = start_ctmock()
    yield mock
    mock.process.terminate()
    try:
        mock.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        mock.process.kill()


@pytest.fixture
def ct_proxy_factory(ctmock: CtMock) -> Iterator[Any]:
    """Yield ``make(token_lifetime=...) -> started CtProxy``; every proxy is stopped after the test."""
    proxies: list[CtProxy] = []

    def make(**options: Any) -> CtProxy:
        proxy = CtProxy(ctmock.port, **options).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        with contextlib.suppress(OSError):
            proxy.stop()


@pytest.fixture
def ct_proxy(ct_proxy_factory: Any) -> CtProxy:
    """A started CtProxy with commercetools' default token lifetime."""
    proxy: CtProxy = ct_proxy_factory()
    return proxy


def project_key() -> str:
    """Return a fresh project key: the mock creates projects on first use, so tests never share state."""
    return "proj-" + secrets.token_hex(4)


# --- a sorting front for cursor paging over more than one page (added for the backfill tests) ---

# More than any test creates: the front asks the mock for every match, then sorts and cuts the page itself.


class SortingFront:
    """A thin front for commercetools-mock that pages ``sort=id asc`` queries right whatever their size.

    The mock ignores ``sort`` on its query endpoints and answers in insertion order, so a cursor pager
    (``where id > "<last>"``, ``sort=id asc``) over more matches than a page would skip resources. This front
    forwards every request unchanged except those queries, which it answers from *all* the matches, sorted by
    id and cut to the requested limit (``CtProxy`` sorts only the first 500 matches). No credential checks:
    the mock issues a token to any client.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {
                    "Authorization": self.headers.get("Authorization"),
                    "Content-Type": self.headers.get("Content-Type"),
                }
                parts = urlsplit(self.path)
                query = parse_qsl(parts.query)
                if self.command == "GET" and ("sort", "id asc") in query:
                    status, answer = sorted_page(front.forward, parts.path, query, headers)
                else:
                    status, _, answer = front.forward(self.command, self.path, headers, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_DELETE = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> SortingFront:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def forward(
        self, method: str, target: str, headers: dict[str, Any], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        return _forward(self.upstream_port, method, target, headers, body, timeout=30)


@pytest.fixture(scope="session")
def ctmock_sorted(ctmock: CtMock) -> Iterator[SortingFront]:
    """A ``SortingFront`` over the session's commercetools-mock."""
    front = SortingFront(ctmock.port).start()
    yield front
    front.stop()
