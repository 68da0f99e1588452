"""Dead letters stay whole and a replay ends: a failed write leaves no fragment, a malformed line is named
by its number, and a replay from a file, a Kafka topic or a Pub/Sub subscription ends with exit 1 when
some letters fail again, which are written elsewhere than where it reads."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import CTSYNC, Kafka
from tests.servers.pstestserver import PubSubTestbed

pytestmark = pytest.mark.integration

PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")


def update(resource_id: str, padding: int = 0) -> bytes:
    return orjson.dumps(
        {
            "notificationType": "ResourceUpdated",
            "projectKey": "acme",
            "resource": {"typeId": "product", "id": resource_id},
            "version": 2,
            "oldVersion": 1,
            "modifiedAt": "2026-01-01T00:00:00.000Z",
            "padding": "x" * padding,
        }
    )


def environment(tmp_path: Path, hook: HookServer, **extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    environ.update(
        hook.env(), CTSYNC_STATE_URL="memory://", CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl"
    )
    environ.update(extra)
    return environ


def ctsync(tmp_path: Path, environ: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTSYNC, *args], env=environ, capture_output=True, text=True, timeout=90, cwd=tmp_path
    )


def records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_a_failed_dead_letter_write_leaves_no_fragment(tmp_path: Path, hook_server: HookServer) -> None:
    environ = environment(tmp_path, hook_server)
    first = tmp_path / "first.jsonl"
    first.write_bytes(b"{not json\n")
    assert ctsync(tmp_path, environ, "replay", str(first)).returncode == 0
    dead = tmp_path / "dead.jsonl"
    before = dead.read_bytes()
    # The second letter is larger than the room the file-size limit leaves: its write fails part-way, as
    # on a full disk, until the test lifts the limit.
    second = tmp_path / "second.jsonl"
    second.write_bytes(b"{not json either " + b"y" * 4000 + b"\n")
    limit = len(before) + 1000
    # The log goes through a pipe: a log file would be held to the same size limit.
    proc = subprocess.Popen(
        [*CTSYNC, "replay", str(second)],
        env=environ,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)),
    )
    assert proc.stdout is not None
    log: list[bytes] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any(b'"dead_letter.retrying"' in line for line in list(log)):
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(log).decode()
            time.sleep(0.1)
        assert any(b"File too large" in line for line in list(log))
        assert dead.read_bytes() == before, "the failed write left a fragment"
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert proc.wait(60) == 0, b"".join(log).decode()
    finally:
        proc.kill()
        reader.join(10)
    letters = records(dead)
    assert [letter["payload"] for letter in letters] == ["{not json", second.read_text().strip()]
    assert all(letter["reason"] and letter["time"] for letter in letters)


def test_replay_names_a_malformed_line_by_its_number(tmp_path: Path, hook_server: HookServer) -> None:
    environ = environment(tmp_path, hook_server, CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/again.jsonl")
    letter = {
        "type": "ctsync.dead_letter",
        "time": "2026-01-01T00:00:00+00:00",
        "reason": "hook rejected notification",
        "source": "kafka",
        "position": "t/0/1",
        "message_key": None,
        "source_fields": {},
        "payload_encoding": "utf-8",
    }
    whole = orjson.dumps({**letter, "payload": update("p-1").decode()})
    cut = whole[:60]
    # What a retry used to make of a cut write: the whole record after the fragment, on one line.
    glued = cut + orjson.dumps({**letter, "payload": update("p-2").decode()})
    path = tmp_path / "letters.jsonl"
    path.write_bytes(b"\n".join([whole, glued, orjson.dumps({**letter, "payload": update("p-3").decode()})]))
    done = ctsync(tmp_path, environ, "dead-letters", "replay", str(path))
    assert done.returncode == 1, done.stderr
    assert f"{path}:2: malformed, not replayed" in done.stderr
    assert sorted(e for _, e in hook_server.notifications) == ["p-1", "p-3"]
    events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    [malformed] = [e for e in events if e["event"] == "dead_letter.malformed"]
    assert malformed["line"] == 2
    assert not (tmp_path / "again.jsonl").exists()


def test_a_pubsub_replay_ends_and_writes_what_fails_again_elsewhere(
    pubsub_testbed: PubSubTestbed, hook_server: HookServer, tmp_path: Path
) -> None:
    admin = pubsub_testbed.admin
    rejected = "hook rejected notification: HTTP 400"
    admin.publish(
        pubsub_testbed.dead_letter_topic,
        [update(f"d-{i}") for i in range(5)],
        ctsync_type="ctsync.dead_letter",
        reason=rejected,
        source="pubsub",
        position="m1",
        dead_lettered_at="2026-01-01T00:00:00+00:00",
    )
    admin.publish(
        pubsub_testbed.dead_letter_topic,
        [b"{broken"] * 3,
        ctsync_type="ctsync.dead_letter",
        reason="not valid JSON",
        source="pubsub",
        position="m2",
        dead_lettered_at="2026-01-01T00:00:00+00:00",
    )
    hook_server.reject("d-0", "d-1")  # these fail again
    # Dead letters are configured to go to the very topic the replay reads: the replay must not use it.
    environ = environment(
        tmp_path,
        hook_server,
        PUBSUB_EMULATOR_HOST=admin.host,
        CTSYNC_DEAD_LETTER_URL=f"pubsub://{pubsub_testbed.dead_letter_topic}",
    )
    started = time.monotonic()
    done = ctsync(
        tmp_path,
        environ,
        "dead-letters",
        "replay",
        "--reason",
        "rejected",
        pubsub_testbed.dead_letter_subscription,
    )
    assert time.monotonic() - started < 60
    assert done.returncode == 1, done.stderr
    assert sorted(e for _, e in hook_server.notifications) == ["d-2", "d-3", "d-4"]
    assert "dead letters: read 8, replayed 5" in done.stderr
    assert "failed again: 2, written to file:ctsync-dead-letters-failed-again.jsonl" in done.stderr
    again = records(tmp_path / "ctsync-dead-letters-failed-again.jsonl")
    assert sorted(orjson.loads(str(a["payload"]))["resource"]["id"] for a in again) == ["d-0", "d-1"]
    # What was left alone is still there; nothing was published back to the topic.
    left = admin.pull_until(pubsub_testbed.dead_letter_subscription, 3, timeout=30)
    assert sorted(m.data for m in left) == [b"{broken"] * 3
    assert admin.pull(pubsub_testbed.dead_letter_subscription) == []

    # Naming the topic read as the target is refused.
    refused = ctsync(
        tmp_path,
        environ,
        "dead-letters",
        "replay",
        "--failed-to",
        f"pubsub://{pubsub_testbed.dead_letter_topic}",
        pubsub_testbed.dead_letter_subscription,
    )
    assert refused.returncode == 2 and "--failed-to" in refused.stderr


async def test_a_kafka_replay_ends_with_exit_1_when_letters_fail_again(
    kafka: Kafka, hook_server: HookServer, tmp_path: Path
) -> None:
    letters = await kafka.create_topic(partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(4):
            await producer.send_and_wait(
                letters,
                update(f"k-{i}"),
                headers=[("ctsync-reason", b"hook rejected"), ("ctsync-time", b"2026-01-01T00:00:00+00:00")],
            )
    finally:
        await producer.stop()
    hook_server.reject("k-0")
    environ = environment(
        tmp_path,
        hook_server,
        KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        KAFKA_GROUP_ID=f"g-{uuid.uuid4().hex[:8]}",
        CTSYNC_DEAD_LETTER_URL=f"kafka://{letters}",
    )
    refused = await asyncio.to_thread(
        ctsync,
        tmp_path,
        environ,
        "dead-letters",
        "replay",
        "--failed-to",
        f"kafka://{letters}",
        f"kafka://{letters}",
    )
    assert refused.returncode == 2 and "--failed-to" in refused.stderr
    done = await asyncio.to_thread(ctsync, tmp_path, environ, "dead-letters", "replay", f"kafka://{letters}")
    assert done.returncode == 1, done.stderr
    assert sorted(e for _, e in hook_server.notifications) == ["k-1", "k-2", "k-3"]
    again = records(tmp_path / "ctsync-dead-letters-failed-again.jsonl")
    assert len(again) == 1 and "k-0" in str(again[0]["payload"])


def test_a_bad_failed_to_target_is_a_usage_error(tmp_path: Path, hook_server: HookServer) -> None:
    path = tmp_path / "letters.jsonl"
    path.write_bytes(b"")
    done = ctsync(
        tmp_path,
        environment(tmp_path, hook_server),
        "dead-letters",
        "replay",
        "--failed-to",
        "ftp://x",
        str(path),
    )
    assert done.returncode == 2 and "--failed-to: must be file:" in done.stderr
