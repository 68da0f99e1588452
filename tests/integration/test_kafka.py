"""The Kafka source against a real broker (tansu): offsets, dead letters, crash, rebalance, backpressure."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.kafka import client_options
from consumer.cli import wiring
from consumer.config import load_settings
from tests.servers.hookserver import Fault, HookServer
from tests.servers.kafkaserver import CTSYNC, Ctsync, Kafka, start_tansu, stop_process

pytestmark = pytest.mark.integration


def updates(count: int, entities: int, prefix: str = "p", start_version: int = 2) -> list[bytes]:
    """``count`` ResourceUpdated payloads spread round-robin over ``entities`` products."""
    return [
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme",
                "resource": {"typeId": "product", "id": f"{prefix}-{i % entities}"},
                "version": i // entities + start_version,
                "oldVersion": i // entities + start_version - 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        )
        for i in range(count)
    ]


def kafka_env(kafka: Kafka, topic: str, group: str, hook: HookServer, **extra: str) -> dict[str, str]:
    return {
        **hook.env(),
        "CTSYNC_SOURCE": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": group,
        "CTSYNC_DRAIN_TIMEOUT_SECONDS": "10",
        **extra,
    }


def acked_offsets(service: Ctsync) -> set[tuple[object, object]]:
    """Every (partition, offset) acked, over all runs that logged to this service's file."""
    return {(e["partition"], e["offset"]) for e in service.events("message.acked")}


def notified_ids(hook: HookServer) -> set[str]:
    return {external_id for _, external_id in hook.notifications}


async def test_end_to_end_delivers_everything_and_commits_to_the_end(
    kafka: Kafka, hook_server: HookServer, ctsync_process: Callable[..., Ctsync]
) -> None:
    topic = await kafka.create_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    ends = await kafka.produce(topic, updates(300, 60))
    assert sum(ends.values()) == 300
    service = ctsync_process(kafka_env(kafka, topic, group, hook_server))
    service.wait_for(lambda: len(service.events("message.acked")) >= 300, message="300 acks")
    endpoints = f"http://{service.env['CTSYNC_HTTP_LISTEN']}"
    async with httpx.AsyncClient(base_url=endpoints, timeout=5) as client:
        assert (await client.get("/readyz")).status_code == 200
        scraped = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families((await client.get("/metrics")).text)
            for sample in family.samples
        }
    assert scraped[("ctsync_messages_acked_total", ())] == 300
    lagging = {dict(labels)["partition"] for name, labels in scraped if name == "ctsync_kafka_consumer_lag"}
    assert lagging <= {"0", "1", "2"}
    assert service.stop() == 0
    assert notified_ids(hook_server) == {f"p-{i}" for i in range(60)}
    assert hook_server.violations == 0
    received = service.events("message.received")
    assert {(e["topic"], e["partition"]) for e in received} == {(topic, p) for p in range(3)}
    acked = service.events("message.acked")
    assert all({"topic", "partition", "offset"} <= e.keys() for e in acked)
    assert await kafka.committed(group, topic) == ends
    # A fresh consumer in the group finds nothing new.
    assert await kafka.read(topic, group=group, idle=2.0) == []


async def test_poison_records_go_to_the_dead_letter_topic_without_blocking(
    kafka: Kafka, hook_server: HookServer, ctsync_process: Callable[..., Ctsync]
) -> None:
    topic = await kafka.create_topic(partitions=1)
    letters_topic = await kafka.create_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    values = [*updates(5, 5, "a"), b"not json {", *updates(5, 5, "b"), b'{"notificationType": "Nope"}']
    ends = await kafka.produce(topic, values, key=b"the-key")
    service = ctsync_process(
        kafka_env(kafka, topic, group, hook_server, CTSYNC_DEAD_LETTER_URL=f"kafka://{letters_topic}")
    )
    service.wait_for(lambda: len(service.events("message.acked")) >= 12, message="12 acks")
    assert service.stop() == 0
    assert notified_ids(hook_server) == {f"a-{i}" for i in range(5)} | {f"b-{i}" for i in range(5)}
    assert await kafka.committed(group, topic, partitions=1) == ends
    letters = await kafka.read(letters_topic, idle=1.0, partitions=1)
    assert [r.value for r in letters] == [b"not json {", b'{"notificationType": "Nope"}']  # type: ignore[attr-defined]
    headers = dict(letters[0].headers)  # type: ignore[attr-defined]
    assert letters[0].key == b"the-key"  # type: ignore[attr-defined]
    assert headers["ctsync-source-topic"] == topic.encode()
    assert headers["ctsync-source-partition"] == b"0"
    assert headers["ctsync-source-offset"] == b"5"
    assert b"JSON" in headers["ctsync-reason"] or b"json" in headers["ctsync-reason"]


async def test_a_killed_service_loses_nothing_after_restart(
    kafka: Kafka, hook_server_factory: Callable[..., HookServer], ctsync_process: Callable[..., Ctsync]
) -> None:
    # A slow hook so the kill lands mid-stream with work in flight.
    hook = hook_server_factory(limit=10, window_seconds=1.0)
    hook.faults.always = Fault.delay(0.2)
    topic = await kafka.create_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    ends = await kafka.produce(topic, updates(600, 200))
    env = kafka_env(kafka, topic, group, hook, IPAAS_BATCH_SIZE="10")
    first = ctsync_process(env)
    first.wait_for(lambda: len(hook.notifications) >= 30, message="some deliveries")
    first.kill()
    hook.faults.always = None
    again = ctsync_process({**env, "IPAAS_BATCH_SIZE": "100"})
    again.wait_for(
        lambda: len(acked_offsets(again)) == 600,
        timeout=90,
        message="every entity after the restart",
    )
    assert again.stop() == 0
    assert notified_ids(hook) == {f"p-{i}" for i in range(200)}
    assert await kafka.committed(group, topic) == ends
    assert hook.violations == 0


async def test_a_second_replica_joins_and_the_first_leaves_without_loss(
    kafka: Kafka, hook_server: HookServer, ctsync_process: Callable[..., Ctsync]
) -> None:
    topic = await kafka.create_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    ends = await kafka.produce(topic, updates(1_500, 500))
    # Each replica has its own throttle here (a shared budget needs Redis), so the hook sets no limit.
    env = kafka_env(
        kafka,
        topic,
        group,
        hook_server,
        IPAAS_THROTTLE_LIMIT="10",
        IPAAS_THROTTLE_SECONDS="1",
        IPAAS_BATCH_SIZE="10",
        CTSYNC_MAX_IN_FLIGHT="200",
    )
    first = ctsync_process(env, name="first")
    first.wait_for(lambda: len(first.events("message.acked")) >= 100, message="the first replica delivers")
    second = ctsync_process(env, name="second")
    second.wait_for(
        lambda: any(e["partitions"] for e in second.events("kafka.partitions_assigned")),
        message="the second replica gets partitions",
    )
    assert first.events("kafka.partitions_revoked")
    assert first.stop() == 0
    second.wait_for(
        lambda: len(acked_offsets(first) | acked_offsets(second)) == 1_500,
        timeout=120,
        message="every record acked by one replica or the other",
    )
    assert second.stop() == 0
    assert notified_ids(hook_server) == {f"p-{i}" for i in range(500)}
    assert await kafka.committed(group, topic) == ends
    # The second replica took over work: it acked records, and ended up owning every partition.
    assert second.events("message.acked")
    last_assignment = second.events("kafka.partitions_assigned")[-1]["partitions"]
    assert len(last_assignment) == 3  # type: ignore[arg-type]


async def test_backpressure_pauses_partitions_and_memory_stays_flat(
    kafka: Kafka, hook_server_factory: Callable[..., HookServer], ctsync_process: Callable[..., Ctsync]
) -> None:
    hook = hook_server_factory(limit=20, window_seconds=1.0)
    topic = await kafka.create_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await kafka.produce(topic, updates(30_000, 30_000))
    env = kafka_env(
        kafka,
        topic,
        group,
        hook,
        CTSYNC_STATE_URL="memory://",
        CTSYNC_MAX_IN_FLIGHT="500",
        IPAAS_BATCH_SIZE="50",
    )
    service = ctsync_process(env)
    service.wait_for(lambda: hook.request_count >= 20, message="first requests")
    # Sample after the warm-up (imports, first fetch buffers, allocator arenas), over ~10 s of steady flow.
    samples = []
    for _ in range(20):
        await asyncio.sleep(0.5)
        samples.append(service.rss_kib())
        unsettled = len(service.events("message.received")) - len(service.events("message.acked"))
        assert unsettled <= 500
    assert service.stop() == 0
    received = len(service.events("message.received"))
    pauses = len(service.events("kafka.paused"))
    assert pauses, "the partitions were never paused"
    # Paused until half the bound is free, not resumed at every acked batch of 50 (fetch churn).
    assert pauses <= received // 300 + 3, (pauses, received)
    assert 3_000 < received < 20_000  # it kept flowing, and the backlog stayed on the broker
    # 30,000 waiting records would be tens of MiB as envelopes; memory follows the bound instead.
    first, second = samples[:10], samples[10:]
    assert max(second) - max(first) < 8 * 1024, samples
    assert hook.violations == 0


async def test_sasl_settings_reach_aiokafka() -> None:
    from aiokafka import AIOKafkaConsumer

    settings = load_settings(
        None,
        environ={
            "CTSYNC_SOURCE": "kafka",
            "KAFKA_BOOTSTRAP_SERVERS": "pkc-1.eu-west-1.aws.confluent.cloud:9092",
            "KAFKA_TOPICS": "ct",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": "APIKEY123",
            "KAFKA_SASL_PASSWORD": "s3cr3t-confluent",
            "IPAAS_HOOK_URL": "https://hooks.ipaas.com/x",
            "IPAAS_WEBHOOK_API_KEY": "k" * 16,
        },
        for_command="run",
    )
    options = client_options(wiring.kafka_options(settings))
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "PLAIN"
    assert options["sasl_plain_username"] == "APIKEY123"
    assert options["sasl_plain_password"] == "s3cr3t-confluent"
    context = options["ssl_context"]
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"
    consumer = AIOKafkaConsumer(group_id="ctsync", enable_auto_commit=False, **options)
    client = consumer._client
    assert client._security_protocol == "SASL_SSL"
    assert client._sasl_plain_username == "APIKEY123"
    assert client._sasl_plain_password == "s3cr3t-confluent"
    assert client._ssl_context is context
    assert "s3cr3t-confluent" not in repr(settings.summary())


def _counts(hook: HookServer) -> Counter[str]:
    return Counter(external_id for _, external_id in hook.notifications)


async def test_dead_letters_on_a_topic_are_replayed_after_a_fix(
    kafka: Kafka, hook_server: HookServer, ctsync_process: Callable[..., Ctsync], tmp_path: Path
) -> None:
    topic = await kafka.create_topic(partitions=1)
    letters_topic = await kafka.create_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await kafka.produce(topic, [*updates(4, 4, "ok"), *updates(1, 1, "bad")])
    hook_server.reject("bad-0")
    env = kafka_env(kafka, topic, group, hook_server, CTSYNC_DEAD_LETTER_URL=f"kafka://{letters_topic}")
    service = ctsync_process(env)
    service.wait_for(lambda: len(service.events("message.acked")) >= 5, message="5 acks")
    assert service.stop() == 0
    assert "bad-0" not in notified_ids(hook_server)
    hook_server.reject_external_ids = set()  # the fix
    environ = {**service.env, "CTSYNC_DEAD_LETTER_URL": f"file:{tmp_path}/again.jsonl"}
    done = await asyncio.to_thread(
        subprocess.run,
        [*CTSYNC, "dead-letters", "replay", "--reason", "rejected", f"kafka://{letters_topic}"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "bad-0" in notified_ids(hook_server)
    assert not (tmp_path / "again.jsonl").exists()


async def test_readiness_follows_the_broker(
    hook_server: HookServer, ctsync_process: Callable[..., Ctsync], tmp_path: Path
) -> None:
    # A broker of this test's own, so stopping it leaves the session's broker alone.
    broker, bootstrap = start_tansu(tmp_path / "tansu.log")
    try:
        own = Kafka(bootstrap)
        topic = await own.create_topic(partitions=1)
        await own.produce(topic, updates(5, 5))
        service = ctsync_process(kafka_env(own, topic, f"g-{uuid.uuid4().hex[:8]}", hook_server))
        service.wait_for(lambda: len(service.events("message.acked")) >= 5, message="5 acks")
        base = f"http://{service.env['CTSYNC_HTTP_LISTEN']}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            assert (await client.get("/readyz")).status_code == 200
            stop_process(broker)
            deadline = asyncio.get_running_loop().time() + 60
            while (answer := await client.get("/readyz")).status_code == 200:
                assert asyncio.get_running_loop().time() < deadline, "still ready without a broker"
                await asyncio.sleep(0.5)
            assert "coordinator" in answer.text
        service.kill()
    finally:
        stop_process(broker)
