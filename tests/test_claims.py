"""Claims on resources being sent, the same on every state store: memory, SQLite and a real Redis.

A claim keeps two holders (replicas) from sending notifications of one resource at once, and is read in the
same atomic step as the resource's watermark, so the second holder judges what the first delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from adapters.state_memory import MemoryStateStore
from adapters.state_redis import RedisStateStore, redis_client
from adapters.state_sqlite import SqliteStateStore
from consumer.dedupe import version_rank
from consumer.ports import StateStore


@pytest_asyncio.fixture(params=["memory", "sqlite", "redis"], loop_scope="function")
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    state: StateStore
    if request.param == "memory":
        state = MemoryStateStore(clock=time.monotonic)
    elif request.param == "sqlite":
        state = SqliteStateStore(tmp_path / "state.db")
    else:
        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        state = RedisStateStore(redis_client(url), prefix, url=url)
    yield state
    await state.close()


async def test_one_holder_at_a_time_and_the_next_reads_what_the_first_delivered(store: StateStore) -> None:
    first = await store.claim("a", ["product:p1", "product:p2"], ["k1"], lease_seconds=30)
    assert first.refused == frozenset()
    assert first.view.watermarks == {} and first.view.delivered_keys == frozenset()
    # Claiming again renews; another holder is refused what "a" holds and gets the rest.
    assert (await store.claim("a", ["product:p1"], [], 30)).refused == frozenset()
    other = await store.claim("b", ["product:p1", "product:p3"], ["k1"], 30)
    assert other.refused == {"product:p1"}
    # "a" delivers p1 at rank 9 and ends its claim in the same step; "b" then claims and sees rank 9.
    await store.record_delivered(
        ["k1"], {"product:p1": version_rank(4, True)}, 60, holder="a", release=["product:p1"]
    )
    after = await store.claim("b", ["product:p1"], ["k1", "k2"], 30)
    assert after.refused == frozenset()
    assert after.view.watermarks == {"product:p1": 9}
    assert after.view.delivered_keys == {"k1"}
    # A release by a holder that does not hold the claim changes nothing.
    await store.release_claims("a", ["product:p1", "product:p3"])
    assert (await store.claim("a", ["product:p1", "product:p3"], [], 30)).refused == {
        "product:p1",
        "product:p3",
    }
    await store.release_claims("b", ["product:p1", "product:p3"])
    assert (await store.claim("a", ["product:p1", "product:p3"], [], 30)).refused == frozenset()


async def test_a_dead_holders_claim_lapses_and_a_live_one_keeps_it(store: StateStore) -> None:
    await store.claim("dead", ["product:p1"], [], lease_seconds=0.3)
    await store.claim("live", ["product:p2"], [], lease_seconds=0.3)
    assert (await store.claim("other", ["product:p1", "product:p2"], [], 30)).refused == {
        "product:p1",
        "product:p2",
    }
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        # "live" renews its claim well within the lease; "dead" stopped renewing.
        assert await store.extend_claims("live", ["product:p2"], 0.3) == frozenset()
        claim = await store.claim("other", ["product:p1", "product:p2"], [], 30)
        if "product:p1" not in claim.refused:
            break
        await asyncio.sleep(0.05)
    assert claim.refused == {"product:p2"}
    # The dead holder, back too late, learns that its claim was taken.
    assert await store.extend_claims("dead", ["product:p1"], 30) == {"product:p1"}
