"""A hostile or unlucky push endpoint (issue 13, items 1 to 5): the push server as ``ctsync run`` serves it,
in a subprocess where memory and file descriptors are measured, or in this event loop where requests are
timed; a local certificate server stands in for Google's and can fail, hang and count its fetches."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from google.auth import crypt, jwt

from adapters import push
from tests.integration.test_push import ACCOUNT, AUDIENCE, KID, _key_and_cert, envelope, service, update
from tests.servers.hookserver import HookServer

pytestmark = pytest.mark.integration

CTSYNC = [sys.executable, "-m", "consumer.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def signed(key: Any, kid: str = KID, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": ACCOUNT,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        **overrides,
    }
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    encoded: bytes = jwt.encode(crypt.RSASigner.from_string(pem, key_id=kid), claims)
    return encoded.decode()


# ------------------------------------------------------------------------- ctsync run, push source


@dataclass
class PushService:
    proc: subprocess.Popen[bytes]
    push_url: str
    ops_url: str

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    def stop(self) -> tuple[int, list[dict[str, Any]], str]:
        self.proc.send_signal(signal.SIGTERM)
        stdout, stderr = self.proc.communicate(timeout=30)
        events = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
        return self.proc.returncode, events, stderr.decode()


def ctsync_environment(tmp_path: Path, **env: str) -> dict[str, str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUSH_", "PUBSUB_"))
    }
    environ.update(
        CTSYNC_SOURCE="push",
        CTSYNC_STATE_URL="memory://",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        CTSYNC_DRAIN_TIMEOUT_SECONDS="2",
        **env,
    )
    return environ


@pytest.fixture
def push_service(tmp_path: Path) -> Iterator[Callable[..., PushService]]:
    started: list[PushService] = []

    def start(**env: str) -> PushService:
        push_port, ops_port = free_port(), free_port()
        environ = ctsync_environment(
            tmp_path, PUSH_LISTEN=f"127.0.0.1:{push_port}", CTSYNC_HTTP_LISTEN=f"127.0.0.1:{ops_port}", **env
        )
        proc = subprocess.Popen(
            [*CTSYNC, "run"], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
        )
        running = PushService(proc, f"http://127.0.0.1:{push_port}/", f"http://127.0.0.1:{ops_port}")
        started.append(running)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{running.ops_url}/healthz", timeout=2).status_code == 200:
                    return running
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "ctsync never served /healthz"
            time.sleep(0.1)

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.communicate()


UNAUTHENTICATED = {"PUSH_ALLOW_UNAUTHENTICATED": "true"}


# ---------------------------------------------------------------------------------------- item 1


def test_a_chunked_body_is_counted_and_refused_at_the_cap(
    push_service: Callable[..., PushService], hook_server: HookServer, tmp_path: Path
) -> None:
    """96 MiB sent chunked (no Content-Length): 413 at 16 MiB, memory grows by about the cap, not the
    body, and nothing is dead-lettered; the next push is delivered."""
    svc = push_service(**hook_server.env(), **UNAUTHENTICATED)
    before = svc.rss()
    piece = b"A" * (1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(96):
            yield piece

    with httpx.Client(timeout=30) as client:
        answer = client.post(svc.push_url, content=chunks())
        assert answer.status_code == 413, answer.text
        grown = svc.rss("VmHWM") - before
        assert grown < 48 * 1024 * 1024, grown
        ok = client.post(svc.push_url, content=orjson.dumps(envelope(update("p-1"))))
        assert ok.status_code == 204, ok.text
    code, events, stderr = svc.stop()
    assert code == 0, stderr
    assert [e for _, e in hook_server.notifications] == ["p-1"]
    assert not (tmp_path / "dead.jsonl").exists() or (tmp_path / "dead.jsonl").read_bytes() == b""
    assert [e["status"] for e in events if e["event"] == "push.rejected"] == [413]


# ---------------------------------------------------------------------------------------- item 2


async def test_the_in_flight_place_is_taken_before_the_body_is_read(
    hook_server: HookServer, tmp_path: Path
) -> None:
    """CTSYNC_MAX_IN_FLIGHT=5 and 20 requests whose bodies trickle: 5 are held, 15 get 429 at once; the
    5 are delivered once their bodies arrive, and the 15 when Pub/Sub pushes them again."""
    unused = "http://127.0.0.1:9/certs"
    async with service(hook_server, tmp_path, unused, audience=False, CTSYNC_MAX_IN_FLIGHT="5") as svc:
        port = int(svc.url.rsplit(":", 1)[1].strip("/"))
        bodies = [orjson.dumps(envelope(update(f"p-{i}"), message_id=str(i))) for i in range(20)]
        streams = []
        for body in bodies:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body[:10])
            await writer.drain()
            streams.append((reader, writer, body))

        async def answer(reader: asyncio.StreamReader, seconds: float) -> int | None:
            try:
                async with asyncio.timeout(seconds):
                    line = await reader.readline()
            except TimeoutError:
                return None
            return int(line.split()[1])

        first = await asyncio.gather(*(answer(r, 2.0) for r, _, _ in streams))
        held = [i for i, status in enumerate(first) if status is None]
        assert len(held) == 5 and sorted(s for s in first if s is not None) == [429] * 15, first
        for i in held:
            reader, writer, body = streams[i]
            writer.write(body[10:])
            await writer.drain()
        finished = await asyncio.gather(*(answer(streams[i][0], 15.0) for i in held))
        assert finished == [204] * 5
        for _, writer, _ in streams:
            writer.close()

        # Pub/Sub pushes the 15 it was refused again, with backoff, until they are taken: nothing is lost.
        async def redeliver(body: bytes) -> int:
            deadline = time.monotonic() + 20
            while (status := (await svc.client.post(svc.url, content=body)).status_code) == 429:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            return status

        again = await asyncio.gather(*(redeliver(bodies[i]) for i in range(20) if i not in held))
        assert again == [204] * 15
    assert sorted(e for _, e in hook_server.notifications) == sorted(f"p-{i}" for i in range(20))


async def test_a_body_that_never_ends_gives_its_place_back(
    hook_server: HookServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CTSYNC_MAX_IN_FLIGHT=1 and a body that stops halfway: 408 after the body deadline, and the place
    it held serves the next push."""
    monkeypatch.setattr(push, "BODY_TIMEOUT_SECONDS", 1.0)
    unused = "http://127.0.0.1:9/certs"
    async with service(hook_server, tmp_path, unused, audience=False, CTSYNC_MAX_IN_FLIGHT="1") as svc:
        port = int(svc.url.rsplit(":", 1)[1].strip("/"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(0.3)
        assert (await svc.push(envelope(update("p-late")))).status_code == 429
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        assert status_line.split()[1] == b"408"
        writer.close()
        assert (await svc.push(envelope(update("p-6")))).status_code == 204
    assert [e for _, e in hook_server.notifications] == ["p-6"]


# ---------------------------------------------------------------------------------------- item 3


def test_connections_that_never_finish_their_headers_are_bounded_and_cut(
    push_service: Callable[..., PushService], hook_server: HookServer
) -> None:
    """250 connections that stop in the middle of their headers, against PUSH_MAX_CONNECTIONS=50 and
    PUSH_HEADER_TIMEOUT_SECONDS=5: the server keeps at most 50 of them (well before the deadline), /healthz
    answers all along, every one is closed by the deadline, and a valid push then gets through."""
    svc = push_service(
        **hook_server.env(), **UNAUTHENTICATED, PUSH_MAX_CONNECTIONS="50", PUSH_HEADER_TIMEOUT_SECONDS="5"
    )
    baseline = svc.fds()
    host, port = "127.0.0.1", int(svc.push_url.rsplit(":", 1)[1].strip("/"))
    flood: list[socket.socket] = []
    closed: set[socket.socket] = set()

    def still_open() -> int:
        """How many flooding connections the server has not closed yet (an EOF or reset says it did)."""
        readable, _, _ = select.select([c for c in flood if c not in closed], [], [], 0)
        for conn in readable:
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(1024) == b""
            closed.add(conn)
        return len(flood) - len(closed)

    try:
        started = time.monotonic()
        for _ in range(250):
            conn = socket.create_connection((host, port), timeout=5)
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")
            flood.append(conn)
        # The 200 over the cap are closed as soon as they are accepted, long before the header deadline.
        poll(lambda: still_open() <= 50, 4.0, "the connections over PUSH_MAX_CONNECTIONS to be closed")
        assert time.monotonic() - started < 5.0
        assert svc.fds() - baseline <= 50 + 10
        assert httpx.get(f"{svc.ops_url}/healthz", timeout=2).status_code == 200
        # The 50 it kept are closed once their headers are overdue.
        poll(lambda: still_open() == 0, 15.0, "the header deadline to close every connection")
        assert svc.fds() - baseline <= 5
    finally:
        for conn in flood:
            conn.close()
    answer = httpx.post(svc.push_url, content=orjson.dumps(envelope(update("p-3"))), timeout=20)
    assert answer.status_code == 204, answer.text
    code, _, stderr = svc.stop()
    assert code == 0, stderr
    assert [e for _, e in hook_server.notifications] == ["p-3"]


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


# ---------------------------------------------------------------------------------------- item 4


class CertificateServer:
    """Google's certificate endpoint, switchable to failing (500) or hanging, counting its fetches."""

    def __init__(self, certs: dict[str, str], max_age: int = 300) -> None:
        self.certs = certs
        self.max_age = max_age
        self.mode = "ok"
        self.fetches = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.fetches += 1
                    mode = owner.mode
                if mode == "hang":
                    time.sleep(5)
                if mode != "ok":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(owner.certs).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", f"public, max-age={owner.max_age}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/oauth2/v1/certs"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def google() -> Iterator[tuple[Any, CertificateServer]]:
    key, cert = _key_and_cert("google-test")
    server = CertificateServer({KID: cert}, max_age=1)
    yield key, server
    server.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _part(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


async def test_junk_tokens_are_refused_before_any_certificate_is_fetched(
    hook_server: HookServer, tmp_path: Path, google: tuple[Any, CertificateServer]
) -> None:
    key, certs = google
    certs.mode = "fail"
    future = int(time.time()) + 600
    junk = [
        "a.b.c",
        "not-a-token",
        f"{_part({'alg': 'none', 'kid': KID})}.{_part({'exp': future})}.",
        f"{_part({'alg': 'RS256'})}.{_part({'exp': future})}.sig",
        signed(key, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        signed(key, iss="https://evil.example.com"),
    ]
    async with service(hook_server, tmp_path, certs.url) as svc:
        answers = await asyncio.gather(*(svc.push(envelope(update("p-4")), t) for t in junk))
    assert [a.status_code for a in answers] == [401] * len(junk)
    assert certs.fetches == 0 and hook_server.notifications == []


async def test_one_fetch_at_a_time_and_none_during_the_backoff(
    hook_server: HookServer,
    tmp_path: Path,
    google: tuple[Any, CertificateServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing fetched yet and Google hanging, then failing: ten pushes share one fetch and get 503; ten
    more during the backoff get 503 at once without a fetch; once Google answers, pushes are delivered."""
    # A longer first backoff than the default 1 s (4-8 s with its jitter), so that a loaded machine cannot
    # outlast it mid-test.
    monkeypatch.setattr(push, "CERTS_RETRY_FIRST_SECONDS", 8.0)
    key, certs = google
    certs.mode = "hang"
    async with service(hook_server, tmp_path, certs.url) as svc:
        first = await asyncio.gather(*(svc.push(envelope(update(f"p-{i}")), signed(key)) for i in range(10)))
        assert [a.status_code for a in first] == [503] * 10 and certs.fetches == 1
        certs.mode = "fail"
        started = time.monotonic()
        again = await asyncio.gather(*(svc.push(envelope(update(f"p-{i}")), signed(key)) for i in range(10)))
        assert [a.status_code for a in again] == [503] * 10 and certs.fetches == 1
        assert time.monotonic() - started < 2.0
        # Google answers again: after the backoff the next push fetches and is delivered.
        certs.mode = "ok"
        deadline = time.monotonic() + 15
        while (answer := await svc.push(envelope(update("p-ok")), signed(key))).status_code != 204:
            assert answer.status_code == 503 and time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert certs.fetches == 2 and [e for _, e in hook_server.notifications] == ["p-ok"]


@pytest.mark.parametrize("failure", ["fail", "hang"])
async def test_the_last_good_certificates_serve_while_google_fails(
    hook_server: HookServer, tmp_path: Path, google: tuple[Any, CertificateServer], failure: str
) -> None:
    key, certs = google
    async with service(hook_server, tmp_path, certs.url) as svc:
        assert (await svc.push(envelope(update("p-0")), signed(key))).status_code == 204
        certs.mode = failure
        await asyncio.sleep(1.2)  # past the certificates' max-age of 1 s
        started = time.monotonic()
        answers = await asyncio.gather(
            *(svc.push(envelope(update(f"p-{i}"), message_id=str(i)), signed(key)) for i in range(1, 21))
        )
        took = time.monotonic() - started
        assert [a.status_code for a in answers] == [204] * 20
        assert took < 4.0, took  # nobody waited for the failing (or hanging) fetch
        # Tokens from unknown keys do not make a fetch each either.
        rogue, _ = _key_and_cert("rogue")
        refused = await asyncio.gather(
            *(svc.push(envelope(update("p-x")), signed(rogue, kid="k2")) for _ in range(20))
        )
        assert [a.status_code for a in refused] == [401] * 20
    assert certs.fetches <= 3, certs.fetches
    assert len(hook_server.notifications) == 21


# ---------------------------------------------------------------------------------------- item 5


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, ["PUSH_AUDIENCE", "PUSH_SERVICE_ACCOUNT"]),
        ({"PUSH_AUDIENCE": AUDIENCE}, ["PUSH_SERVICE_ACCOUNT"]),
    ],
)
def test_push_without_authentication_refuses_to_start(
    tmp_path: Path, hook_server: HookServer, env: dict[str, str], named: list[str]
) -> None:
    environ = ctsync_environment(
        tmp_path, **hook_server.env(), PUSH_LISTEN="127.0.0.1:0", CTSYNC_HTTP_LISTEN="127.0.0.1:0", **env
    )
    done = subprocess.run([*CTSYNC, "run"], env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    problems = [line.strip().split(":")[0] for line in done.stderr.splitlines()[1:]]
    assert problems == named
    assert "PUSH_ALLOW_UNAUTHENTICATED=true" in done.stderr


def test_explicitly_unauthenticated_push_warns_and_says_so_in_metrics(
    push_service: Callable[..., PushService], hook_server: HookServer
) -> None:
    svc = push_service(**hook_server.env(), **UNAUTHENTICATED)
    scraped = httpx.get(f"{svc.ops_url}/metrics", timeout=5).text
    assert "ctsync_push_unauthenticated 1.0" in scraped
    answer = httpx.post(svc.push_url, content=orjson.dumps(envelope(update("p-5"))), timeout=20)
    assert answer.status_code == 204
    code, events, stderr = svc.stop()
    assert code == 0, stderr
    [warning] = [e for e in events if e["event"] == "config.warning"]
    assert warning["variable"] == "PUSH_ALLOW_UNAUTHENTICATED" and "without" in warning["reason"]


async def test_a_fully_authenticated_push_source_is_not_flagged() -> None:
    for account, authenticated in ((ACCOUNT, True), (None, False)):
        verifier = push.OidcVerifier(AUDIENCE, account)
        assert push.PushSource(max_in_flight=1, verifier=verifier).authenticated is authenticated
        await verifier.close()
    assert push.PushSource(max_in_flight=1).authenticated is False
