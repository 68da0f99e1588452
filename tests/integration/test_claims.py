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

from adapters.memory import MemoryStateStore
from adapters.redis.state import RedisStateStore, redis_client
from adapters.sqlite.state import SqliteStateStore
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


def ranks(*resources: str, rank: int = 2) -> dict[str, int]:
    return dict.fromkeys(resources, rank)


async def test_one_holder_at_a_time_and_the_next_reads_what_the_first_delivered(store: StateStore) -> None:
    first = await store.claim("a", {"product:p1": 2, "product:p2": 2}, ["k1"], 30, 60)
    assert first.refused == frozenset()
    assert first.view.watermarks == {} and first.view.delivered_keys == frozenset()
    # Claiming again renews; another holder is refused what "a" holds and gets the rest.
    assert (await store.claim("a", ranks("product:p1"), [], 30, 60)).refused == frozenset()
    other = await store.claim("b", ranks("product:p1", "product:p3"), ["k1"], 30, 60)
    assert other.refused == {"product:p1"}
    # "a" delivers p1 at rank 9 and ends its claim in the same step; "b" then claims and sees rank 9.
    await store.record_delivered(
        ["k1"], {"product:p1": version_rank(4, True)}, 60, holder="a", release=["product:p1"]
    )
    after = await store.claim("b", ranks("product:p1"), ["k1", "k2"], 30, 60)
    assert after.refused == frozenset()
    assert after.view.watermarks == {"product:p1": 9}
    assert after.view.delivered_keys == {"k1"}
    # A release by a holder that does not hold the claim changes nothing.
    await store.release_claims("a", ["product:p1", "product:p3"])
    assert (await store.claim("a", ranks("product:p1", "product:p3"), [], 30, 60)).refused == {
        "product:p1",
        "product:p3",
    }
    await store.release_claims("b", ["product:p1", "product:p3"])
    assert (await store.claim("a", ranks("product:p1", "product:p3"), [], 30, 60)).refused == frozenset()


async def test_a_dead_holders_claim_lapses_and_a_live_one_keeps_it(store: StateStore) -> None:
    await store.claim("dead", ranks("product:p1"), [], 0.3, 60)
    await store.claim("live", ranks("product:p2"), [], 0.3, 60)
    assert (await store.claim("other", ranks("product:p1", "product:p2"), [], 30, 60)).refused == {
        "product:p1",
        "product:p2",
    }
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        # "live" renews its claim well within the lease; "dead" stopped renewing.
        assert await store.extend_claims("live", ["product:p2"], 0.3) == frozenset()
        claim = await store.claim("other", ranks("product:p1", "product:p2"), [], 30, 60)
        if "product:p1" not in claim.refused:
            break
        await asyncio.sleep(0.05)
    assert claim.refused == {"product:p2"}
    # The dead holder, back too late, learns that its claim was taken.
    assert await store.extend_claims("dead", ["product:p1"], 30) == {"product:p1"}


async def test_an_attempt_never_confirmed_is_told_to_the_next_holder_until_a_delivery_covers_it(
    store: StateStore,
) -> None:
    # "a" claims p1 to send its deletion (rank 9) and dies before recording the delivery.
    assert (await store.claim("a", {"product:p1": 9}, [], 0.2, 60)).attempts == {}
    deadline = time.monotonic() + 3
    while (claim := await store.claim("b", {"product:p1": 4}, [], 30, 60)).refused:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # "b" learns that rank 9 may have been accepted: it must not send rank 4 on its own.
    assert claim.attempts == {"product:p1": 9}
    # Sending the deletion again (rank 9) is fine, and its delivery forgets the attempt.
    assert (await store.claim("b", {"product:p1": 9}, [], 30, 60)).attempts == {"product:p1": 9}
    await store.record_delivered([], {"product:p1": 9}, 60, holder="b", release=["product:p1"])
    after = await store.claim("c", {"product:p1": 10}, [], 30, 60)
    assert after.attempts == {} and after.view.watermarks == {"product:p1": 9}
    # An attempt the hook rejected is withdrawn by its holder and holds nothing back.
    await store.release_claims("c", ["product:p1"], withdrawn={"product:p1": 10})
    assert (await store.claim("d", {"product:p1": 10}, [], 30, 60)).attempts == {}
    # Another holder cannot withdraw it; an attempt lapses after its time.
    await store.claim("e", {"product:p2": 5}, [], 30, 0.2)
    await store.release_claims("x", [], withdrawn={"product:p2": 5})
    await store.release_claims("e", ["product:p2"])
    assert (await store.claim("f", {"product:p2": 3}, [], 30, 60)).attempts == {"product:p2": 5}
    await store.release_claims("f", ["product:p2"])
    await asyncio.sleep(0.3)
    assert (await store.claim("g", {"product:p2": 3}, [], 30, 60)).attempts == {}
