"""Scale-out: replicas in one Kafka group sharing Redis state and the throttle budget, and Redis outages."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import pytest

from tests.integration.test_kafka import acked_offsets, kafka_env, notified_ids, updates
from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import Ctsync, Kafka
from tests.servers.redisserver import RedisServer

pytestmark = pytest.mark.integration


def delivered_keys(*services: Ctsync) -> Counter[str]:
    """How many accepted hook requests carried each message key, over every replica's log."""
    keys: Counter[str] = Counter()
    for service in services:
        for batch in service.events("batch.sent"):
            if batch["status"] in (200, 202, 204):
                keys.update(batch["message_keys"])  # type: ignore[arg-type]
    return keys


async def test_three_replicas_share_the_budget_and_never_notify_a_version_twice(
    kafka: Kafka,
    hook_server_factory: Callable[..., HookServer],
    ctsync_process: Callable[..., Ctsync],
    redis_servers: Callable[[], RedisServer],
) -> None:
    redis = redis_servers()
    hook = hook_server_factory(limit=10, window_seconds=1.0, max_concurrent=2)
    topic = await kafka.create_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await kafka.produce(topic, updates(3_000, 600))
    env = kafka_env(
        kafka,
        topic,
        group,
        hook,
        CTSYNC_STATE_URL=redis.url,
        IPAAS_BATCH_SIZE="20",
        CTSYNC_MAX_IN_FLIGHT="300",
    )
    replicas = [ctsync_process(env, name=f"replica-{n}") for n in range(3)]
    replicas[0].wait_for(
        lambda: len(set().union(*(acked_offsets(r) for r in replicas))) == 3_000,
        timeout=150,
        message="every record acked by some replica",
    )
    for replica in replicas:
        assert replica.stop() == 0
    # The budget is shared: together the replicas kept to 10 requests per second and 2 at once.
    assert hook.window_violations == 0, hook.summary()
    assert hook.concurrency_violations == 0, hook.summary()
    assert hook.max_in_window(1.0) <= 10
    assert notified_ids(hook) == {f"p-{i}" for i in range(600)}
    twice = {key: n for key, n in delivered_keys(*replicas).items() if n > 1}
    assert not twice, twice
    # Every replica did some of the work.
    assert all(r.events("batch.sent") for r in replicas)


async def test_redis_down_means_not_ready_and_nothing_lost(
    kafka: Kafka,
    hook_server_factory: Callable[..., HookServer],
    ctsync_process: Callable[..., Ctsync],
    redis_servers: Callable[[], RedisServer],
) -> None:
    redis = redis_servers()
    hook = hook_server_factory(limit=20, window_seconds=1.0)
    topic = await kafka.create_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await kafka.produce(topic, updates(1_500, 1_500))
    env = kafka_env(kafka, topic, group, hook, CTSYNC_STATE_URL=redis.url, IPAAS_BATCH_SIZE="10")
    service = ctsync_process(env)
    base = f"http://{service.env['CTSYNC_HTTP_LISTEN']}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:

        async def ready() -> tuple[int, str]:
            answer = await client.get("/readyz")
            return answer.status_code, answer.text

        await _until(lambda: hook.request_count >= 5, "first deliveries")
        assert (await ready())[0] == 200
        redis.stop()
        _, text = await _poll(ready, lambda r: r[0] == 503)
        # The state store (claims, records) or the throttle store names itself first.
        assert "store" in text.lower() and "CTSYNC_STATE_URL" in text, text
        stalled = hook.request_count
        await asyncio.sleep(2.0)
        # Nothing goes out while the shared budget cannot be asked (one request may have been in flight).
        assert hook.request_count <= stalled + 1
        redis.start()
        await _poll(ready, lambda r: r[0] == 200, within=60)
    service.wait_for(lambda: len(acked_offsets(service)) == 1_500, timeout=120, message="all acked")
    assert service.stop() == 0
    assert notified_ids(hook) == {f"p-{i}" for i in range(1_500)}
    assert hook.violations == 0
    assert service.events("state.retrying")


async def _until(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _poll(
    probe: Callable[[], Awaitable[tuple[int, str]]],
    done: Callable[[tuple[int, str]], bool],
    within: float = 30,
) -> tuple[int, str]:
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if done(result):
            return result
        assert time.monotonic() < deadline, f"timed out; last answer {result}"
        await asyncio.sleep(0.2)
