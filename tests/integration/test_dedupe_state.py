"""Dedupe logic over both local state stores (memory and SQLite), which must behave the same."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.memory import MemoryStateStore
from adapters.sqlite.state import SqliteStateStore
from consumer.dedupe import Deduplicator, Judgement, Verdict, judge, version_rank
from consumer.messages import ChangeEvent, NotificationType
from consumer.ports import StateStore, StateView


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
async def store_and_clock(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[StateStore, Clock]]:
    clock = Clock()
    store: StateStore
    if request.param == "memory":
        store = MemoryStateStore(clock=clock)
    else:
        store = SqliteStateStore(tmp_path / "state.db", clock=clock)
    yield store, clock
    await store.close()


def updated(version: int, resource_id: str = "p1") -> ChangeEvent:
    return ChangeEvent(NotificationType.RESOURCE_UPDATED, "product", resource_id, version=version)


def versionless(resource_id: str = "p3") -> ChangeEvent:
    return ChangeEvent(NotificationType.MESSAGE, "product", resource_id, message_id=f"m-{resource_id}")


def deleted(version: int) -> ChangeEvent:
    return ChangeEvent(NotificationType.RESOURCE_DELETED, "product", "p1", version=version)


def test_judge_is_pure() -> None:
    view = StateView(frozenset({"product:p1:ResourceUpdated:5"}), {"product:p1": version_rank(5, False)})
    assert judge(updated(5), False, view) == Judgement(Verdict.DUPLICATE)
    assert judge(updated(4), False, view) == Judgement(Verdict.STALE, 5)
    assert judge(updated(6), False, view) == Judgement(Verdict.NEW)
    # A deletion of the delivered version is news; an update after a delivered deletion is not.
    assert judge(deleted(5), True, view) == Judgement(Verdict.NEW)
    after_delete = StateView(frozenset(), {"product:p1": version_rank(5, True)})
    assert judge(updated(5), False, after_delete).verdict is Verdict.STALE
    assert judge(deleted(5), True, after_delete).verdict is Verdict.STALE


async def test_nothing_is_remembered_before_delivery(store_and_clock: tuple[StateStore, Clock]) -> None:
    store, _ = store_and_clock
    dedupe = Deduplicator(store, ttl_seconds=60)
    first = await dedupe.judge_many([(updated(3), False)])
    again = await dedupe.judge_many([(updated(3), False)])
    assert first == again == [Judgement(Verdict.NEW)]


async def test_delivered_keys_and_watermarks(store_and_clock: tuple[StateStore, Clock]) -> None:
    store, clock = store_and_clock
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
    # Everything is forgotten after the TTL.
    clock.now += 61
    assert (await dedupe.judge_many([(updated(3), False)]))[0].verdict is Verdict.NEW
    # An expired watermark does not hold a new, lower one up.
    await dedupe.record_delivered([], {"product:p1": version_rank(1, False)})
    assert (await store.lookup([], ["product:p1"])).watermarks == {"product:p1": version_rank(1, False)}


async def test_many_keys_in_one_lookup(store_and_clock: tuple[StateStore, Clock]) -> None:
    store, _ = store_and_clock
    keys = [f"k{i}" for i in range(2500)]
    await store.record_delivered(keys[::2], {f"r{i}": i for i in range(2500)}, 60)
    view = await store.lookup(keys, [f"r{i}" for i in range(0, 2500, 5)])
    assert view.delivered_keys == frozenset(keys[::2])
    assert len(view.watermarks) == 500


async def test_sqlite_state_survives_a_restart(tmp_path: Path) -> None:
    first = SqliteStateStore(tmp_path / "s.db")
    await first.record_delivered(["k"], {"r": 4}, 60)
    await first.close()
    second = SqliteStateStore(tmp_path / "s.db")
    view = await second.lookup(["k"], ["r"])
    await second.close()
    assert view == StateView(frozenset({"k"}), {"r": 4})


async def test_memory_store_is_bounded() -> None:
    store = MemoryStateStore(max_entries=10)
    await store.record_delivered([f"k{i}" for i in range(25)], {}, 60)
    view = await store.lookup([f"k{i}" for i in range(25)], [])
    assert view.delivered_keys == frozenset(f"k{i}" for i in range(15, 25))
