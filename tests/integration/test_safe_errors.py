"""Errors end as one line that names the fix, never as a traceback: a garbage state file, a broker that
died before the stop, a full disk under the SQLite state."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from adapters.sqlite.state import SqliteStateStore
from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import CTSYNC, Ctsync, Kafka, start_tansu, stop_process

pytestmark = pytest.mark.integration

PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")


def updates(count: int, prefix: str = "p") -> list[bytes]:
    return [
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme",
                "resource": {"typeId": "product", "id": f"{prefix}-{i}"},
                "version": 2,
                "oldVersion": 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("command", ["run", "replay"])
def test_a_garbage_sqlite_state_file_is_a_configuration_error(
    tmp_path: Path, hook_server: HookServer, command: str
) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not a database, it only has its name\n" * 200)
    payloads = tmp_path / "in.jsonl"
    payloads.write_bytes(b"\n".join(updates(2)) + b"\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    environ.update(
        hook_server.env(),
        CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        CTSYNC_SOURCE=f"file:{payloads}",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
    )
    args = ["run"] if command == "run" else ["replay", str(payloads)]
    done = subprocess.run(
        [*CTSYNC, *args], env=environ, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "CTSYNC_STATE_URL:" in done.stderr and "not a usable SQLite state file" in done.stderr
    assert hook_server.notifications == []
    checked = subprocess.run(
        [*CTSYNC, "check", "--json"], env=environ, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    [state] = [c for c in orjson.loads(checked.stdout)["checks"] if c["name"] == "state"]
    assert state["status"] == "FAIL" and "not a usable SQLite state file" in state["detail"]
    assert checked.returncode == 2


async def test_sigterm_after_the_broker_died_stops_cleanly(
    hook_server: HookServer, ctsync_process: Callable[..., Ctsync], tmp_path: Path
) -> None:
    # A broker of this test's own, so killing it leaves the session's broker alone.
    broker, bootstrap = start_tansu(tmp_path / "tansu.log")
    try:
        own = Kafka(bootstrap)
        topic = await own.create_topic(partitions=1)
        await own.produce(topic, updates(5))
        service = ctsync_process(
            {
                **hook_server.env(),
                "CTSYNC_SOURCE": "kafka",
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "KAFKA_TOPICS": topic,
                "KAFKA_GROUP_ID": f"g-{uuid.uuid4().hex[:8]}",
                "CTSYNC_DRAIN_TIMEOUT_SECONDS": "5",
            }
        )
        service.wait_for(lambda: len(service.events("message.acked")) >= 5, message="5 acks")
        broker.kill()
        broker.wait(10)
        # SIGTERM once the service has noticed: its readiness says the broker is gone.
        async with httpx.AsyncClient(base_url=f"http://{service.env['CTSYNC_HTTP_LISTEN']}") as client:
            deadline = asyncio.get_running_loop().time() + 60
            while (await client.get("/readyz")).status_code == 200:
                assert asyncio.get_running_loop().time() < deadline, "still ready without a broker"
                await asyncio.sleep(0.5)
        assert service.stop(timeout=60) == 0, service.stderr()[-3000:]
    finally:
        stop_process(broker)
    assert "Traceback" not in service.stderr(), service.stderr()[-3000:]
    [stopped] = service.events("service.stopped")
    assert stopped["signal"] == "SIGTERM"


async def test_a_failed_state_write_reports_its_own_error_not_cannot_rollback(tmp_path: Path) -> None:
    import sqlite3

    store = SqliteStateStore(tmp_path / "state.db")
    await store.open()
    try:
        # A real SQLITE_FULL: the database may grow by no more pages than it has now.
        pages = await store._run(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await store._run(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
        with pytest.raises(sqlite3.OperationalError) as caught:
            await store.record_delivered([f"key-{i}-{'x' * 200}" for i in range(2000)], {}, 60.0)
        assert "full" in str(caught.value) and "rollback" not in str(caught.value)
        # The store still works once there is room again.
        await store._run(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        await store.record_delivered(["after"], {}, 60.0)
        assert (await store.lookup(["after"], [])).delivered_keys == {"after"}
    finally:
        await store.close()


async def test_a_failed_claim_reports_its_own_error_and_leaves_nothing_claimed(tmp_path: Path) -> None:
    import sqlite3

    store = SqliteStateStore(tmp_path / "state.db")
    await store.open()
    try:
        pages = await store._run(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await store._run(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
        ranks = {f"product:{i}-{'x' * 200}": 4 for i in range(2000)}
        with pytest.raises(sqlite3.OperationalError) as caught:
            await store.claim("replica-a", ranks, [], 30.0, 300.0)
        assert "full" in str(caught.value) and "rollback" not in str(caught.value)
        await store._run(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        # Rolled back whole: another holder finds none of them claimed.
        claim = await store.claim("replica-b", ranks, [], 30.0, 300.0)
        assert claim.refused == frozenset()
    finally:
        await store.close()
