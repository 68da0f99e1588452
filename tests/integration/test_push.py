"""The Pub/Sub push endpoint: the real uvicorn server and the whole pipeline in this process, against the
local hook server. Tokens are signed with a key made here; its certificate is served by a local HTTP
server that verification is pointed at, as Google's would be."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from adapters import push
from consumer.cli import wiring
from consumer.config import load_settings
from tests.servers.hookserver import Fault, HookServer

pytestmark = pytest.mark.integration

AUDIENCE = "https://ctsync.example.com/push"
ACCOUNT = "pubsub-push@acme-prod.iam.gserviceaccount.com"
KID = "test-key-1"


@dataclass
class Keys:
    google: Any
    rogue: Any
    certs: dict[str, str]


def _key_and_cert(name: str) -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def keys() -> Keys:
    google, cert = _key_and_cert("google-test")
    rogue, _ = _key_and_cert("rogue")
    return Keys(google, rogue, {KID: cert})


@pytest.fixture(scope="module")
def certs_url(keys: Keys) -> Iterator[str]:
    """Serve the certificates the way https://www.googleapis.com/oauth2/v1/certs does."""
    body = json.dumps(keys.certs).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=300")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    server.shutdown()
    server.server_close()


def token(key: Any, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": ACCOUNT,
        "email_verified": True,
        "sub": "1234567890",
        "iat": now,
        "exp": now + 3600,
        **overrides,
    }
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = crypt.RSASigner.from_string(pem, key_id=KID)
    encoded: bytes = jwt.encode(signer, claims)
    return encoded.decode()


def unsigned(**overrides: Any) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": ACCOUNT,
        "email_verified": True,
        "iat": now,
        "exp": now + 600,
        **overrides,
    }
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def update(resource_id: str) -> bytes:
    return orjson.dumps(
        {
            "notificationType": "ResourceUpdated",
            "projectKey": "acme",
            "resource": {"typeId": "product", "id": resource_id},
            "version": 2,
            "oldVersion": 1,
            "modifiedAt": "2026-01-01T00:00:00.000Z",
        }
    )


def envelope(data: bytes, message_id: str = "1001", attempt: int | None = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "messageId": message_id,
            "message_id": message_id,
            "attributes": {},
            "publishTime": "2026-01-01T00:00:00.000Z",
        },
        "subscription": "projects/acme-prod/subscriptions/ctsync-push",
    }
    if attempt is not None:
        body["deliveryAttempt"] = attempt
    return body


@dataclass
class Service:
    url: str
    client: httpx.AsyncClient
    dead_letters: Path
    stop: asyncio.Event

    async def push(self, body: Any, bearer: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return await self.client.post(self.url, content=content, headers=headers, **kw)

    def letters(self) -> list[dict[str, Any]]:
        if not self.dead_letters.exists():
            return []
        return [orjson.loads(line) for line in self.dead_letters.read_bytes().splitlines()]


@asynccontextmanager
async def service(
    hooks: HookServer, tmp_path: Path, certs_url: str, *, audience: bool = True, **env: str
) -> AsyncIterator[Service]:
    """Run ctsync's push source and pipeline in this event loop until the block ends."""
    environ = {
        **hooks.env(),
        "CTSYNC_SOURCE": "push",
        "PUSH_LISTEN": "127.0.0.1:0",
        "CTSYNC_HTTP_LISTEN": "127.0.0.1:0",
        "CTSYNC_STATE_URL": "memory://",
        "CTSYNC_DEAD_LETTER_URL": f"file:{tmp_path}/dead.jsonl",
        "CTSYNC_DRAIN_TIMEOUT_SECONDS": "2",
        **env,
    }
    if audience:
        environ.update(PUSH_AUDIENCE=AUDIENCE, PUSH_SERVICE_ACCOUNT=ACCOUNT)
    else:
        environ.update(PUSH_ALLOW_UNAUTHENTICATED="true")
    settings = load_settings(environ=environ)
    source = await push.open_source(wiring.push_options(settings), certs_url=certs_url)
    assert isinstance(source, push.PushSource)
    built = await wiring.build(settings, source, finite=False)
    stop = asyncio.Event()
    running = asyncio.create_task(built.pipeline.run(stop))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            yield Service(f"http://{source.address}/", client, tmp_path / "dead.jsonl", stop)
    finally:
        stop.set()
        try:
            async with asyncio.timeout(15):
                await running
        finally:
            await built.aclose()


async def test_valid_token_is_answered_2xx_once_delivered(
    hook_server: HookServer, tmp_path: Path, certs_url: str, keys: Keys
) -> None:
    async with service(hook_server, tmp_path, certs_url) as svc:
        answer = await svc.push(envelope(update("p-1")), token(keys.google))
        assert answer.status_code == 204, answer.text
        # 2xx only once the hook accepted the notification.
        assert [e for _, e in hook_server.notifications] == ["p-1"]


async def test_bad_tokens_are_rejected(
    hook_server: HookServer, tmp_path: Path, certs_url: str, keys: Keys
) -> None:
    now = int(time.time())
    cases: list[tuple[str, str | None, int]] = [
        ("missing", None, 401),
        ("expired", token(keys.google, iat=now - 7200, exp=now - 3600), 401),
        ("unsigned", unsigned(), 401),
        ("signed by another key", token(keys.rogue), 401),
        ("not issued by Google", token(keys.google, iss="https://evil.example.com"), 401),
        ("wrong audience", token(keys.google, aud="https://other.example.com/push"), 403),
        ("wrong service account", token(keys.google, email="someone@evil.iam.gserviceaccount.com"), 403),
        ("email not verified", token(keys.google, email_verified=False), 403),
    ]
    async with service(hook_server, tmp_path, certs_url) as svc:
        for case, bearer, status in cases:
            answer = await svc.push(envelope(update("p-2")), bearer)
            assert answer.status_code == status, (case, answer.text)
            assert answer.json()["error"], case
            if bearer is not None:
                assert bearer not in answer.text
    assert hook_server.notifications == []


async def test_malformed_envelopes_get_400_with_a_reason(
    hook_server: HookServer, tmp_path: Path, certs_url: str, keys: Keys
) -> None:
    bad: list[tuple[Any, str]] = [
        (b"{not json", "not JSON"),
        ([1, 2], "not a JSON object"),
        ({"subscription": "x"}, "no message"),
        ({"message": {"data": "e30="}}, "messageId"),
        ({"message": {"data": "***", "messageId": "7"}}, "base64"),
        ({"message": {"data": "e30=", "messageId": "7"}, "deliveryAttempt": "two"}, "deliveryAttempt"),
    ]
    async with service(hook_server, tmp_path, certs_url) as svc:
        for body, reason in bad:
            answer = await svc.push(body, token(keys.google))
            assert answer.status_code == 400, (body, answer.text)
            assert reason in answer.json()["error"]
    assert hook_server.request_count == 0


async def test_poison_payload_is_dead_lettered_and_answered_2xx(
    hook_server: HookServer, tmp_path: Path, certs_url: str, keys: Keys
) -> None:
    async with service(hook_server, tmp_path, certs_url, audience=False) as svc:
        answer = await svc.push(envelope(b"{not json", message_id="4242", attempt=3))
        assert answer.status_code == 204, answer.text
        [letter] = svc.letters()
    assert letter["payload"] == "{not json"
    assert letter["source"] == "push" and letter["position"] == "4242"
    assert letter["source_fields"]["message_id"] == "4242"
    assert letter["source_fields"]["delivery_attempt"] == 3
    assert hook_server.request_count == 0


async def test_saturated_service_answers_429_and_handed_back_503(
    hook_server_factory: Any, tmp_path: Path, certs_url: str, keys: Keys
) -> None:
    hooks: HookServer = hook_server_factory()
    # The hook keeps failing: the first message stays in flight, retried, until the service stops.
    hooks.faults.always = Fault.status(503)
    async with service(hooks, tmp_path, certs_url, audience=False, CTSYNC_MAX_IN_FLIGHT="1") as svc:
        first = asyncio.create_task(svc.push(envelope(update("p-3"), message_id="1")))
        await hooks.wait_for_async(lambda: hooks.request_count >= 1, timeout=10)
        second = await svc.push(envelope(update("p-4"), message_id="2"))
        assert second.status_code == 429, second.text
        # Stopping hands the first message back: Pub/Sub is told to redeliver it.
        svc.stop.set()
        answer = await first
        assert answer.status_code == 503, answer.text


def test_ctsync_run_with_push_source_answers_and_stops_on_sigterm(
    hook_server: HookServer, tmp_path: Path
) -> None:
    """As users run it: uvicorn inside ``ctsync run`` leaves SIGTERM to the CLI, which drains and exits 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "PUSH_", "PUBSUB_"))
    }
    environ.update(
        hook_server.env(),
        CTSYNC_SOURCE="push",
        PUSH_LISTEN=f"127.0.0.1:{port}",
        CTSYNC_HTTP_LISTEN="127.0.0.1:0",
        CTSYNC_STATE_URL="memory://",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        PUSH_ALLOW_UNAUTHENTICATED="true",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "run"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 20
        answer = None
        while answer is None:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/", content=orjson.dumps(envelope(update("p-9"))), timeout=20
                )
            except httpx.ConnectError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the push endpoint never listened"
                time.sleep(0.1)
        assert answer.status_code == 204, answer.text
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    events = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
    [stopped] = [e for e in events if e["event"] == "service.stopped"]
    assert stopped["signal"] == "SIGTERM" and stopped["acked"] == 1
    assert [e for _, e in hook_server.notifications] == ["p-9"]
