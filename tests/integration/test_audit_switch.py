"""The audit trail survives ``CTSYNC_LOG_LEVEL=WARNING`` and has its own switch, ``CTSYNC_AUDIT`` (issue 17,
item 11): a real ``ctsync replay`` of the sample, then ``ctsync audit`` over what it wrote."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.test_audit_query import BURST_PRODUCT, CTSYNC, SAMPLE, _environ, audit
from tests.servers.hookserver import HookServer

pytestmark = pytest.mark.integration

SEVERITIES = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def replay(tmp_path: Path, **extra: str) -> tuple[Path, list[dict[str, Any]]]:
    with HookServer() as hooks:
        done = subprocess.run(
            [*CTSYNC, "replay", str(SAMPLE)],
            env=_environ(tmp_path, {**hooks.env(), **extra}),
            capture_output=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr
    log = tmp_path / "audit.jsonl"
    log.write_bytes(done.stdout)
    return log, [orjson.loads(line) for line in done.stdout.splitlines()]


def test_at_warning_the_trail_is_whole_and_ctsync_audit_answers(tmp_path: Path) -> None:
    log, events = replay(tmp_path, CTSYNC_LOG_LEVEL="WARNING")
    names = [e["event"] for e in events]
    assert names.count("message.received") == names.count("message.acked") == 52
    assert "batch.sent" in names and "service.started" in names and "service.stopped" in names
    # Every line classifies itself for Cloud Logging and the shippers.
    assert all(e["severity"] in SEVERITIES and e["message"].startswith(e["event"]) for e in events)
    invalid = next(e for e in events if e["event"] == "message.invalid")
    assert invalid["severity"] == "WARNING" and invalid["message"].startswith("message.invalid: ")
    story = orjson.loads(audit(str(log), "--resource", BURST_PRODUCT, "--json").stdout)["events"]
    story_names = [e["event"] for e in story]
    assert story_names.count("message.received") == 8 and story_names.count("message.acked") == 8
    [sent] = [e for e in story if e["event"] == "batch.sent"]
    assert BURST_PRODUCT in sent["notifications"]["product/updated"]
    key = next(e["message_key"] for e in story if e["event"] == "message.received")
    by_key = orjson.loads(audit(str(log), "--message-key", key, "--json").stdout)["events"]
    assert by_key[0]["event"] == "message.received" and by_key[-1]["event"] == "message.acked"
    by_request = orjson.loads(audit(str(log), "--correlation-id", sent["correlation_id"], "--json").stdout)[
        "events"
    ]
    assert {e["message_key"] for e in by_request if e["event"] == "message.acked"} >= set(
        sent["message_keys"]
    )


def test_audit_off_leaves_only_warnings_and_errors(tmp_path: Path) -> None:
    _, events = replay(tmp_path, CTSYNC_AUDIT="off")
    names = {e["event"] for e in events}
    assert "message.received" not in names and "message.acked" not in names and "batch.sent" not in names
    assert {"message.invalid", "message.dead_lettered"} <= names
    assert all(e["severity"] in ("WARNING", "ERROR", "CRITICAL") for e in events)
