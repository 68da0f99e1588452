"""A dry run is only ever explicit, and on a broker it leaves the stream and the state as it found them."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests import REPO_ROOT
from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import CTSYNC, Ctsync, Kafka

pytestmark = pytest.mark.integration

ROOT = REPO_ROOT
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


def run_once(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    environ.update(CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db", CTSYNC_HTTP_LISTEN="127.0.0.1:0")
    environ.update(env)
    return subprocess.run(
        [*CTSYNC, *args], env=environ, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


@pytest.mark.parametrize("hook_variable", [None, "IPAAS_HOOKURL"])
def test_a_broker_source_without_a_hook_url_is_a_configuration_error(
    tmp_path: Path, hook_variable: str | None
) -> None:
    env = {"CTSYNC_SOURCE": "kafka", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "KAFKA_TOPICS": "t"}
    if hook_variable is not None:  # the misspelling that used to consume the whole topic silently
        env[hook_variable] = "https://hooks.ipaas.com/x"
    done = run_once(tmp_path, env, "run")
    assert done.returncode == 2, done.stderr
    assert "IPAAS_HOOK_URL: required for run" in done.stderr
    assert "--dry-run" in done.stderr
    assert not (tmp_path / "state.db").exists()


def test_a_push_source_without_a_hook_url_is_a_configuration_error(tmp_path: Path) -> None:
    done = run_once(tmp_path, {"CTSYNC_SOURCE": "push", "PUSH_ALLOW_UNAUTHENTICATED": "true"}, "run")
    assert done.returncode == 2 and "IPAAS_HOOK_URL" in done.stderr, done.stderr


def test_make_run_is_an_explicit_dry_run(tmp_path: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/ctsync run --dry-run" in makefile
    sample = ROOT / "examples" / "commercetools-sample.jsonl"
    done = run_once(tmp_path, {"CTSYNC_SOURCE": f"file:{sample}"}, "run", "--dry-run")
    assert done.returncode == 0, done.stderr
    events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    batches = [e for e in events if e["event"] == "batch.sent"]
    assert batches and all(e["status"] == "dry run" for e in batches)
    assert "(dry run: " in done.stderr and "200" not in done.stderr


async def test_a_dry_run_on_kafka_commits_and_records_nothing(
    kafka: Kafka, hook_server: HookServer, ctsync_process: Callable[..., Ctsync], tmp_path: Path
) -> None:
    topic = await kafka.create_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await kafka.produce(topic, updates(6))
    env = {
        "CTSYNC_SOURCE": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": group,
        "CTSYNC_DRAIN_TIMEOUT_SECONDS": "5",
        "CTSYNC_STATE_URL": f"sqlite:///{tmp_path}/shared-state.db",
    }
    dry = ctsync_process({**env, "CTSYNC_DRY_RUN": "true"}, name="dry")
    dry.wait_for(
        lambda: sum(len(e["notifications"]) for e in dry.events("dry_run.would_send")) >= 6,
        message="the dry run logs what it would send",
    )
    assert all(e["status"] == "dry run" for e in dry.events("batch.sent"))
    assert dry.stop() == 0
    assert hook_server.notifications == []
    assert set((await kafka.committed(group, topic, partitions=1)).values()) == {None}
    # The real service started afterwards, on the same group and state, still delivers every change.
    real = ctsync_process({**env, **hook_server.env()}, name="real")
    real.wait_for(lambda: len(hook_server.notifications) >= 6, message="the real run delivers all six")
    assert real.stop() == 0
    assert sorted(e for _, e in hook_server.notifications) == [f"p-{i}" for i in range(6)]
