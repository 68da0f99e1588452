"""The Redis throttle store: the ledger's rule shared by replicas, leases that outlive no dead replica,
a shared pause, and prompt ``StoreUnavailable`` when Redis is gone or hung."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.redis.state import StoreUnavailable, key_prefix, redis_client
from adapters.redis.throttle import RedisThrottleStore, open_throttle_store
from consumer.cli import wiring
from consumer.config import load_settings
from consumer.ports import Slot, ThrottleStore
from consumer.throttle import CONCURRENCY_HINT, LocalThrottleStore, Throttle, ThrottleLimits
from tests import REPO_ROOT
from tests.servers.redisserver import RedisServer, free_port

REQ, BATCH = Slot.REQUEST, Slot.BATCH
ROOT = REPO_ROOT


def limits_of(
    limit: int = 100, window: float = 0.5, connections: int = 10, batches: int = 10
) -> ThrottleLimits:
    return ThrottleLimits(limit, window, connections, batches)


def make_store(
    url: str,
    prefix: str,
    limits: ThrottleLimits,
    *,
    lease: float = 15.0,
    heartbeat: float = 5.0,
    socket_timeout: float = 2.0,
) -> RedisThrottleStore:
    client = redis_client(url, socket_timeout=socket_timeout, connect_timeout=socket_timeout)
    return RedisThrottleStore(
        client, prefix, limits, url=url, lease_seconds=lease, heartbeat_seconds=heartbeat
    )


@asynccontextmanager
async def replicas(
    url: str, prefix: str, limits: ThrottleLimits, count: int, **lease: float
) -> AsyncIterator[list[RedisThrottleStore]]:
    stores = [make_store(url, prefix, limits, **lease) for _ in range(count)]
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def poll_until_taken(
    store: ThrottleStore, slot: Slot, holder: str = "waiter", deadline: float = 5.0
) -> None:
    end = time.monotonic() + deadline
    while (hint := await store.try_acquire(slot, holder)) > 0.0:
        assert time.monotonic() < end, f"{slot} still refused at the deadline"
        await asyncio.sleep(min(hint, 0.02))


async def eventually(condition: Callable[[], bool], deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


def worst_window(intervals: Sequence[tuple[float, float]], window: float) -> int:
    """Return the most arrivals a window ``[t, t + window)`` can hold (as in test_throttle.py)."""
    if not intervals:
        return 0
    candidates = {end for _, end in intervals if math.isfinite(end)}
    candidates.add(max(start for start, _ in intervals))
    return max(sum(1 for start, end in intervals if start < t + window and end >= t) for t in candidates)


def test_store_is_a_throttle_store(redis_url: str) -> None:
    store: ThrottleStore = make_store(redis_url, "ctsync:{typing}:", limits_of())
    assert store is not None


# ------------------------------------------------------------------------ the ledger's rule, by schedule

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "acquire", "release", "pause"]),
        st.integers(0, 2),  # replica
        st.sampled_from(["a", "b"]),  # holder
        st.sampled_from([REQ, BATCH]),
        st.sampled_from([0.0, 5.0, 20.0]),  # pause seconds
    ),
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(1, 5),
    connections=st.integers(1, 4),
    batches=st.integers(1, 3),
    ops=_OPS,
)
def test_any_schedule_of_replicas_decides_like_the_ledger(
    redis_url: str, limit: int, connections: int, batches: int, ops: list[tuple[str, int, str, Slot, float]]
) -> None:
    """Drive three replicas with any schedule and compare each decision with one in-process ledger.

    The window is a minute long, so nothing leaves it during an example: the ledger, at a frozen clock,
    must grant exactly what Redis grants. Holders are per replica: a replica releases only what it holds.
    """
    limits = ThrottleLimits(limit, 60.0, connections, batches)
    prefix = f"ctsync-test:{{{uuid.uuid4().hex[:12]}}}:"

    async def run() -> None:
        model = LocalThrottleStore(limits, clock=lambda: 0.0)
        async with replicas(redis_url, prefix, limits, 3) as stores:
            for op, replica, holder, slot, seconds in ops:
                store, name = stores[replica], f"{replica}:{holder}"
                if op == "acquire":
                    expected = await model.try_acquire(slot, name)
                    hint = await store.try_acquire(slot, name)
                    assert (hint == 0.0) == (expected == 0.0), (op, replica, holder, slot)
                    assert hint == pytest.approx(expected, abs=1.0)
                    if expected == CONCURRENCY_HINT:
                        assert hint == CONCURRENCY_HINT
                elif op == "release":
                    await model.release(slot, name)
                    await store.release(slot, name)
                else:
                    await model.pause(seconds)
                    await store.pause(seconds)

    try:
        asyncio.run(run())
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


# ---------------------------------------------------------------------------------- the rule, in time


async def test_concurrent_replicas_never_exceed_limits(redis_url: str, redis_prefix: str) -> None:
    limits = ThrottleLimits(limit=5, window_seconds=0.5, connections=3, batch_executions=2)
    intervals: list[tuple[float, float]] = []
    now = {"requests": 0, "batches": 0}
    peak = dict(now)
    rng = random.Random(11)

    # Beats every 10 ms race with the releases: none may write a released slot back.
    async with replicas(redis_url, redis_prefix, limits, 3, lease=0.5, heartbeat=0.01) as stores:
        throttles = [Throttle(store, limits, poll_cap=0.05) for store in stores]

        async def deliver(n: int) -> None:
            throttle, holder = throttles[n % 3], f"replica-{n % 3}"
            async with throttle.batch_execution(holder):
                now["batches"] += 1
                peak["batches"] = max(peak["batches"], now["batches"])
                for _ in range(2):
                    async with throttle.request(holder):
                        # Taken after the grant and before the release: inside the store's own interval.
                        start = time.monotonic()
                        now["requests"] += 1
                        peak["requests"] = max(peak["requests"], now["requests"])
                        await asyncio.sleep(rng.uniform(0.0, 0.04))
                        now["requests"] -= 1
                        intervals.append((start, time.monotonic()))
                now["batches"] -= 1

        async with asyncio.timeout(20), asyncio.TaskGroup() as group:
            for n in range(8):
                group.create_task(deliver(n))

        assert len(intervals) == 16
        assert peak["requests"] <= limits.connections
        assert peak["batches"] <= limits.batch_executions
        assert worst_window(intervals, limits.window_seconds) <= limits.limit
        assert sum(store.held(REQ) + store.held(BATCH) for store in stores) == 0
        client = stores[0].client
        assert await client.zcard(redis_prefix + "throttle:conn") == 0
        assert await client.zcard(redis_prefix + "throttle:batch") == 0
        assert sum(store.heartbeats for store in stores) > 10
        assert 0 < await client.pttl(redis_prefix + "throttle:ends") <= 0.5 * 1000 + 500 + 1001


async def test_a_window_place_is_held_until_a_window_after_the_request_ends(
    redis_url: str, redis_prefix: str
) -> None:
    limits = limits_of(limit=1, window=0.3)
    async with replicas(redis_url, redis_prefix, limits, 2) as (one, two):
        assert await one.try_acquire(REQ, "a") == 0.0
        # Held longer than a window: a window counted from the start would already have room.
        await asyncio.sleep(0.4)
        assert await two.try_acquire(REQ, "b") == pytest.approx(limits.window_seconds)
        before_release = time.monotonic()
        await one.release(REQ, "a")
        hint = await two.try_acquire(REQ, "b")
        assert 0.0 < hint <= limits.window_seconds
        await poll_until_taken(two, REQ, "b")
        assert time.monotonic() - before_release >= limits.window_seconds


async def test_in_flight_requests_fill_the_window(redis_url: str, redis_prefix: str) -> None:
    limits = limits_of(limit=2, window=10.0, connections=5)
    async with replicas(redis_url, redis_prefix, limits, 2) as (one, two):
        assert await one.try_acquire(REQ, "a") == 0.0
        assert await two.try_acquire(REQ, "b") == 0.0
        # No end can free a place before a whole window after a release that has not happened yet.
        assert await two.try_acquire(REQ, "c") == 10.0


async def test_connections_and_batches_are_shared_and_stray_releases_do_nothing(
    redis_url: str, redis_prefix: str
) -> None:
    limits = limits_of(limit=100, connections=2, batches=1)
    async with replicas(redis_url, redis_prefix, limits, 2) as (one, two):
        assert await one.try_acquire(REQ, "a") == 0.0
        assert await two.try_acquire(REQ, "b") == 0.0
        assert await one.try_acquire(REQ, "a") == CONCURRENCY_HINT
        trips = two.round_trips
        await two.release(REQ, "a")  # "a" holds nothing through this replica
        await two.release(BATCH, "b")
        assert two.round_trips == trips, "a release of nothing held costs no round trip"
        assert await one.try_acquire(REQ, "a") == CONCURRENCY_HINT
        assert await one.try_acquire(BATCH, "a") == 0.0
        assert await two.try_acquire(BATCH, "b") == CONCURRENCY_HINT
        await one.release(BATCH, "a")
        await one.release(BATCH, "a")
        assert await two.try_acquire(BATCH, "b") == 0.0
        assert await one.try_acquire(BATCH, "a") == CONCURRENCY_HINT
        await two.release(REQ, "b")
        assert await one.try_acquire(REQ, "a") == 0.0
        # One finished request holds one window place; the stray releases took none.
        assert await one.client.zcard(redis_prefix + "throttle:ends") == 1
        assert one.held(REQ) == 2 and two.held(REQ) == 0


async def test_pause_is_shared_only_extends_and_holds_no_batch(redis_url: str, redis_prefix: str) -> None:
    limits = limits_of()
    async with replicas(redis_url, redis_prefix, limits, 2) as (one, two):
        before_pause = time.monotonic()
        await one.pause(0.5)
        await one.pause(0.1)
        await one.pause(0.0)
        await one.pause(-1.0)
        await one.pause(float("nan"))
        hint = await two.try_acquire(REQ, "b")
        assert 0.2 < hint <= 0.5
        assert await two.try_acquire(BATCH, "b") == 0.0
        await poll_until_taken(two, REQ, "b")
        assert time.monotonic() - before_pause >= 0.5


# ---------------------------------------------------------------------------------------------- leases


def forget_without_releasing(store: RedisThrottleStore) -> None:
    """Make ``store`` behave like a replica killed with SIGKILL: no heartbeat, no release, ever again."""
    task = store._heartbeat_task
    assert task is not None
    task.cancel()
    store._held.clear()


async def test_a_dead_replica_frees_its_slots_within_the_lease(redis_url: str, redis_prefix: str) -> None:
    limits = limits_of(limit=3, window=0.5, connections=2, batches=1)
    lease = 0.6
    async with replicas(redis_url, redis_prefix, limits, 2, lease=lease, heartbeat=0.2) as (dead, live):
        assert await dead.try_acquire(REQ, "dead") == 0.0
        assert await dead.try_acquire(REQ, "dead") == 0.0
        assert await dead.try_acquire(BATCH, "dead") == 0.0
        forget_without_releasing(dead)
        killed = time.monotonic()
        assert await live.try_acquire(REQ, "live") == CONCURRENCY_HINT
        assert await live.try_acquire(BATCH, "live") == CONCURRENCY_HINT
        await poll_until_taken(live, BATCH, "live", deadline=lease + 2.0)
        await poll_until_taken(live, REQ, "live", deadline=lease + 2.0)
        assert time.monotonic() - killed <= lease + 2.0
        # The dead requests ended, at the latest, when their leases expired: their places still count.
        hint = await live.try_acquire(REQ, "live")
        assert 0.0 < hint <= limits.window_seconds


async def test_a_live_replica_keeps_its_slots_past_the_lease(redis_url: str, redis_prefix: str) -> None:
    limits = limits_of(connections=1, batches=1)
    lease = 0.4
    async with replicas(redis_url, redis_prefix, limits, 2, lease=lease, heartbeat=0.1) as (one, two):
        assert await one.try_acquire(REQ, "a") == 0.0
        assert await one.try_acquire(BATCH, "a") == 0.0
        await asyncio.sleep(3 * lease)
        assert one.heartbeats >= 3 and one.heartbeat_failures == 0
        assert await two.try_acquire(REQ, "b") == CONCURRENCY_HINT
        assert await two.try_acquire(BATCH, "b") == CONCURRENCY_HINT
        await one.release(REQ, "a")
        await one.release(BATCH, "a")
        assert await two.try_acquire(REQ, "b") == 0.0
        assert await two.try_acquire(BATCH, "b") == 0.0


_HOLDER_SCRIPT = """
import asyncio, sys
from adapters.redis.state import redis_client
from adapters.redis.throttle import RedisThrottleStore
from consumer.ports import Slot
from consumer.throttle import ThrottleLimits

async def main() -> None:
    limits = ThrottleLimits(100, 0.5, 1, 1)
    store = RedisThrottleStore(redis_client(sys.argv[1]), sys.argv[2], limits,
                               lease_seconds=1.0, heartbeat_seconds=0.3)
    assert await store.try_acquire(Slot.REQUEST, "doomed") == 0.0
    assert await store.try_acquire(Slot.BATCH, "doomed") == 0.0
    print("held", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_replica_killed_with_sigkill_frees_its_slots(redis_url: str, redis_prefix: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLDER_SCRIPT,
        redis_url,
        redis_prefix,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line == b"held\n", line + await proc.stderr.read()
        async with replicas(redis_url, redis_prefix, limits_of(100, 0.5, 1, 1), 1) as (live,):
            # Held past its first lease by the subprocess's heartbeat...
            await asyncio.sleep(1.2)
            assert await live.try_acquire(REQ, "live") == CONCURRENCY_HINT
            proc.kill()
            await proc.wait()
            # ...and free within the lease once it is dead.
            await poll_until_taken(live, REQ, "live", deadline=3.0)
            await poll_until_taken(live, BATCH, "live", deadline=3.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------------------- Redis out of reach


async def test_redis_stopped_mid_way_raises_promptly_then_recovers(
    redis_servers: Callable[[], RedisServer],
) -> None:
    server = redis_servers()
    limits = limits_of(connections=2)
    async with replicas(server.url, "ctsync:{outage}:", limits, 1, lease=0.6, heartbeat=0.1) as (store,):
        throttle = Throttle(store, limits, retry_cap=0.2)
        assert await store.try_acquire(REQ, "a") == 0.0
        server.stop()
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable, match="CTSYNC_STATE_URL"):
                await store.try_acquire(REQ, "a")
            with pytest.raises(ConnectionError):
                await store.pause(1.0)
            # The heartbeat keeps beating and counting failures; it never dies of them.
            await eventually(lambda: store.heartbeat_failures > 0)
            with pytest.raises(StoreUnavailable):
                await store.release(REQ, "a")
        assert store._heartbeat_task is not None and not store._heartbeat_task.done()

        # The orchestrator keeps retrying (never falling back to a local budget) and says why meanwhile.
        async def deliver() -> None:
            async with throttle.request("a"), throttle.batch_execution("a"):
                assert store.held(REQ) == store.held(BATCH) == 1

        delivery = asyncio.create_task(deliver())
        try:
            await eventually(lambda: throttle.store_problem is not None)
            assert "CTSYNC_STATE_URL" in str(throttle.store_problem)
            assert not delivery.done()
            server.start()
            # A restart without persistence forgets every lease; the same store works again at once.
            async with asyncio.timeout(10):
                await delivery
            assert throttle.store_problem is None
        finally:
            delivery.cancel()


async def test_held_slots_count_again_after_a_redis_restart(
    redis_servers: Callable[[], RedisServer],
) -> None:
    server = redis_servers()
    limits = limits_of(connections=1, batches=1)
    async with replicas(server.url, "ctsync:{restart}:", limits, 2, lease=1.0, heartbeat=0.1) as (one, two):
        assert await one.try_acquire(REQ, "a") == 0.0
        assert await one.try_acquire(BATCH, "a") == 0.0
        server.stop()
        server.start()
        beats = one.heartbeats
        await eventually(lambda: one.heartbeats > beats + 1)
        assert await two.try_acquire(REQ, "b") == CONCURRENCY_HINT
        assert await two.try_acquire(BATCH, "b") == CONCURRENCY_HINT
        await one.release(REQ, "a")
        await one.release(BATCH, "a")
        # A released slot is never written back by a later beat.
        beats = one.heartbeats
        await asyncio.sleep(0.3)
        assert one.heartbeats == beats, "nothing held, nothing to refresh"
        assert await two.try_acquire(REQ, "b") == 0.0
        assert await two.try_acquire(BATCH, "b") == 0.0


async def test_a_hung_redis_times_out_instead_of_hanging(redis_servers: Callable[[], RedisServer]) -> None:
    server = redis_servers()
    async with replicas(server.url, "ctsync:{hung}:", limits_of(), 1, socket_timeout=0.3) as (store,):
        assert await store.try_acquire(BATCH, "a") == 0.0
        server.freeze()
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable):
                await store.try_acquire(BATCH, "a")
        server.thaw()
        assert await store.try_acquire(BATCH, "a") == 0.0


async def test_open_throttle_store(redis_url: str) -> None:
    settings = load_settings(
        environ={"CTSYNC_STATE_URL": redis_url, "CTP_PROJECT_KEY": "throttle-open"}, for_command="check"
    )
    store = await open_throttle_store(wiring.redis_options(settings), limits_of())
    try:
        assert store._conn == key_prefix("throttle-open", None) + "throttle:conn"
        assert await store.try_acquire(BATCH, "a") == 0.0
    finally:
        await store.close()
    assert store.held(BATCH) == 0

    url = f"redis://:hunter2-secret-pw@127.0.0.1:{free_port()}/0"
    bad = load_settings(environ={"CTSYNC_STATE_URL": url}, for_command="check")
    async with asyncio.timeout(10):
        with pytest.raises(StoreUnavailable) as caught:
            await open_throttle_store(wiring.redis_options(bad), limits_of())
    assert "CTSYNC_STATE_URL" in str(caught.value) and "hunter2" not in str(caught.value)
    # Unchecked, it opens while Redis is down and fails call by call instead.
    unchecked = await open_throttle_store(wiring.redis_options(bad), limits_of(), check=False)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable):
                await unchecked.try_acquire(BATCH, "a")
    finally:
        await unchecked.close()
