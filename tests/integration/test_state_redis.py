"""The Redis state store: the dedupe behaviour of the local stores, one round trip per call, shared by
replicas, isolated per deployment, and failing fast (``StoreUnavailable``) when Redis is gone or hung."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from adapters.redis.state import (
    RedisStateStore,
    StoreUnavailable,
    key_prefix,
    open_state_store,
    redis_client,
)
from consumer.cli import wiring
from consumer.config import load_settings
from consumer.dedupe import Deduplicator, Judgement, Verdict, version_rank
from consumer.messages import ChangeEvent, NotificationType
from consumer.ports import StateStore
from tests.servers.redisserver import RedisServer, free_port


def updated(version: int, resource_id: str = "p1") -> ChangeEvent:
    return ChangeEvent(NotificationType.RESOURCE_UPDATED, "product", resource_id, version=version)


def versionless(resource_id: str = "p3") -> ChangeEvent:
    return ChangeEvent(NotificationType.MESSAGE, "product", resource_id, message_id=f"m-{resource_id}")


def make_store(url: str, prefix: str, **timeouts: float) -> RedisStateStore:
    return RedisStateStore(redis_client(url, **timeouts), prefix, url=url)


@pytest_asyncio.fixture(loop_scope="function")
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisStateStore]:
    state = make_store(redis_url, redis_prefix)
    yield state
    await state.close()


async def eventually(check: Callable[[], object], seconds: float = 5.0) -> None:
    """Poll an async ``check`` until it returns true; fail at the deadline."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


def test_store_is_a_state_store(store: RedisStateStore) -> None:
    port: StateStore = store
    assert port is store


async def test_nothing_is_remembered_before_delivery(store: RedisStateStore) -> None:
    dedupe = Deduplicator(store, ttl_seconds=60)
    first = await dedupe.judge_many([(updated(3), False)])
    again = await dedupe.judge_many([(updated(3), False)])
    assert first == again == [Judgement(Verdict.NEW)]


async def test_delivered_keys_and_watermarks(store: RedisStateStore) -> None:
    dedupe = Deduplicator(store, ttl_seconds=60)
    await dedupe.record_delivered(["product:p1:ResourceUpdated:3"], {"product:p1": version_rank(3, False)})
    verdicts = await dedupe.judge_many(
        [(updated(3), False), (updated(2), False), (updated(4), False), (updated(1, "p2"), False)]
    )
    # A versioned change is judged by its watermark alone: its own redelivery is stale, like older ones.
    assert (
        verdicts == [Judgement(Verdict.STALE, 3), Judgement(Verdict.STALE, 3)] + [Judgement(Verdict.NEW)] * 2
    )
    # A change without a version is known by its key.
    await dedupe.record_delivered([versionless().message_key], {})
    assert await dedupe.judge_many([(versionless(), False), (versionless("p4"), False)]) == [
        Judgement(Verdict.DUPLICATE),
        Judgement(Verdict.NEW),
    ]
    # Watermarks only move up.
    await dedupe.record_delivered([], {"product:p1": version_rank(2, False)})
    assert (await dedupe.judge_many([(updated(3), False)]))[0].verdict is Verdict.STALE
    view = await store.lookup([], ["product:p1"])
    assert view.watermarks == {"product:p1": version_rank(3, False)}
    await dedupe.record_delivered([], {"product:p1": version_rank(9, True)})
    assert (await store.lookup([], ["product:p1"])).watermarks == {"product:p1": version_rank(9, True)}
    # Large ranks survive exactly (a Lua number would round-trip them through exponent notation).
    await store.record_delivered([], {"big": 2**52 + 1}, 60)
    await store.record_delivered([], {"big": 2**40}, 60)
    assert (await store.lookup([], ["big"])).watermarks == {"big": 2**52 + 1}


async def test_everything_is_forgotten_after_the_ttl(store: RedisStateStore) -> None:
    await store.record_delivered(["k"], {"r": 8}, ttl_seconds=0.2)
    assert (await store.lookup(["k"], ["r"])).watermarks == {"r": 8}

    async def forgotten() -> bool:
        view = await store.lookup(["k"], ["r"])
        return not view.delivered_keys and not view.watermarks

    await eventually(forgotten)
    # An expired watermark does not hold a new, lower one up.
    await store.record_delivered([], {"r": 2}, 60)
    assert (await store.lookup([], ["r"])).watermarks == {"r": 2}


async def test_a_write_refreshes_the_ttl(store: RedisStateStore) -> None:
    await store.record_delivered(["k"], {"r": 5}, ttl_seconds=0.2)
    await store.record_delivered(["k"], {"r": 3}, ttl_seconds=60)
    ttls = await store.client.pttl(store._key(b"k:", "k")), await store.client.pttl(store._key(b"w:", "r"))
    assert all(ttl > 1000 for ttl in ttls)
    assert (await store.lookup([], ["r"])).watermarks == {"r": 5}


async def test_one_round_trip_per_call_whatever_the_batch_size(store: RedisStateStore) -> None:
    keys = [f"k{i}" for i in range(2500)]
    before = store.round_trips
    await store.record_delivered(keys[::2], {f"r{i}": i for i in range(2500)}, 60)
    assert store.round_trips == before + 1
    view = await store.lookup(keys, [f"r{i}" for i in range(0, 2500, 5)])
    assert store.round_trips == before + 2
    assert view.delivered_keys == frozenset(keys[::2])
    assert view.watermarks == {f"r{i}": i for i in range(0, 2500, 5)}
    # Nothing to read or write: no round trip at all.
    await store.lookup([], [])
    await store.record_delivered([], {}, 60)
    assert store.round_trips == before + 2


async def test_replicas_raising_watermarks_together_keep_the_highest(
    redis_url: str, redis_prefix: str
) -> None:
    replicas = [make_store(redis_url, redis_prefix) for _ in range(3)]
    rng = random.Random(6)
    writes = [(replicas[i % 3], {f"r{rng.randrange(5)}": rng.randrange(1000)}) for i in range(150)]
    try:
        await asyncio.gather(*(replica.record_delivered([], marks, 60) for replica, marks in writes))
        expected: dict[str, int] = {}
        for _, marks in writes:
            for resource, rank in marks.items():
                expected[resource] = max(rank, expected.get(resource, rank))
        view = await replicas[1].lookup([], list(expected))
        assert view.watermarks == expected
    finally:
        for replica in replicas:
            await replica.close()


async def test_deployments_sharing_a_redis_do_not_see_each_other(redis_url: str, redis_prefix: str) -> None:
    assert key_prefix("shop", "https://hooks.example/a") == key_prefix("shop", "https://hooks.example/a/")
    prefixes = {
        key_prefix("shop", "https://hooks.example/a"),
        key_prefix("shop", "https://hooks.example/b"),
        key_prefix("other", "https://hooks.example/a"),
        key_prefix(None, None),
    }
    assert len(prefixes) == 4
    assert all(p.startswith("ctsync:{") and p.endswith("}:") and len(p) == 22 for p in prefixes)
    hook = {"IPAAS_HOOK_URL": "https://hooks.example/a", "IPAAS_WEBHOOK_API_KEY": "k" * 16}
    settings = load_settings(environ={"CTP_PROJECT_KEY": "shop", **hook}, for_command="check")
    assert wiring.redis_key_prefix(settings) == key_prefix("shop", "https://hooks.example/a")

    one, two = make_store(redis_url, redis_prefix + "one:"), make_store(redis_url, redis_prefix + "two:")
    try:
        await one.record_delivered(["k"], {"r": 4}, 60)
        assert (await one.lookup(["k"], ["r"])).delivered_keys == {"k"}
        view = await two.lookup(["k"], ["r"])
        assert not view.delivered_keys and not view.watermarks
    finally:
        await one.close()
        await two.close()


async def test_open_state_store_connects_and_pings(redis_url: str) -> None:
    settings = load_settings(
        environ={"CTSYNC_STATE_URL": redis_url, "CTP_PROJECT_KEY": "open-test"}, for_command="check"
    )
    store = await open_state_store(wiring.redis_options(settings))
    try:
        assert store.prefix == wiring.redis_options(settings).key_prefix.encode()
        assert (await store.lookup(["never-written"], [])).delivered_keys == frozenset()
    finally:
        await store.close()


async def test_unreachable_redis_fails_at_open_without_the_password() -> None:
    url = f"redis://ctsync:hunter2-secret-pw@127.0.0.1:{free_port()}/0"
    settings = load_settings(environ={"CTSYNC_STATE_URL": url}, for_command="check")
    async with asyncio.timeout(10):
        with pytest.raises(StoreUnavailable) as caught:
            await open_state_store(wiring.redis_options(settings))
    assert isinstance(caught.value, ConnectionError)
    assert "CTSYNC_STATE_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
    unchecked = await open_state_store(wiring.redis_options(settings), check=False)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable):
                await unchecked.lookup(["k"], [])
    finally:
        await unchecked.close()


async def test_rejected_credentials_are_unavailable_and_not_echoed(redis_url: str) -> None:
    url = redis_url.replace("redis://", "redis://nobody:hunter2-secret-pw@")
    settings = load_settings(environ={"CTSYNC_STATE_URL": url}, for_command="check")
    async with asyncio.timeout(10):
        with pytest.raises(StoreUnavailable) as caught:
            await open_state_store(wiring.redis_options(settings))
    assert "CTSYNC_STATE_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_redis_stopped_mid_way_fails_fast_then_recovers(
    redis_servers: Callable[[], RedisServer],
) -> None:
    server = redis_servers()
    store = make_store(server.url, "ctsync:{restart}:")
    try:
        await store.record_delivered(["k"], {"r": 1}, 60)
        server.stop()
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable, match="CTSYNC_STATE_URL"):
                await store.lookup(["k"], ["r"])
            with pytest.raises(ConnectionError):
                await store.record_delivered(["k2"], {}, 60)
        server.start()
        # A restart without persistence forgets everything, but the same store works again at once.
        assert (await store.lookup(["k"], ["r"])).delivered_keys == frozenset()
        await store.record_delivered(["k"], {"r": 2}, 60)
        assert (await store.lookup(["k"], ["r"])).watermarks == {"r": 2}
    finally:
        await store.close()


async def test_a_hung_redis_times_out_instead_of_hanging(redis_servers: Callable[[], RedisServer]) -> None:
    server = redis_servers()
    store = make_store(server.url, "ctsync:{hung}:", socket_timeout=0.3, connect_timeout=0.3)
    try:
        await store.record_delivered(["k"], {}, 60)
        server.freeze()
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable):
                await store.lookup(["k"], [])
        server.thaw()
        assert (await store.lookup(["k"], [])).delivered_keys == {"k"}
    finally:
        await store.close()
