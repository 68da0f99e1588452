"""The order rule on real brokers: a deletion is the last thing the hook hears of a resource.

Unkeyed records (as commercetools writes them) spread each resource's changes over the partitions, some
late; flights are slowed so late changes meet them in the air. One process, three replicas on Redis, a
replica SIGKILLed mid-run (its claims lapse, the others deliver its partitions' work), and Pub/Sub with one
and with two subscribers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from tests.histories import deletions_not_last, histories, shuffled, spread
from tests.integration.test_kafka import acked_offsets, kafka_env
from tests.integration.test_pubsub_integration import Ctsync as PubSubCtsync
from tests.integration.test_pubsub_integration import acked_ids, run_ctsync
from tests.servers.hookserver import Fault, HookServer
from tests.servers.kafkaserver import Ctsync, Kafka
from tests.servers.pstestserver import PubSubTestbed
from tests.servers.redisserver import RedisServer

pytestmark = pytest.mark.integration
__all__ = ["run_ctsync"]  # the fixture, used by the Pub/Sub test

# The default throttle trio scaled down: 50 requests a second, 3 at once, 20 notifications a request.
THROTTLE = {
    "IPAAS_THROTTLE_LIMIT": "50",
    "IPAAS_THROTTLE_SECONDS": "1",
    "IPAAS_CONCURRENT_CONNECTIONS": "3",
    "IPAAS_CONCURRENT_BATCH_EXECUTIONS": "3",
    "IPAAS_BATCH_SIZE": "20",
}


def slow_hook(factory: Callable[..., HookServer]) -> HookServer:
    hook = factory(limit=50, window_seconds=1.0, max_concurrent=3)
    hook.faults.always = Fault.delay(0.03)
    return hook


async def produce_unkeyed(kafka: Kafka, seed: int) -> tuple[str, int, set[str]]:
    topic = await kafka.create_topic(partitions=3)
    changes, deleted = histories(200, 2_000, seed=seed)
    for partition, values in enumerate(spread(changes, 3, seed=seed)):
        await kafka.produce(topic, values, key=None, partition=partition)
    return topic, len(changes), deleted


def holds_a_partition(replica: Ctsync) -> bool:
    assignments = replica.events("kafka.partitions_assigned")
    return bool(assignments) and bool(assignments[-1].get("partitions"))


async def test_one_process_never_notifies_a_resource_after_its_deletion(
    kafka: Kafka, hook_server_factory: Callable[..., HookServer], ctsync_process: Callable[..., Ctsync]
) -> None:
    hook = slow_hook(hook_server_factory)
    topic, total, deleted = await produce_unkeyed(kafka, seed=12)
    service = ctsync_process(kafka_env(kafka, topic, f"g-{uuid.uuid4().hex[:8]}", hook, **THROTTLE))
    service.wait_for(lambda: len(acked_offsets(service)) == total, timeout=120, message="every record acked")
    assert service.stop() == 0
    assert deletions_not_last(hook.notifications, deleted) == {}
    assert hook.violations == 0, hook.summary()


async def test_a_process_killed_and_restarted_never_notifies_a_resource_after_its_deletion(
    kafka: Kafka, hook_server_factory: Callable[..., HookServer], ctsync_process: Callable[..., Ctsync]
) -> None:
    hook = slow_hook(hook_server_factory)
    topic, total, deleted = await produce_unkeyed(kafka, seed=16)
    env = kafka_env(kafka, topic, f"g-{uuid.uuid4().hex[:8]}", hook, **THROTTLE)
    first = ctsync_process(env)
    first.wait_for(lambda: len(hook.notifications) >= 60, timeout=60, message="some deliveries")
    first.kill()
    # The same SQLite state: the killed process's claims lapse within the lease, then the restart goes on.
    again = ctsync_process(env)  # the same name: the same state file, and one log of both runs
    again.wait_for(
        lambda: len(acked_offsets(again)) == total,
        timeout=120,
        message="every record acked",
    )
    assert again.stop() == 0
    assert deletions_not_last(hook.notifications, deleted) == {}
    assert hook.violations == 0, hook.summary()


async def test_three_replicas_on_redis_never_notify_a_resource_after_its_deletion(
    kafka: Kafka,
    hook_server_factory: Callable[..., HookServer],
    ctsync_process: Callable[..., Ctsync],
    redis_servers: Callable[[], RedisServer],
) -> None:
    redis = redis_servers()
    hook = slow_hook(hook_server_factory)
    hook.faults.always = Fault.delay(0.1)  # flights long enough for the replicas to meet in them
    topic = await kafka.create_topic(partitions=3)
    # Batches of 5: four times the flights, so the replicas' flights overlap for seconds, not a moment.
    env = kafka_env(
        kafka,
        topic,
        f"g-{uuid.uuid4().hex[:8]}",
        hook,
        CTSYNC_STATE_URL=redis.url,
        **{**THROTTLE, "IPAAS_BATCH_SIZE": "5"},
    )
    replicas = [ctsync_process(env, name=f"replica-{n}") for n in range(3)]
    # Every replica holds a partition before anything is produced, so on a loaded machine one replica cannot
    # take the whole backlog before the others join (the replicas must run at once to wait for each other).
    replicas[0].wait_for(
        lambda: all(holds_a_partition(r) for r in replicas),
        timeout=90,
        message="each replica assigned a partition",
    )
    # All partitions at once, so the replicas work on them at the same time; and in different orders (one
    # as written, one reversed, one shuffled), so no replica trails another over the same resources, where
    # it would find them delivered instead of meeting them in flight.
    changes, deleted = histories(200, 2_000, seed=13)
    parts = spread(changes, 3, seed=13)
    parts = [parts[0], parts[1][::-1], shuffled(parts[2], seed=13)]
    await asyncio.gather(
        *(kafka.produce(topic, values, key=None, partition=n) for n, values in enumerate(parts))
    )
    total = len(changes)
    replicas[0].wait_for(
        lambda: len(set().union(*(acked_offsets(r) for r in replicas))) == total,
        timeout=150,
        message="every record acked by some replica",
    )
    for replica in replicas:
        assert replica.stop() == 0
    assert deletions_not_last(hook.notifications, deleted) == {}
    assert hook.violations == 0, hook.summary()
    # Resources changed on several partitions at once made replicas wait for each other's claims.
    assert sum(len(r.events("notification.claim_wait")) for r in replicas) > 0


async def test_a_replica_killed_mid_run_leaves_no_resource_notified_after_its_deletion(
    kafka: Kafka,
    hook_server_factory: Callable[..., HookServer],
    ctsync_process: Callable[..., Ctsync],
    redis_servers: Callable[[], RedisServer],
) -> None:
    redis = redis_servers()
    hook = slow_hook(hook_server_factory)
    topic, total, deleted = await produce_unkeyed(kafka, seed=14)
    env = kafka_env(kafka, topic, f"g-{uuid.uuid4().hex[:8]}", hook, CTSYNC_STATE_URL=redis.url, **THROTTLE)
    replicas = [ctsync_process(env, name=f"replica-{n}") for n in range(3)]
    replicas[0].wait_for(lambda: len(hook.notifications) >= 60, timeout=60, message="some deliveries")
    replicas[0].kill()
    # Its claims lapse within the lease; its partitions go to the others, which deliver what it had not.
    replicas[1].wait_for(
        lambda: len(set().union(*(acked_offsets(r) for r in replicas))) == total,
        timeout=150,
        message="every record acked by some replica",
    )
    for replica in replicas[1:]:
        assert replica.stop() == 0
    assert deletions_not_last(hook.notifications, deleted) == {}
    assert hook.violations == 0, hook.summary()


@pytest.mark.parametrize("subscribers", [1, 2])
def test_pubsub_subscribers_never_notify_a_resource_after_its_deletion(
    subscribers: int,
    pubsub_testbed: PubSubTestbed,
    hook_server_factory: Callable[..., HookServer],
    redis_servers: Callable[[], RedisServer],
    run_ctsync: Callable[..., PubSubCtsync],
) -> None:
    hook = slow_hook(hook_server_factory)
    changes, deleted = histories(40, 300, seed=15 + subscribers)
    ids = set(pubsub_testbed.publish(shuffled(changes, seed=15 + subscribers)))
    env = {**pubsub_testbed.env(), **hook.env(), **THROTTLE}
    if subscribers > 1:
        env["CTSYNC_STATE_URL"] = redis_servers().url
    services = [run_ctsync(env, name=f"subscriber-{n}") for n in range(subscribers)]
    services[0].wait_for(
        lambda: set().union(*(acked_ids(s) for s in services)) >= ids, 90, "every message acked"
    )
    for service in services:
        assert service.stop() == 0, service.err_path.read_text()
    assert deletions_not_last(hook.notifications, deleted) == {}
    assert hook.violations == 0, hook.summary()
