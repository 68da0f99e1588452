"""``ctsync audit`` over the log of a real ``ctsync replay`` of the sample file against the hook server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hookserver import HookServer

from consumer import audit_query as q

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "commercetools-sample.jsonl"
CTSYNC = [sys.executable, "-m", "consumer.cli"]
PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")
# The sample's burst: eight updates to one product, coalesced into one notification.
BURST_PRODUCT = "b7c1e2d3-4f5a-4b6c-8d7e-1f2a3b4c5d6e"


@dataclass
class Run:
    log: Path
    events: list[dict[str, Any]]
    hooks: HookServer


def _environ(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    environ.update(
        CTSYNC_STATE_URL=f"sqlite:///{tmp}/state.db",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp}/dead.jsonl",
        IPAAS_IGNORE_CLIENT_IDS="ipaas-sync-client",
        IPAAS_BATCH_SIZE="5",
        **extra,
    )
    return environ


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The sample replayed once (batches of 5, the first request answered 503 then retried)."""
    tmp = tmp_path_factory.mktemp("audit")
    from hookserver import Fault

    with HookServer() as hooks:
        hooks.faults.push(Fault.status(503))
        done = subprocess.run(
            [*CTSYNC, "replay", str(SAMPLE)],
            env=_environ(tmp, hooks.env()),
            capture_output=True,
            timeout=60,
            cwd=tmp,
        )
        assert done.returncode == 0, done.stderr
        log = tmp / "audit.jsonl"
        log.write_bytes(done.stdout)
        events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
        yield Run(log, events, hooks)


def audit(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CTSYNC, "audit", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)},
    )


def test_counts_by_event_and_reason(replayed: Run) -> None:
    done = audit(str(replayed.log), "--json")
    assert done.returncode == 0, done.stderr
    counts = orjson.loads(done.stdout)
    assert counts["by_event"]["message.received"] == 52
    assert counts["by_event"]["message.acked"] == 52
    assert counts["by_event"]["batch.retrying"] == 1
    assert counts["by_reason"]["message.dead_lettered: not valid JSON"] == 1
    assert counts["by_reason"]["message.ignored: subscription test notification"] == 1
    assert counts["total"] == len(replayed.events)
    table = audit(str(replayed.log)).stdout.decode()
    assert "message.received" in table and "reason" in table


def test_story_of_a_resource_follows_its_keys_into_batches(replayed: Run) -> None:
    done = audit(str(replayed.log), "--resource", BURST_PRODUCT, "--json")
    story = orjson.loads(done.stdout)["events"]
    names = [e["event"] for e in story]
    assert names.count("message.received") == 8
    assert names.count("message.acked") == 8
    keys = {e["message_key"] for e in story if e["event"] == "message.received"}
    [sent] = [e for e in story if e["event"] == "batch.sent" and e["status"] == 200]
    assert keys <= set(sent["message_keys"])
    assert {"scope": "product/updated", "external_id": BURST_PRODUCT} in sent["notifications"] or any(
        n["external_id"] == BURST_PRODUCT for n in sent["notifications"]
    )
    # Other resources' events ride in the same batch but are not part of this story.
    assert all(e.get("resource_id") in (None, BURST_PRODUCT) for e in story)
    assert names.index("message.received") < names.index("batch.sent") < len(names) - 1


def test_story_of_a_message_key_and_of_a_correlation_id(replayed: Run) -> None:
    retried = next(e for e in replayed.events if e["event"] == "batch.retrying")
    by_correlation = orjson.loads(
        audit(str(replayed.log), "--correlation-id", retried["correlation_id"], "--json").stdout
    )
    names = [e["event"] for e in by_correlation["events"]]
    # The request answered 503, its retry notice, and (following its keys) the retry that delivered them.
    assert names.count("batch.sent") == 2 and names.count("batch.retrying") == 1
    first = next(e for e in by_correlation["events"] if e["event"] == "batch.sent")
    assert first["status"] == 503 and first["correlation_id"] == retried["correlation_id"]
    key = first["message_keys"][0]
    by_key = orjson.loads(audit(str(replayed.log), "--message-key", key, "--json").stdout)["events"]
    key_names = [e["event"] for e in by_key]
    # The 503, its retry, then the delivery that succeeded, then the ack.
    assert key_names.count("batch.sent") == 2 and "batch.retrying" in key_names
    assert key_names[0] == "message.received" and key_names[-1] == "message.acked"


def test_stdin_time_range_and_people_table(replayed: Run) -> None:
    data = replayed.log.read_bytes()
    future = audit("--since", "2999-01-01T00:00:00Z", "--json", stdin=data)
    assert orjson.loads(future.stdout)["total"] == 0
    recent = audit("-", "--since", "1h", "--json", stdin=b"not json\n" + data)
    body = orjson.loads(recent.stdout)
    assert body["total"] == len(replayed.events) and body["skipped_lines"] == 1
    table = audit(str(replayed.log), "--resource", BURST_PRODUCT).stdout.decode().splitlines()
    assert any("batch.sent" in line and "status=200" in line for line in table)
    assert audit("--since", "yesterday-ish", stdin=data).returncode == 2


def test_pure_story_and_bounds() -> None:
    lines = [
        b'{"event":"message.received","timestamp":"2026-01-01T00:00:00Z","resource_id":"r1","message_key":"k1"}',
        b'{"event":"message.received","timestamp":"2026-01-01T00:00:01Z","resource_id":"r2","message_key":"k2"}',
        b'{"event":"batch.sent","timestamp":"2026-01-01T00:00:02Z","correlation_id":"c1","message_keys":["k1","k2"]}',
        b'{"event":"batch.retrying","timestamp":"2026-01-01T00:00:03Z","correlation_id":"c1"}',
        b'{"event":"message.acked","timestamp":"2026-01-01T00:00:04Z","message_key":"k2"}',
        b"plain text",
    ]
    reading = q.read_events(lines, "test")
    assert reading.skipped == 1
    story = [e.name for e in q.story_of_resource(reading.events, "r1")]
    assert story == ["message.received", "batch.sent", "batch.retrying"]
    assert [e.name for e in q.story_of_correlation_id(reading.events, "c1")] == [
        "message.received",
        "message.received",
        "batch.sent",
        "batch.retrying",
        "message.acked",
    ]
    since = q.parse_bound("2026-01-01T00:00:02Z")
    assert next(e.name for e in q.in_range(reading.events, since, None)) == "batch.sent"
    now = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    assert q.parse_bound("30m", now) == datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    assert q.reason_group("not valid JSON: unexpected character") == "not valid JSON"
