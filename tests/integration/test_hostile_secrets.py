"""Secrets never printed (issue 13, items 10 and 11; issue 14, item 13): one redaction for every output,
secret values of any length, the Basic credential of the configured commercetools client, and ordinary
words after "Bearer" left readable."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from consumer import audit
from tests.servers.hookserver import HookServer

CTSYNC = [sys.executable, "-m", "consumer.cli"]
CLIENT_ID = "ctsync-client-7"
CLIENT_SECRET = "Zx81-client-secret-QwErTy"
BASIC = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()


# ------------------------------------------------------------------------------------- the redactor


def test_ordinary_words_after_bearer_or_basic_stay_readable() -> None:
    for text in (
        "no Bearer token",
        "Bearer authentication failed",
        "expected Basic or Bearer credentials",
        "send a Bearer token in the Authorization header",
    ):
        assert audit.redact(text, ()) == text


def test_credentials_after_bearer_or_basic_are_redacted() -> None:
    jwt_like = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    assert audit.redact(f"got Bearer {jwt_like} back", ()) == f"got Bearer {audit.REDACTED} back"
    assert audit.redact(f"Authorization: Basic {BASIC}", ()) == f"Authorization: Basic {audit.REDACTED}"
    assert audit.redact("bearer 0123456789abcdefghij", ()) == f"bearer {audit.REDACTED}"


@pytest.mark.parametrize("secret", ["x", "q7", "p@s", "abcd1", "0123456789abcdef"])
def test_secret_values_of_any_length_are_redacted_in_free_text(secret: str) -> None:
    assert secret not in audit.redact(f"server said: {secret}!", [secret])


def test_short_secrets_are_redacted_in_log_values_without_mangling_the_line() -> None:
    stream = io.BytesIO()
    audit.configure(level="INFO", secrets=["ev", "s3cr3t-value"], stream=stream)
    structlog.get_logger("test").warning(
        audit.SINK_UNUSABLE, detail="the key ev was refused", nested={"why": ["ev", "s3cr3t-value"]}
    )
    write = audit.info_writer()
    assert write is not None
    write(audit.BATCH_SENT, {"detail": "ev again"})
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    # The keys and the event names are intact; only the values lost the secret.
    assert first["event"] == "sink.unusable" and second["event"] == "batch.sent"
    assert first["detail"] == f"the key {audit.REDACTED} was refused"
    assert first["nested"] == {"why": [audit.REDACTED, audit.REDACTED]}
    assert second["detail"] == f"{audit.REDACTED} again"
    audit.configure(level="INFO", stream=io.BytesIO())


def test_the_process_secrets_are_the_default() -> None:
    audit.configure(level="INFO", secrets=["k9"], stream=io.BytesIO())
    try:
        assert audit.redact("a k9 b") == f"a {audit.REDACTED} b"
    finally:
        audit.configure(level="INFO", stream=io.BytesIO())


# ---------------------------------------------------------------- item 11: check and backfill


@pytest.fixture
def echoing_auth_server() -> Iterator[str]:
    """A commercetools auth and API server that echoes everything it was sent in its error bodies."""

    class Handler(BaseHTTPRequestHandler):
        def _echo(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("latin-1")
            authorization = self.headers.get("Authorization") or ""
            decoded = ""
            if authorization.startswith("Basic "):
                decoded = base64.b64decode(authorization[6:]).decode()
            answer = json.dumps(
                {
                    "statusCode": 401,
                    "error": "invalid_client",
                    "error_description": f"refused {authorization} ({decoded}) for {body}",
                    "message": f"refused {authorization} ({decoded})",
                    "errors": [{"code": "invalid_client", "message": f"{authorization} {decoded}"}],
                }
            ).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = _echo

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUSH_", "PUBSUB_"))
    }
    environ.update(
        CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        **env,
    )
    return subprocess.run(
        [*CTSYNC, *args], env=environ, capture_output=True, text=True, timeout=90, cwd=tmp_path
    )


@pytest.mark.integration
@pytest.mark.parametrize("command", [("check",), ("check", "--json"), ("backfill",)])
def test_check_and_backfill_never_print_the_client_secret(
    tmp_path: Path, echoing_auth_server: str, hook_server: HookServer, command: tuple[str, ...]
) -> None:
    env = {
        "CTP_PROJECT_KEY": "acme",
        "CTP_CLIENT_ID": CLIENT_ID,
        "CTP_CLIENT_SECRET": CLIENT_SECRET,
        "CTP_AUTH_URL": echoing_auth_server,
        "CTP_API_URL": echoing_auth_server,
        "CTP_SCOPES": "view_products:acme",
        "CTSYNC_SOURCE": f"file:{tmp_path}/none.jsonl",
        **hook_server.env(),
    }
    done = _run(tmp_path, env, *command)
    assert done.returncode != 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    # The refusal itself is still reported: only the credentials are gone.
    assert "invalid_client" in output and "refused" in output
    for secret in (CLIENT_SECRET, BASIC, f"{CLIENT_ID}:{CLIENT_SECRET}", hook_server.api_key):
        assert secret not in output, (secret, output[-2000:])
