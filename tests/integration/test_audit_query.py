"""``ctsync audit`` over the log of a real ``ctsync replay`` of the sample file against the hook server."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer import audit_query as q
from tests import REPO_ROOT
from tests.servers.hookserver import HookServer

pytestmark = pytest.mark.integration

ROOT = REPO_ROOT
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
    from tests.servers.hookserver import Fault

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
    # Notifications by scope: {"product/updated": [external id, ...]}.
    assert BURST_PRODUCT in sent["notifications"]["product/updated"]
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


def write_synthetic_log(path: Path, approximate_bytes: int) -> int:
    """Write an audit log of roughly ``approximate_bytes``: resources received, batched, sent and acked, as
    ``ctsync run`` logs them. Return the number of resources (``r-0``, ``r-1``, ...)."""
    batch_size = 5
    written = 0
    resources = 0
    with path.open("wb") as out:
        while written < approximate_bytes:
            batch = resources // batch_size
            keys = [f"k-{resources + i}-{uuid_like(resources + i)}" for i in range(batch_size)]
            second = f"{batch % 60:02d}"
            lines = []
            for i, key in enumerate(keys):
                lines.append(
                    {
                        "event": "message.received",
                        "timestamp": f"2026-01-01T00:{(batch // 60) % 60:02d}:{second}.000000Z",
                        "level": "info",
                        "resource_type": "product",
                        "resource_id": f"r-{resources + i}",
                        "version": 2,
                        "message_key": key,
                        "position": f"commercetools-changes/0/{resources + i}",
                    }
                )
            correlation = f"c-{batch}-{uuid_like(batch)}"
            lines.append(
                {
                    "event": "batch.sent",
                    "timestamp": f"2026-01-01T00:{(batch // 60) % 60:02d}:{second}.500000Z",
                    "level": "info",
                    "correlation_id": correlation,
                    "size": batch_size,
                    "status": 200,
                    "message_keys": keys,
                    "notifications": [
                        {"scope": "product/updated", "external_id": f"r-{resources + i}"}
                        for i in range(batch_size)
                    ],
                }
            )
            lines += [
                {
                    "event": "message.acked",
                    "timestamp": lines[-1]["timestamp"],
                    "level": "info",
                    "message_key": key,
                }
                for key in keys
            ]
            chunk = b"".join(orjson.dumps(line) + b"\n" for line in lines)
            out.write(chunk)
            written += len(chunk)
            resources += batch_size
    return resources


def uuid_like(number: int) -> str:
    return f"{number * 2654435761 % 2**32:08x}-4f5a-4b6c-8d7e-{number:012d}"


def peak_rss_mib(*args: str) -> float:
    """Run ``ctsync audit`` with ``args`` in a fresh wrapper process and return the child's peak RSS."""
    measure = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", measure, *CTSYNC, "audit", *args], capture_output=True, text=True, timeout=120
    )
    returncode, kib = done.stdout.split()
    assert returncode == "0", done.stderr
    return int(kib) / 1024


def test_streaming_gives_the_in_memory_answers(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_synthetic_log(log, 300_000)
    with log.open("a") as out:
        out.write("plain text\n\n")
    events = q.read_events(log.read_bytes().splitlines(), str(log)).events
    quiet = q.Progress(None, stream=io.StringIO())  # not a terminal: never drawn
    with ExitStack() as stack:
        logs = q.open_logs([log], 3, stack)
        counts, skipped = q.stream_counts(logs, None, None, quiet)
        assert counts == q.count(events) and skipped == 1
        since = q.parse_bound("2026-01-01T00:00:30Z")
        assert q.stream_counts(logs, since, None, quiet)[0] == q.count(q.in_range(events, since, None))
        for resource in ("r-0", "r-42", "r-999", "absent"):
            streamed = q.stream_story(logs, resource_id=resource, progress=quiet)
            assert streamed == q.story_of_resource(events, resource), resource
        sent = next(e for e in events if e.name == "batch.sent" and "r-42" in str(e.fields))
        correlation = str(sent.get("correlation_id"))
        assert q.stream_story(logs, correlation_id=correlation, progress=quiet) == q.story_of_correlation_id(
            events, correlation
        )
        key = str(sent.get("message_keys")[0])
        assert q.stream_story(logs, message_key=key, progress=quiet) == q.story_of_message_key(events, key)


def test_memory_stays_flat_as_the_log_grows(tmp_path: Path) -> None:
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_synthetic_log(small, 4 * 2**20)
    write_synthetic_log(large, 64 * 2**20)
    for query in ([], ["--resource", "r-4242"]):
        growth = peak_rss_mib(str(large), *query, "--json") - peak_rss_mib(str(small), *query, "--json")
        # Loaded into memory, 60 MiB more log costs about 200 MiB more RSS (1.6 GiB for 400 MB).
        assert growth < 8, (query, growth)


def test_progress_is_drawn_on_a_terminal_only(tmp_path: Path) -> None:
    import pty

    log = tmp_path / "audit.jsonl"
    write_synthetic_log(log, 24 * 2**20)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    leader, follower = pty.openpty()
    with os.fdopen(leader, "rb", buffering=0) as terminal:
        done = subprocess.run(
            [*CTSYNC, "audit", str(log), "--resource", "r-5", "--json"],
            stdout=subprocess.PIPE,
            stderr=follower,
            env=environ,
            timeout=60,
        )
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = terminal.read(65536)
            except OSError:  # the terminal's other end is closed: all read
                break
            if not chunk:
                break
            drawn += chunk
    assert done.returncode == 0
    assert b"ctsync audit: pass 1/3: " in drawn and b"MiB of 24 MiB" in drawn
    assert drawn.endswith(b"\r\x1b[K"), "the progress line is cleared at the end"
    assert orjson.loads(done.stdout)["count"] == 3
    piped = audit(str(log), "--resource", "r-5", "--json")
    assert piped.stderr == b"" and orjson.loads(piped.stdout)["count"] == 3
