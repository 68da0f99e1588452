"""``ctsync dead-letters replay``: re-drive a dead-letter file after a fix, with filters, as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from consumer.cli import operator as operator_cli
from consumer.cli.run import FilteringSource, Progress
from consumer.ports import Envelope, Fetched
from tests.servers.hookserver import HookServer

CTSYNC = [sys.executable, "-m", "consumer.cli"]
PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def named(self, name: str) -> list[dict[str, object]]:
        events = [orjson.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]
        return [e for e in events if e["event"] == name]


@pytest.fixture
def ctsync(tmp_path: Path, hook_server: HookServer) -> Callable[..., Result]:
    def run(*args: str) -> Result:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
        environ.update(
            hook_server.env(),
            CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
            CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        )
        done = subprocess.run(
            [*CTSYNC, *args], env=environ, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        return Result(done.returncode, done.stdout, done.stderr)

    return run


def update(resource_id: str, version: int = 2) -> bytes:
    return orjson.dumps(
        {
            "notificationType": "ResourceUpdated",
            "projectKey": "acme",
            "resource": {"typeId": "product", "id": resource_id},
            "version": version,
            "oldVersion": version - 1,
            "modifiedAt": "2026-01-01T00:00:00.000Z",
        }
    )


@pytest.fixture
def dead_letters(tmp_path: Path, hook_server: HookServer, ctsync: Callable[..., Result]) -> Path:
    """A dead-letter file holding one payload the hook rejected (p-3) and one that is not JSON."""
    payloads = tmp_path / "payloads.jsonl"
    payloads.write_bytes(b"\n".join([update(f"p-{i}") for i in range(5)] + [b"{broken"]) + b"\n")
    hook_server.reject("p-3")
    first = ctsync("replay", str(payloads))
    assert first.code == 0, first.stderr
    path = tmp_path / "dead.jsonl"
    reasons = [orjson.loads(line)["reason"] for line in path.read_bytes().splitlines()]
    assert len(reasons) == 2 and any("p-3" in r for r in reasons)
    hook_server.reject_external_ids = set()  # the fix
    return path


@pytest.mark.integration
def test_replay_by_reason_delivers_only_the_fixed_ones(
    dead_letters: Path, hook_server: HookServer, ctsync: Callable[..., Result]
) -> None:
    before = len(hook_server.notifications)
    result = ctsync("dead-letters", "replay", "--reason", "rejected", str(dead_letters))
    assert result.code == 0, result.stderr
    assert [e for _, e in hook_server.notifications[before:]] == ["p-3"]
    assert "dead letters: read 2, replayed 1" in result.stderr
    assert "left alone 1" in result.stderr
    # Replaying from the file CTSYNC_DEAD_LETTER_URL appends to: nothing new failed, nothing appended.
    assert len(dead_letters.read_bytes().splitlines()) == 2


@pytest.mark.integration
def test_replay_everything_redeadletters_what_fails_again_and_terminates(
    dead_letters: Path, hook_server: HookServer, ctsync: Callable[..., Result]
) -> None:
    result = ctsync("dead-letters", "replay", f"file:{dead_letters}")
    # One letter failed again: the replay says so with exit 1 (issue 14).
    assert result.code == 1, result.stderr
    assert f"failed again: 1, written to file:{dead_letters}" in result.stderr
    assert "p-3" in {e for _, e in hook_server.notifications}
    [again] = result.named("message.dead_lettered")
    assert "not valid JSON" in str(again["reason"])
    lines = [orjson.loads(line) for line in dead_letters.read_bytes().splitlines()]
    # The same file was read and appended to: the replay read the two records it held when it started.
    assert len(lines) == 3 and lines[2]["payload"] == "{broken"
    assert "received 2 payloads" in result.stderr


@pytest.mark.integration
def test_time_filter_and_usage_errors(dead_letters: Path, ctsync: Callable[..., Result]) -> None:
    future = ctsync("dead-letters", "replay", "--since", "2999-01-01", str(dead_letters))
    assert future.code == 0 and "replayed 0" in future.stderr
    recent = ctsync(
        "dead-letters", "replay", "--since", "10m", "--reason", "not valid JSON", str(dead_letters)
    )
    assert recent.code == 1 and "replayed 1" in recent.stderr  # the broken one fails again
    assert ctsync("dead-letters", "replay", "--since", "whenever", str(dead_letters)).code == 2
    assert ctsync("dead-letters", "replay", str(dead_letters.with_name("nope.jsonl"))).code == 2


class ListSource:
    """A finite in-memory source handing out a few envelopes per fetch."""

    name = "list"

    def __init__(self, envelopes: list[Envelope], per_fetch: int = 2) -> None:
        self.envelopes = envelopes
        self.per_fetch = per_fetch
        self.closed = False

    async def fetch(self, max_count: int) -> Fetched:
        taken = self.envelopes[: min(max_count, self.per_fetch)]
        del self.envelopes[: len(taken)]
        done = not self.envelopes
        return Fetched(taken, more_ready=not done, exhausted=done)

    async def close(self) -> None:
        self.closed = True


def letter(reason: str, when: datetime, nacked: list[str]) -> Envelope:
    return Envelope(
        body=b"{}",
        position=reason,
        nack=lambda: nacked.append(reason),
        source_fields={"dead_letter_reason": reason, "dead_letter_time": when.isoformat()},
    )


async def test_filtering_source_reads_past_filtered_pages_and_hands_them_back() -> None:
    started = datetime(2026, 1, 2, tzinfo=UTC)
    old = started - timedelta(hours=1)
    nacked: list[str] = []
    envelopes = [letter(r, old, nacked) for r in ("x1", "x2", "x3", "x4", "hook rejected p-1")]
    envelopes.append(letter("hook rejected p-2", started + timedelta(seconds=1), nacked))  # our own output
    keep = operator_cli._dead_letter_filter(("REJECTED",), None, None, started)
    progress = Progress("test")
    source = FilteringSource(ListSource(envelopes), keep, progress)
    first = await source.fetch(10)
    # The first two pages held nothing to replay; the source read on instead of looking idle.
    assert [e.position for e in first.envelopes] == ["hook rejected p-1"]
    rest = await source.fetch(10)
    assert rest.envelopes == [] and rest.exhausted
    assert nacked == ["x1", "x2", "x3", "x4", "hook rejected p-2"]
    assert (progress.read, progress.matched) == (6, 1)
    await source.close()


def test_time_window_filter() -> None:
    started = datetime(2026, 1, 2, tzinfo=UTC)
    keep = operator_cli._dead_letter_filter(
        (), started - timedelta(hours=2), started - timedelta(hours=1), started
    )
    assert keep(letter("a", started - timedelta(minutes=90), []))
    assert not keep(letter("a", started - timedelta(minutes=30), []))
    assert not keep(letter("a", started - timedelta(hours=3), []))
    assert not keep(Envelope(body=b"{}", position="plain payload, no time"))
    assert operator_cli._dead_letter_filter((), None, None, started)(Envelope(body=b"{}", position="plain"))
