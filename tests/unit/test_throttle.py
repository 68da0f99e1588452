import asyncio
import math
import random
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from consumer.ports import Slot, ThrottleStore
from consumer.throttle import (
    CONCURRENCY_HINT,
    LocalThrottleStore,
    Throttle,
    ThrottleLedger,
    ThrottleLimits,
)

REQ, BATCH = Slot.REQUEST, Slot.BATCH


def ledger(limit: int = 3, window: float = 10.0, connections: int = 10, batches: int = 10) -> ThrottleLedger:
    return ThrottleLedger(ThrottleLimits(limit, window, connections, batches))


def worst_window(intervals: Sequence[tuple[float, float]], window: float) -> int:
    """Return the most arrivals a window ``[t, t + window)`` can hold, each arriving anywhere in its interval.

    A request may arrive in the window iff ``start < t + window`` and ``end >= t``. That count only drops
    just after ``t`` passes some end, so its maximum is reached at an end (or, for requests still in flight,
    whose end is infinite, at any late enough ``t``: the latest start stands in for it).
    """
    if not intervals:
        return 0
    candidates = {end for _, end in intervals if math.isfinite(end)}
    candidates.add(max(start for start, _ in intervals))
    return max(sum(1 for start, end in intervals if start < t + window and end >= t) for t in candidates)


# --------------------------------------------------------------------------------------- ledger, by hand


def test_limits_must_be_positive() -> None:
    with pytest.raises(AssertionError):
        ThrottleLimits(0, 60.0, 5, 5)
    with pytest.raises(AssertionError):
        ThrottleLimits(5, 0.0, 5, 5)


def test_window_fills_and_hint_is_time_until_the_oldest_end_leaves() -> None:
    book = ledger(limit=3, window=10.0)
    for t in (0.0, 1.0, 2.0):
        assert book.try_acquire(REQ, "a", t) == 0.0
        book.release(REQ, "a", t + 0.5)
    assert book.window_room(3.0) == 0
    assert book.try_acquire(REQ, "a", 3.0) == pytest.approx(10.5 - 3.0)
    assert book.try_acquire(REQ, "a", 10.49) > 0.0
    assert book.window_room(10.5) == 1
    assert book.try_acquire(REQ, "a", 10.5) == 0.0
    assert book.try_acquire(REQ, "a", 10.6) == pytest.approx(11.5 - 10.6)


def test_hint_counts_every_end_that_must_leave() -> None:
    book = ledger(limit=3, window=10.0, connections=3)
    book.try_acquire(REQ, "a", 0.0)
    book.try_acquire(REQ, "a", 0.0)
    book.try_acquire(REQ, "a", 0.0)
    book.release(REQ, "a", 1.0)
    book.release(REQ, "a", 2.0)
    # One in flight, two ends: one place is needed, the oldest end (1.0) frees it.
    assert book.try_acquire(REQ, "b", 5.0) == pytest.approx(6.0)
    book.release(REQ, "a", 3.0)
    assert book.try_acquire(REQ, "b", 5.0) == pytest.approx(6.0)


def test_in_flight_requests_fill_the_window() -> None:
    book = ledger(limit=2, window=10.0, connections=5)
    assert book.try_acquire(REQ, "a", 0.0) == 0.0
    assert book.try_acquire(REQ, "b", 0.0) == 0.0
    assert book.window_room(100.0) == 0
    # No end can free a place before a whole window after a release that has not happened yet.
    assert book.try_acquire(REQ, "c", 100.0) == 10.0
    assert book.in_flight_requests == 2


def test_end_time_not_start_time_governs_expiry() -> None:
    book = ledger(limit=1, window=10.0)
    book.try_acquire(REQ, "a", 0.0)
    book.release(REQ, "a", 5.0)
    assert book.try_acquire(REQ, "a", 12.0) == pytest.approx(3.0)
    assert book.try_acquire(REQ, "a", 15.0) == 0.0


def test_pause_blocks_requests_and_only_extends() -> None:
    book = ledger()
    book.pause(10.0, now=0.0)
    book.pause(2.0, now=1.0)
    assert book.try_acquire(REQ, "a", 5.0) == pytest.approx(5.0)
    book.pause(20.0, now=5.0)
    assert book.paused_for(10.0) == pytest.approx(15.0)
    book.pause(0.0, now=6.0)
    book.pause(float("nan"), now=6.0)
    assert book.try_acquire(REQ, "a", 24.0) == pytest.approx(1.0)
    assert book.try_acquire(REQ, "a", 25.0) == 0.0


def test_pause_does_not_hold_batches() -> None:
    book = ledger()
    book.pause(10.0, now=0.0)
    assert book.try_acquire(BATCH, "a", 1.0) == 0.0


def test_hint_is_the_longest_blocker() -> None:
    book = ledger(limit=1, window=10.0)
    book.try_acquire(REQ, "a", 0.0)
    book.release(REQ, "a", 1.0)
    book.pause(3.0, now=2.0)
    assert book.try_acquire(REQ, "a", 2.0) == pytest.approx(9.0)
    book.pause(20.0, now=2.0)
    assert book.try_acquire(REQ, "a", 2.0) == pytest.approx(20.0)


def test_connections_limit_and_release_frees() -> None:
    book = ledger(limit=100, connections=2)
    assert book.try_acquire(REQ, "a", 0.0) == 0.0
    assert book.try_acquire(REQ, "b", 0.0) == 0.0
    assert book.try_acquire(REQ, "c", 0.0) == CONCURRENCY_HINT
    assert book.release(REQ, "a", 0.1) is True
    assert book.try_acquire(REQ, "c", 0.1) == 0.0
    assert book.in_flight_requests == 2


def test_batch_executions_limit_and_release_frees() -> None:
    book = ledger(limit=1, batches=2)
    assert book.try_acquire(BATCH, "a", 0.0) == 0.0
    assert book.try_acquire(BATCH, "a", 0.0) == 0.0
    assert book.try_acquire(BATCH, "b", 0.0) == CONCURRENCY_HINT
    assert book.in_use_batches == 2
    assert book.release(BATCH, "a", 1.0) is True
    assert book.try_acquire(BATCH, "b", 1.0) == 0.0
    # Batches take no window place.
    assert book.window_room(1.0) == 1


def test_releasing_what_is_not_held_is_a_no_op() -> None:
    book = ledger(limit=2, connections=1, batches=1)
    book.try_acquire(REQ, "a", 0.0)
    book.try_acquire(BATCH, "a", 0.0)
    assert book.release(REQ, "b", 1.0) is False
    assert book.release(BATCH, "b", 1.0) is False
    assert book.release(BATCH, "a", 1.0) is True
    assert book.release(BATCH, "a", 1.0) is False
    assert book.in_flight_requests == 1
    assert book.in_use_batches == 0
    # A stray release takes no window place either.
    assert book.window_room(1.0) == 1


def test_end_times_stay_bounded_by_limit() -> None:
    book = ledger(limit=4, window=1.0, connections=4)
    t = 0.0
    for _ in range(1000):
        if book.try_acquire(REQ, "a", t) == 0.0:
            book.release(REQ, "a", t + 0.01)
        t += 0.07
        assert len(book._ends) <= 4


# ----------------------------------------------------------------------------------- ledger, properties


class LedgerMachine(RuleBasedStateMachine):
    """Drive a ledger with any schedule and compare it with the plain rule recomputed from full history."""

    holders = ("a", "b", "c")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.paused_until = -math.inf
        # Every request ever started: [start, end], end infinite while in flight.
        self.requests: list[list[float]] = []
        self.open_requests: dict[str, list[int]] = {holder: [] for holder in self.holders}
        self.batches: dict[str, int] = dict.fromkeys(self.holders, 0)

    @initialize(
        limit=st.integers(1, 6),
        window=st.sampled_from([1.0, 2.5, 10.0]),
        connections=st.integers(1, 4),
        batches=st.integers(1, 3),
    )
    def set_limits(self, limit: int, window: float, connections: int, batches: int) -> None:
        self.limits = ThrottleLimits(limit, window, connections, batches)
        self.book = ThrottleLedger(self.limits)

    # Times are multiples of 1/4 so the arithmetic is exact and the hint can be checked to the tick.
    @rule(quarters=st.one_of(st.integers(0, 4), st.integers(0, 60)))
    def advance(self, quarters: int) -> None:
        self.now += quarters / 4

    def in_flight(self) -> int:
        return sum(len(ids) for ids in self.open_requests.values())

    def allowed_at(self, t: float) -> bool:
        counted = sum(
            1 for _, end in self.requests if math.isfinite(end) and end > t - self.limits.window_seconds
        )
        return (
            t >= self.paused_until
            and self.in_flight() < self.limits.connections
            and self.in_flight() + counted < self.limits.limit
        )

    @rule(holder=st.sampled_from(holders))
    def acquire_request(self, holder: str) -> None:
        self.try_request(holder)

    # A waiter comes back when the hint says, give or take a tick: this puts the window's edges under test.
    @rule(holder=st.sampled_from(holders), ticks=st.integers(-1, 1))
    def acquire_request_after_hint(self, holder: str, ticks: int) -> None:
        hint = self.try_request(holder)
        if hint > 0.0:
            # Rounded up to the tick: the connection hint (0.05) would break the exact arithmetic.
            self.now += max(math.ceil(hint * 4) / 4 + ticks / 4, 0.0)
            self.try_request(holder)

    def try_request(self, holder: str) -> float:
        allowed = self.allowed_at(self.now)
        hint = self.book.try_acquire(REQ, holder, self.now)
        assert (hint == 0.0) == allowed
        if hint == 0.0:
            assert self.now >= self.paused_until
            self.open_requests[holder].append(len(self.requests))
            self.requests.append([self.now, math.inf])
            return hint
        assert hint > 0.0
        if self.in_flight() >= self.limits.connections:
            assert hint >= CONCURRENCY_HINT
        elif self.in_flight() >= self.limits.limit:
            # Only a release can help, and its end then counts for a whole window.
            assert hint >= self.limits.window_seconds
        else:
            # Nothing but time stands in the way: the hint is exactly when the rule lets it start.
            assert self.allowed_at(self.now + hint)
            assert not self.allowed_at(self.now + hint - 0.125)
        return hint

    @rule(holder=st.sampled_from(holders), data=st.data())
    def release_request(self, holder: str, data: st.DataObject) -> None:
        held = self.open_requests[holder]
        released = self.book.release(REQ, holder, self.now)
        assert released == bool(held)
        if held:
            # The ledger counts, it does not know which of the holder's requests ended: any one may.
            index = held.pop(data.draw(st.integers(0, len(held) - 1)))
            self.requests[index][1] = self.now

    @rule(holder=st.sampled_from(holders))
    def acquire_batch(self, holder: str) -> None:
        allowed = sum(self.batches.values()) < self.limits.batch_executions
        hint = self.book.try_acquire(BATCH, holder, self.now)
        assert (hint == 0.0) == allowed
        if allowed:
            self.batches[holder] += 1
        else:
            assert hint == CONCURRENCY_HINT

    @rule(holder=st.sampled_from(holders))
    def release_batch(self, holder: str) -> None:
        assert self.book.release(BATCH, holder, self.now) == (self.batches[holder] > 0)
        self.batches[holder] = max(self.batches[holder] - 1, 0)

    @rule(quarters=st.integers(0, 40))
    def pause(self, quarters: int) -> None:
        self.book.pause(quarters / 4, self.now)
        if quarters:
            self.paused_until = max(self.paused_until, self.now + quarters / 4)

    @invariant()
    def concurrency_within_limits(self) -> None:
        assert self.book.in_flight_requests == self.in_flight() <= self.limits.connections
        assert self.book.in_use_batches == sum(self.batches.values()) <= self.limits.batch_executions

    @invariant()
    def no_window_can_hold_more_than_limit(self) -> None:
        intervals = [(start, end) for start, end in self.requests]
        assert worst_window(intervals, self.limits.window_seconds) <= self.limits.limit

    @invariant()
    def room_and_memory_agree_with_history(self) -> None:
        counted = sum(
            1
            for _, end in self.requests
            if math.isfinite(end) and end > self.now - self.limits.window_seconds
        )
        assert self.book.window_room(self.now) == max(self.limits.limit - self.in_flight() - counted, 0)
        assert len(self.book._ends) <= self.limits.limit


TestLedgerProperties = LedgerMachine.TestCase
TestLedgerProperties.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12) | st.none()), max_size=8),
    st.sampled_from([1.0, 2.5]),
)
def test_worst_window_matches_a_sweep(spans: list[tuple[int, int | None]], window: float) -> None:
    intervals = [(q / 4, math.inf if length is None else (q + length) / 4) for q, length in spans]
    # Every time is a multiple of 1/4, so every count a window can take shows at some multiple of 1/8.
    sweep = max(
        (
            sum(1 for start, end in intervals if start < t / 8 + window and end >= t / 8)
            for t in range(-40, 200)
        ),
        default=0,
    )
    assert worst_window(intervals, window) == sweep


def test_worst_window_sees_the_boundary_cases() -> None:
    # Ends at 0 and a start at 10 cannot share a window [t, t + 10): arrival at 0 and at 10.
    assert worst_window([(0.0, 0.0), (10.0, 10.0)], 10.0) == 1
    # A start a hair earlier can.
    assert worst_window([(0.0, 0.0), (9.99, 10.0)], 10.0) == 2
    # A long request overlaps both neighbours even if they are far apart.
    assert worst_window([(0.0, 0.0), (0.0, 30.0), (25.0, math.inf)], 10.0) == 2
    assert worst_window([(0.0, 1.0), (1.0, math.inf), (50.0, math.inf)], 10.0) == 2


# ------------------------------------------------------------------------------------ Throttle, async

FAST = ThrottleLimits(limit=5, window_seconds=0.5, connections=3, batch_executions=4)


def make_throttle(limits: ThrottleLimits = FAST) -> tuple[Throttle, LocalThrottleStore]:
    store = LocalThrottleStore(limits)
    return Throttle(store, limits), store


async def eventually(condition: object, deadline: float = 2.0) -> None:
    assert callable(condition)
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_concurrent_tasks_never_exceed_limits() -> None:
    throttle, store = make_throttle()
    intervals: list[tuple[float, float]] = []
    peak = {"requests": 0, "batches": 0}
    rng = random.Random(7)
    began = time.monotonic()

    async def deliver(n: int) -> None:
        async with throttle.batch_execution("p"):
            peak["batches"] = max(peak["batches"], store.ledger.in_use_batches)
            async with throttle.request("p"):
                start = time.monotonic()
                peak["requests"] = max(peak["requests"], store.ledger.in_flight_requests)
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                intervals.append((start, time.monotonic()))

    async with asyncio.TaskGroup() as group:
        for n in range(9):
            group.create_task(deliver(n))
    elapsed = time.monotonic() - began
    assert len(intervals) == 9
    assert peak["requests"] <= FAST.connections
    assert peak["batches"] <= FAST.batch_executions
    assert worst_window(intervals, FAST.window_seconds) <= FAST.limit
    # Nine requests need two windows' worth of waiting, not much more.
    assert elapsed < 1.6
    assert throttle.requests_started == 9
    assert throttle.wait_seconds > 0.5
    assert store.ledger.in_flight_requests == store.ledger.in_use_batches == 0


class LongHintStore:
    """Answer every refusal with a long hint, so only an early wake-up can explain a prompt acquisition."""

    def __init__(self, inner: LocalThrottleStore) -> None:
        self.inner = inner

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        hint = await self.inner.try_acquire(slot, holder)
        return 0.0 if hint == 0.0 else 30.0

    async def release(self, slot: Slot, holder: str) -> None:
        await self.inner.release(slot, holder)

    async def pause(self, seconds: float) -> None:
        await self.inner.pause(seconds)

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.parametrize("slot", [REQ, BATCH])
async def test_waiter_wakes_promptly_on_release(slot: Slot) -> None:
    limits = ThrottleLimits(limit=100, window_seconds=0.5, connections=1, batch_executions=1)
    inner = LocalThrottleStore(limits)
    store: ThrottleStore = LongHintStore(inner)
    throttle = Throttle(store, limits, poll_cap=30.0)
    hold = throttle.request if slot is REQ else throttle.batch_execution
    release = asyncio.Event()
    acquired_at: list[float] = []

    async def holder() -> None:
        async with hold("first"):
            await release.wait()

    async def waiter() -> None:
        async with hold("second"):
            acquired_at.append(time.monotonic())

    async with asyncio.TaskGroup() as group:
        group.create_task(holder())
        await eventually(lambda: inner.ledger.in_flight_requests + inner.ledger.in_use_batches == 1)
        group.create_task(waiter())
        await asyncio.sleep(0.05)
        assert acquired_at == []
        released_at = time.monotonic()
        release.set()
    assert acquired_at[0] - released_at < 0.1


async def test_cancellation_while_holding_releases_the_slots() -> None:
    limits = ThrottleLimits(limit=10, window_seconds=0.5, connections=1, batch_executions=1)
    throttle, store = make_throttle(limits)
    inside = asyncio.Event()

    async def stuck() -> None:
        async with throttle.batch_execution("p"), throttle.request("p"):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(stuck())
    await inside.wait()
    assert store.ledger.in_flight_requests == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.ledger.in_flight_requests == store.ledger.in_use_batches == 0
    async with asyncio.timeout(0.1), throttle.batch_execution("q"), throttle.request("q"):
        pass


async def test_cancelled_waiter_takes_nothing() -> None:
    limits = ThrottleLimits(limit=10, window_seconds=0.5, connections=1, batch_executions=1)
    throttle, store = make_throttle(limits)

    async def wait_for_a_connection() -> None:
        async with throttle.request("q"):
            pytest.fail("acquired a busy connection")

    async with throttle.request("p"):
        waiter = asyncio.create_task(wait_for_a_connection())
        await asyncio.sleep(0.02)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert store.ledger.in_flight_requests == 0


class SlowStore:
    """Take a while over every call, as a shared store across the network would."""

    def __init__(self, inner: LocalThrottleStore, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        # The store has granted the slot; its answer is still on the way back.
        hint = await self.inner.try_acquire(slot, holder)
        await asyncio.sleep(self.delay)
        return hint

    async def release(self, slot: Slot, holder: str) -> None:
        await asyncio.sleep(self.delay)
        await self.inner.release(slot, holder)

    async def pause(self, seconds: float) -> None:
        await self.inner.pause(seconds)

    async def close(self) -> None:
        await self.inner.close()


async def test_cancellation_during_slow_store_calls_leaks_no_slot() -> None:
    limits = ThrottleLimits(limit=10, window_seconds=0.5, connections=2, batch_executions=2)
    inner = LocalThrottleStore(limits)
    throttle = Throttle(SlowStore(inner, 0.05), limits)
    inside = asyncio.Event()

    async def hold() -> None:
        async with throttle.request("p"):
            inside.set()
            await asyncio.Event().wait()

    async def acquire_only() -> None:
        async with throttle.request("p"):
            pytest.fail("a cancelled acquisition went on")

    # Cancelled while the store is granting the slot: it is handed back.
    acquiring = asyncio.create_task(acquire_only())
    await asyncio.sleep(0.02)
    acquiring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    assert inner.ledger.in_flight_requests == 0

    # Cancelled twice, the second time while the store is releasing: the release still completes.
    holding = asyncio.create_task(hold())
    await inside.wait()
    holding.cancel()
    await asyncio.sleep(0.02)
    holding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holding
    assert inner.ledger.in_flight_requests == 0


async def test_timeout_raises_and_counts_the_wait() -> None:
    limits = ThrottleLimits(limit=10, window_seconds=0.5, connections=1, batch_executions=1)
    throttle, store = make_throttle(limits)
    async with throttle.request("p"), throttle.batch_execution("p"):
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            async with throttle.request("q", timeout=0.1):
                pytest.fail("acquired a busy connection")
        with pytest.raises(TimeoutError):
            async with throttle.batch_execution("q", timeout=0.1):
                pytest.fail("acquired a busy batch slot")
        assert 0.2 <= time.monotonic() - began < 0.5
    assert throttle.wait_seconds >= 0.1
    assert throttle.batch_wait_seconds >= 0.1
    assert throttle.requests_started == 1
    assert store.ledger.in_flight_requests == store.ledger.in_use_batches == 0


async def test_pause_blocks_everyone_and_only_extends() -> None:
    throttle, _ = make_throttle()
    began = time.monotonic()
    await throttle.pause(0.3)
    await throttle.pause(0.05)
    starts: list[float] = []

    async def send(holder: str) -> None:
        async with throttle.request(holder):
            starts.append(time.monotonic() - began)

    async with asyncio.TaskGroup() as group:
        for holder in ("a", "b", "c"):
            group.create_task(send(holder))
    assert len(starts) == 3
    assert min(starts) >= 0.3
    assert max(starts) < 0.6


async def test_local_store_reads_its_clock() -> None:
    now = [100.0]
    limits = ThrottleLimits(limit=1, window_seconds=10.0, connections=1, batch_executions=1)
    store = LocalThrottleStore(limits, clock=lambda: now[0])
    assert await store.try_acquire(REQ, "a") == 0.0
    now[0] = 102.0
    await store.release(REQ, "a")
    await store.release(REQ, "a")
    now[0] = 105.0
    assert await store.try_acquire(REQ, "a") == pytest.approx(7.0)
    await store.pause(20.0)
    assert await store.try_acquire(REQ, "a") == pytest.approx(20.0)
    await store.close()
    assert throttle_limits_of(Throttle(store, limits)) is limits


def throttle_limits_of(throttle: Throttle) -> ThrottleLimits:
    return throttle.limits


class _FlakyStore(LocalThrottleStore):
    """A store that fails its first ``failures`` calls, like a shared store whose server is down."""

    def __init__(self, limits: ThrottleLimits, failures: int) -> None:
        super().__init__(limits)
        self.failures = failures

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("redis: connection refused")

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        self._maybe_fail()
        return await super().try_acquire(slot, holder)

    async def release(self, slot: Slot, holder: str) -> None:
        self._maybe_fail()
        await super().release(slot, holder)


async def test_a_failing_store_is_retried_and_reported_never_bypassed() -> None:
    limits = ThrottleLimits(limit=10, window_seconds=1.0, connections=1, batch_executions=1)
    store = _FlakyStore(limits, failures=3)
    throttle = Throttle(store, limits, retry_cap=0.02)
    problems: list[str | None] = []

    async def watch() -> None:
        while True:
            problems.append(throttle.store_problem)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    async with throttle.request("a"):
        pass
    watcher.cancel()
    assert any(p and "ConnectionError" in p for p in problems)
    assert throttle.store_problem is None
    assert throttle.requests_started == 1


async def test_a_failed_release_is_left_to_the_lease_and_does_not_raise() -> None:
    limits = ThrottleLimits(limit=10, window_seconds=1.0, connections=1, batch_executions=1)
    store = _FlakyStore(limits, failures=0)
    throttle = Throttle(store, limits, retry_cap=0.02)
    async with throttle.batch_execution("a"):
        store.failures = 1
    assert throttle.store_problem is not None and "release" in throttle.store_problem
