"""Keep hook requests within an iPaaS.com subscription's throttle budget.

The budget has three parts (docs/architecture.md section 3): ``limit`` requests in any moving window of
``window_seconds``, ``connections`` requests in flight at once, and ``batch_executions`` batches being
worked on at once. A 429 with ``Retry-After`` also pauses every request until that time has passed.

The server counts a request when it *arrives*, somewhere between our start and our end of it, and its window
alignment is unknown. So a request takes a window place from the moment it starts until ``window_seconds``
after it ends, and a request may start at ``now`` only if::

    in_flight + #{finished requests whose end > now - window_seconds} < limit

With that rule no half-open window ``[t, t + window_seconds)`` can hold more than ``limit`` arrivals,
whatever the latencies and wherever each request's arrival falls within its ``[start, end]``.

Three layers:

- ``ThrottleLedger``: the rule as a synchronous state machine over explicit times (no clock), so it is
  tested exhaustively with hypothesis;
- ``LocalThrottleStore``: the in-process ``ThrottleStore`` adapter, a ledger read with ``time.monotonic``;
- ``Throttle``: the async orchestrator the pipeline uses over *any* ``ThrottleStore`` (local or shared).
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from consumer import audit
from consumer.ports import Slot, ThrottleStore
from consumer.retry import backoff_delay

_T = TypeVar("_T")

# A concurrency slot frees only when someone releases one, which no clock can predict; re-poll soon.
CONCURRENCY_HINT = 0.05
# Float rounding can leave ``end + window - now`` at (or a hair below) zero while the end still counts;
# a hint is never less than this, so a caller never spins on a zero-length sleep.
MIN_HINT = 0.001


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    """The throttle settings of one iPaaS.com subscription (ranges are validated by the config)."""

    limit: int
    window_seconds: float
    connections: int
    batch_executions: int

    def __post_init__(self) -> None:
        assert self.limit > 0, "limit must be positive"
        assert self.window_seconds > 0, "window_seconds must be positive"
        assert self.connections > 0, "connections must be positive"
        assert self.batch_executions > 0, "batch_executions must be positive"


class ThrottleLedger:
    """Decide, at explicit times, whether a request or a batch may start; remember what is held.

    Every method takes ``now`` (seconds on any monotonic scale); ``now`` should not go backwards between
    calls. Slots are counted per holder, and one holder may hold several at once (a process uses one holder
    name for all its requests). Releasing a slot the holder does not hold is a no-op that returns False: a
    shared store may already have expired a dead holder's lease, so the port treats a stray release as
    harmless rather than as an error.
    """

    def __init__(self, limits: ThrottleLimits) -> None:
        self.limits = limits
        self._requests: dict[str, int] = {}
        self._batches: dict[str, int] = {}
        self._in_flight = 0
        self._in_use = 0
        # Sorted end times of finished requests that may still count in the window; pruned on every call,
        # so it never holds more than ``limit`` entries.
        self._ends: list[float] = []
        self._paused_until = float("-inf")

    @property
    def in_flight_requests(self) -> int:
        """Return how many requests are in flight (hold a connection)."""
        return self._in_flight

    @property
    def in_use_batches(self) -> int:
        """Return how many batch executions are held."""
        return self._in_use

    def window_room(self, now: float) -> int:
        """Return how many requests the window alone lets start at ``now`` (connections and pause aside)."""
        self._prune(now)
        return max(self.limits.limit - self._in_flight - len(self._ends), 0)

    def paused_for(self, now: float) -> float:
        """Return how many seconds the current pause still lasts at ``now`` (0.0 when not paused)."""
        return max(self._paused_until - now, 0.0)

    def try_acquire(self, slot: Slot, holder: str, now: float) -> float:
        """Take a slot for ``holder`` and return 0.0, or return a positive hint of seconds to wait.

        A request's hint is the longest of what blocks it: the rest of a pause, the time until enough
        counted end times fall out of the window, and ``CONCURRENCY_HINT`` when every connection is busy.
        When in-flight requests alone fill the window no end time can free a place sooner than a whole
        window from now, so the window part of the hint is ``window_seconds``.
        """
        if slot is Slot.BATCH:
            if self._in_use >= self.limits.batch_executions:
                return CONCURRENCY_HINT
            self._batches[holder] = self._batches.get(holder, 0) + 1
            self._in_use += 1
            return 0.0
        self._prune(now)
        hint = 0.0
        if now < self._paused_until:
            hint = self._paused_until - now
        if self._in_flight >= self.limits.connections:
            hint = max(hint, CONCURRENCY_HINT)
        excess = self._in_flight + len(self._ends) - self.limits.limit + 1
        if excess > 0:
            if excess > len(self._ends):
                hint = max(hint, self.limits.window_seconds)
            else:
                hint = max(hint, self._ends[excess - 1] + self.limits.window_seconds - now)
        if hint > 0.0:
            return max(hint, MIN_HINT)
        if excess > 0:
            # Rounding put the freeing end exactly on the window's edge: it still counts, so wait a hair.
            return MIN_HINT
        self._requests[holder] = self._requests.get(holder, 0) + 1
        self._in_flight += 1
        return 0.0

    def release(self, slot: Slot, holder: str, now: float) -> bool:
        """Give back one of ``holder``'s slots; return False (and change nothing) when it holds none.

        A released request keeps its window place until ``window_seconds`` after ``now``, its end.
        """
        held = self._batches if slot is Slot.BATCH else self._requests
        count = held.get(holder, 0)
        if count == 0:
            return False
        if count == 1:
            del held[holder]
        else:
            held[holder] = count - 1
        if slot is Slot.BATCH:
            self._in_use -= 1
        else:
            self._in_flight -= 1
            bisect.insort(self._ends, now)
            self._prune(now)
        return True

    def pause(self, seconds: float, now: float) -> None:
        """Let no request start before ``now + seconds``; a pause only ever extends the current one."""
        if seconds > 0:  # also false for NaN
            self._paused_until = max(self._paused_until, now + seconds)

    def _prune(self, now: float) -> None:
        expired = bisect.bisect_right(self._ends, now - self.limits.window_seconds)
        if expired:
            del self._ends[:expired]


class LocalThrottleStore:
    """Keep one process's throttle budget in memory: a ``ThrottleStore`` over a ``ThrottleLedger``.

    Holders cannot die without the process, so no lease ever needs expiring here.
    """

    def __init__(self, limits: ThrottleLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ThrottleLedger(limits)
        self.clock = clock

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        """Take a slot and return 0.0, or return how many seconds to wait before trying again."""
        return self.ledger.try_acquire(slot, holder, self.clock())

    async def release(self, slot: Slot, holder: str) -> None:
        """Give back one of ``holder``'s slots; a slot it does not hold is ignored."""
        self.ledger.release(slot, holder, self.clock())

    async def pause(self, seconds: float) -> None:
        """Let no request start for ``seconds``; a shorter pause never cuts a longer one short."""
        self.ledger.pause(seconds, self.clock())

    async def close(self) -> None:
        """Do nothing: there is nothing to let go of."""


class Throttle:
    """Wait for throttle slots on any ``ThrottleStore`` and give them back, whatever happens meanwhile.

    Waiting polls ``try_acquire``, sleeping its hint but never longer than ``poll_cap`` (other processes
    sharing the store release slots this one cannot hear about), and waking at once when this process
    releases a slot of the same kind. Waiters are not served in order: whoever polls first after a release
    gets the slot.

    Counters for metrics: ``wait_seconds`` / ``batch_wait_seconds`` (time spent waiting for a request slot /
    a batch slot, timed-out waits included) and ``requests_started`` / ``batches_started``.

    A shared store can fail (Redis down). Then nobody may start a request, because the budget is shared and
    a local guess could exceed it: acquisition keeps retrying with backoff while ``store_problem`` says why,
    and a failed release is left to the store's lease expiry.
    """

    def __init__(
        self,
        store: ThrottleStore,
        limits: ThrottleLimits,
        *,
        poll_cap: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        retry_cap: float = 30.0,
        log: Any = None,
    ) -> None:
        assert poll_cap > 0, "poll_cap must be positive"
        self.store = store
        self.retry_cap = retry_cap
        self.log = log if log is not None else audit.get_logger()
        self.store_problem: str | None = None
        self._store_failures = 0
        self._limits = limits
        self.poll_cap = poll_cap
        self.clock = clock
        self.wait_seconds = 0.0
        self.batch_wait_seconds = 0.0
        self.requests_started = 0
        self.batches_started = 0
        # One future per slot kind, resolved (and replaced) by each local release of that kind.
        self._released: dict[Slot, asyncio.Future[None]] = {}

    @property
    def limits(self) -> ThrottleLimits:
        """Return the budget this throttle keeps to."""
        return self._limits

    # ``timeout`` bounds only the wait for a slot; a caller's ``asyncio.timeout`` around the block would also
    # cut short the work done while holding it, hence the parameter ruff's ASYNC109 advises against.
    @asynccontextmanager
    async def batch_execution(
        self,
        holder: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[None]:
        """Hold one batch-execution slot for the block, across every attempt the batch makes.

        Raise ``TimeoutError`` when no slot was free within ``timeout`` seconds (None: wait for ever).
        """
        await self._acquire(Slot.BATCH, holder, timeout)
        self.batches_started += 1
        try:
            yield
        finally:
            await self._release(Slot.BATCH, holder)

    @asynccontextmanager
    async def request(
        self,
        holder: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[None]:
        """Hold one request slot (a connection and a window place) for the block, one HTTP request.

        Raise ``TimeoutError`` when the budget had no room within ``timeout`` seconds (None: wait for ever).
        """
        await self._acquire(Slot.REQUEST, holder, timeout)
        self.requests_started += 1
        try:
            yield
        finally:
            await self._release(Slot.REQUEST, holder)

    async def pause(self, seconds: float) -> None:
        """Let no request start for ``seconds`` (a 429's ``Retry-After``); an existing longer pause stays."""
        try:
            await self.store.pause(seconds)
        except Exception as exc:
            # The caller waits out the delay itself; other holders learn of the 429 from their own answers.
            self._store_failed("throttle pause", exc)

    async def _acquire(self, slot: Slot, holder: str, timeout: float | None) -> None:  # noqa: ASYNC109
        started = self.clock()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # Taken before polling, so a release that lands during the poll still wakes us.
                    released = self._release_signal(slot)
                    try:
                        hint = await self._try_acquire(slot, holder)
                    except Exception as exc:
                        hint = self._store_failed("throttle acquire", exc)
                        await asyncio.sleep(hint)
                        continue
                    if self.store_problem is not None:
                        self._store_recovered()
                    if hint <= 0.0:
                        return
                    await asyncio.wait((released,), timeout=min(hint, self.poll_cap))
        finally:
            waited = self.clock() - started
            if slot is Slot.REQUEST:
                self.wait_seconds += waited
            else:
                self.batch_wait_seconds += waited

    async def _try_acquire(self, slot: Slot, holder: str) -> float:
        hint, cancellation = await _complete(self.store.try_acquire(slot, holder))
        if cancellation is not None:
            # The store may have granted the slot while we were being cancelled: hand it straight back.
            if hint <= 0.0:
                await self._release(slot, holder)
            raise cancellation
        return hint

    async def _release(self, slot: Slot, holder: str) -> None:
        cancellation: asyncio.CancelledError | None = None
        try:
            _, cancellation = await _complete(self.store.release(slot, holder))
        except Exception as exc:
            # A shared store expires the lease of a slot nobody could give back.
            self._store_failed("throttle release", exc)
        finally:
            self._wake(slot)
        if cancellation is not None:
            raise cancellation

    def _store_failed(self, operation: str, exc: Exception) -> float:
        """Record a store failure; return how long to wait before trying again (backoff with jitter)."""
        self._store_failures += 1
        delay = backoff_delay(self._store_failures, 0.5, self.retry_cap)
        self.store_problem = f"{operation}: {type(exc).__name__}: {exc}"
        self.log.warning(
            audit.STATE_RETRYING,
            operation=operation,
            attempt=self._store_failures,
            delay_s=round(delay, 3),
            error=f"{type(exc).__name__}: {exc}",
        )
        return delay

    def _store_recovered(self) -> None:
        self.log.info(audit.STATE_RECOVERED, operation="throttle", attempts=self._store_failures)
        self.store_problem = None
        self._store_failures = 0

    def _release_signal(self, slot: Slot) -> asyncio.Future[None]:
        signal = self._released.get(slot)
        if signal is None:
            signal = asyncio.get_running_loop().create_future()
            self._released[slot] = signal
        return signal

    def _wake(self, slot: Slot) -> None:
        signal = self._released.pop(slot, None)
        if signal is not None and not signal.done():
            signal.set_result(None)


async def _complete(awaitable: Awaitable[_T]) -> tuple[_T, asyncio.CancelledError | None]:
    """Await a store call to its end even if the caller is cancelled meanwhile; return the cancellation.

    An interrupted ``try_acquire`` could leave a slot taken with nobody to release it, and an interrupted
    ``release`` would leak the slot (for ever in-process, until its lease expires in a shared store). The
    caller re-raises the returned cancellation once it has put things right.
    """
    task = asyncio.ensure_future(awaitable)
    cancellation: asyncio.CancelledError | None = None
    while True:
        try:
            return await asyncio.shield(task), cancellation
        except asyncio.CancelledError as error:
            if task.cancelled():
                raise
            cancellation = error


# A sweep's share of the budget (backfill, reconcile).


def share_limits(limits: ThrottleLimits, share: float) -> ThrottleLimits:
    """Return the part of ``limits`` a sweep may use: ``floor(limit * share)`` requests per window (at least
    one) and as large a part of the concurrency limits (at least one each)."""
    if not 0.0 < share <= 1.0:
        raise ValueError("the budget share must be above 0 and at most 1")
    return ThrottleLimits(
        limit=max(1, math.floor(limits.limit * share)),
        window_seconds=limits.window_seconds,
        connections=max(1, math.floor(limits.connections * share)),
        batch_executions=max(1, math.floor(limits.batch_executions * share)),
    )


class ShareThrottleStore:
    """A ``ThrottleStore`` that holds its user to a share of the budget of another ``ThrottleStore``.

    A slot is first taken from a local ledger with the share's limits, then from the inner store (the whole
    subscription's budget: in process, or shared through Redis with ``ctsync run``). So the sweep alone never
    uses more than its share, and the sweep and live traffic together stay within the whole limit.

    When the inner store refuses, the local slot is kept as a reservation for the next attempt rather than
    given back: releasing a request slot counts a window place for a whole window, which a request that never
    happened must not cost. (A reservation left by a waiter that was cancelled is taken by the next one.)
    """

    def __init__(
        self,
        inner: ThrottleStore,
        limits: ThrottleLimits,
        *,
        close_inner: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.limits = limits
        self.ledger = ThrottleLedger(limits)
        self.clock = clock
        self._close_inner = close_inner
        self._reserved: dict[tuple[Slot, str], int] = {}

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        """Take a slot of the share, then of the whole budget; return 0.0 or seconds to wait."""
        key = (slot, holder)
        if self._reserved.get(key, 0) == 0:
            hint = self.ledger.try_acquire(slot, holder, self.clock())
            if hint > 0.0:
                return hint
            self._reserved[key] = self._reserved.get(key, 0) + 1
        hint = await self.inner.try_acquire(slot, holder)
        if hint > 0.0:
            return hint
        self._reserved[key] -= 1
        return 0.0

    async def release(self, slot: Slot, holder: str) -> None:
        try:
            await self.inner.release(slot, holder)
        finally:
            self.ledger.release(slot, holder, self.clock())

    async def pause(self, seconds: float) -> None:
        self.ledger.pause(seconds, self.clock())
        await self.inner.pause(seconds)

    async def close(self) -> None:
        if self._close_inner:
            await self.inner.close()


def ceiling_per_minute(limits: ThrottleLimits, batch_size: int) -> float:
    """Return the most notifications per minute ``limits`` let through at ``batch_size`` per request."""
    return limits.limit * batch_size * 60.0 / limits.window_seconds
