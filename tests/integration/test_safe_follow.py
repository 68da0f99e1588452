"""``ctsync run --follow`` goes on like ``tail -F`` when the file is rotated (a new file under the name) or
truncated, and says so in the audit log."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import CTSYNC

pytestmark = pytest.mark.integration

PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")


def lines(*ids: str) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme",
                "resource": {"typeId": "product", "id": resource_id},
                "version": 2,
                "oldVersion": 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        )
        + b"\n"
        for resource_id in ids
    )


def test_follow_survives_rotation_and_truncation(tmp_path: Path, hook_server: HookServer) -> None:
    path = tmp_path / "changes.jsonl"
    path.write_bytes(lines("a-1", "a-2"))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    environ.update(
        hook_server.env(),
        CTSYNC_SOURCE=f"file:{path}",
        CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        CTSYNC_HTTP_LISTEN="127.0.0.1:0",
    )
    log = tmp_path / "ctsync.log"
    with log.open("wb") as out:
        service = subprocess.Popen([*CTSYNC, "run", "--follow"], env=environ, cwd=tmp_path, stdout=out)

    def notified() -> list[str]:
        return sorted(e for _, e in hook_server.notifications)

    def wait_for(expected: list[str]) -> None:
        deadline = time.monotonic() + 30
        while notified() != expected:
            assert service.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (notified(), log.read_text()[-3000:])
            time.sleep(0.1)

    try:
        wait_for(["a-1", "a-2"])
        # Rotation: the file is moved away, and a new one takes its name (logrotate's create mode).
        path.rename(tmp_path / "changes.jsonl.1")
        path.write_bytes(lines("b-1"))
        wait_for(["a-1", "a-2", "b-1"])
        # Truncation in place (logrotate's copytruncate), then a shorter content.
        with path.open("r+b") as file:
            file.truncate(0)
        deadline = time.monotonic() + 30
        while b'"file.truncated"' not in log.read_bytes():
            assert time.monotonic() < deadline, "the truncation went unnoticed"
            time.sleep(0.1)
        with path.open("ab") as file:
            file.write(lines("c-1"))
        wait_for(["a-1", "a-2", "b-1", "c-1"])
        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0
    finally:
        service.kill()
    events = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]
    names = [e["event"] for e in events]
    assert "file.rotated" in names and "file.truncated" in names
