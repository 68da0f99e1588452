"""The subscription's throttle budget in Redis, shared by every replica (docs/architecture.md section 3).

The same rule as ``consumer.throttle.ThrottleLedger``, kept in four keys under the deployment's prefix:

- ``throttle:conn``: requests in flight, a sorted set of ``holder|id`` members scored by lease expiry;
- ``throttle:ends``: window places of finished requests, scored by their end time; a place counts while
  ``end > now - window``, so a request holds its place from its start until a window after its end;
- ``throttle:batch``: batch executions, leases like the requests';
- ``throttle:pause``: the time no request may start before (a 429's ``Retry-After``), only ever extended.

A request may start iff it is not paused, ``in_flight < connections`` and ``in_flight + ends < limit``.
Each ``try_acquire`` and ``release`` is one Lua script call, one round trip, and every time is the Redis
server's ``TIME`` taken inside the script, so replica clocks do not matter.

Leases: a slot's member expires ``lease_seconds`` after it was taken or last refreshed. A heartbeat task
refreshes this store's live members every ``heartbeat_seconds``; a replica that dies (SIGKILL) stops
refreshing, and its slots free within ``lease_seconds``. An expired request lease becomes a finished
request ending at the lease's expiry (the latest the dead process could still have been sending), so its
window place keeps counting: expiry frees the connection, never the window. A beat writes back every slot
the store still holds, so after a Redis restart (or a lapse longer than the lease) the live replicas'
slots count again within one beat. What a restart of a Redis without persistence does lose is the window's
finished places: for one window after it the budget may admit up to ``limit`` requests too many, so a Redis
with persistence or a replica suits a strict budget.

Why not the ``limits`` library: its moving window counts a hit from the moment it is taken and for exactly
one window, keyed by a counter; it has no notion of a place held until a window after the request *ends*,
nor of concurrency leases that expire with their holder. Those two are the crux here, and they need the
in-flight set and the end-time set to be read and written in one atomic step, which a dedicated script does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from typing import Final

import redis.asyncio as aioredis

from adapters.redis.state import (
    CALL_TIMEOUT,
    RedisGuard,
    RedisOptions,
    StoreUnavailable,
    answering,
    ping,
    redis_client,
)
from consumer import audit
from consumer.ports import Slot
from consumer.throttle import CONCURRENCY_HINT, MIN_HINT, ThrottleLimits

__all__ = ["RedisThrottleStore", "StoreUnavailable", "open_throttle_store"]

LEASE_SECONDS: Final = 15.0
HEARTBEAT_SECONDS: Final = 5.0
# A pause longer than a day is an unreadable Retry-After, not a plan.
MAX_PAUSE_SECONDS: Final = 86400.0


# Shared by the scripts: the server's time in ms, and how long a key outlives its last write.
_PREAMBLE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""

# KEYS: conn, ends, batch, pause. ARGV: slot, member, limit, window ms, connections, batch executions,
# lease ms, concurrency hint ms, min hint ms, key TTL ms. Returns the hint in ms as a string ("0": taken);
# a string because Redis truncates a Lua number reply to an integer.
_TRY_ACQUIRE: Final = (
    _PREAMBLE
    + """
local conn, ends, batch, pause = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local slot, member = ARGV[1], ARGV[2]
local limit, window = tonumber(ARGV[3]), tonumber(ARGV[4])
local connections, batches = tonumber(ARGV[5]), tonumber(ARGV[6])
local lease, busy, min_hint, keep = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]

if slot == 'batch' then
    redis.call('ZREMRANGEBYSCORE', batch, '-inf', now)
    -- A call retried after a lost reply finds its own member: it already holds the slot.
    if redis.call('ZSCORE', batch, member) then return '0' end
    if redis.call('ZCARD', batch) >= batches then return tostring(busy) end
    redis.call('ZADD', batch, now + lease, member)
    redis.call('PEXPIRE', batch, keep)
    return '0'
end

-- An expired request lease is a request that ended, at the latest, when its lease expired.
local expired = redis.call('ZRANGEBYSCORE', conn, '-inf', now, 'WITHSCORES')
for i = 1, #expired, 2 do
    redis.call('ZADD', ends, expired[i + 1], expired[i])
end
if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', conn, '-inf', now)
    redis.call('PEXPIRE', ends, keep)
end
redis.call('ZREMRANGEBYSCORE', ends, '-inf', now - window)
if redis.call('ZSCORE', conn, member) then return '0' end

local in_flight = redis.call('ZCARD', conn)
local counted = redis.call('ZCARD', ends)
local hint = 0
local paused = tonumber(redis.call('GET', pause))
if paused and now < paused then hint = paused - now end
if in_flight >= connections then hint = math.max(hint, busy) end
local excess = in_flight + counted - limit + 1
if excess > 0 then
    if excess > counted then
        hint = math.max(hint, window)
    else
        local freeing = redis.call('ZRANGE', ends, excess - 1, excess - 1, 'WITHSCORES')
        hint = math.max(hint, tonumber(freeing[2]) + window - now)
    end
    -- The freeing end sits exactly on the window's edge: it still counts, so wait a hair.
    hint = math.max(hint, min_hint)
end
if hint > 0 then return tostring(math.max(hint, min_hint)) end
redis.call('ZADD', conn, now + lease, member)
redis.call('PEXPIRE', conn, keep)
return '0'
"""
)

# KEYS: conn, ends, batch. ARGV: slot, member, key TTL ms. Returns 1 when the member was held, else 0.
_RELEASE: Final = (
    _PREAMBLE
    + """
local conn, ends, batch = KEYS[1], KEYS[2], KEYS[3]
local slot, member, keep = ARGV[1], ARGV[2], ARGV[3]
if slot == 'batch' then
    return redis.call('ZREM', batch, member)
end
if redis.call('ZREM', conn, member) == 1 then
    redis.call('ZADD', ends, now, member)
    redis.call('PEXPIRE', ends, keep)
    return 1
end
-- Its lease expired while the request was still running (Redis was out of reach): its place was counted
-- from the lease's expiry, but the request really ended now.
if redis.call('ZSCORE', ends, member) then
    redis.call('ZADD', ends, 'GT', now, member)
    return 1
end
return 0
"""
)

# KEYS: pause. ARGV: seconds in ms. A pause only ever extends the current one.
_PAUSE: Final = (
    _PREAMBLE
    + """
local ms = tonumber(ARGV[1])
local untill = now + ms
local current = tonumber(redis.call('GET', KEYS[1]))
if current == nil or untill > current then
    redis.call('SET', KEYS[1], tostring(untill), 'PX', math.ceil(ms) + 1000)
end
return 1
"""
)

# KEYS: conn, batch. ARGV: lease ms, key TTL ms, number of request members, request members, batch members.
# Every member is (re)written: one whose lease lapsed while Redis was out of reach, or that a Redis restart
# forgot, is still held, so it counts again. A member released meanwhile is never in the list: releases and
# beats take turns (``RedisThrottleStore._lease_lock``).
_HEARTBEAT: Final = (
    _PREAMBLE
    + """
local expiry = now + tonumber(ARGV[1])
local requests = tonumber(ARGV[3])
for i = 4, 3 + requests do
    redis.call('ZADD', KEYS[1], expiry, ARGV[i])
end
for i = 4 + requests, #ARGV do
    redis.call('ZADD', KEYS[2], expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
)


class RedisThrottleStore:
    """A ``ThrottleStore`` in Redis: one budget for every replica of a deployment, with expiring leases.

    ``round_trips`` counts ``try_acquire``/``release``/``pause`` calls (one script call each);
    ``heartbeats`` counts lease refreshes, which run only while this store holds a slot.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        limits: ThrottleLimits,
        *,
        url: str = "redis://",
        password: str | None = None,
        lease_seconds: float = LEASE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        call_timeout: float = CALL_TIMEOUT,
        owns_client: bool = True,
    ) -> None:
        assert 0 < heartbeat_seconds < lease_seconds, "the heartbeat must come well within the lease"
        self.client = client
        self.limits = limits
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.guard = RedisGuard(url, password, call_timeout)
        # Lease refreshes are counted apart from the per-batch calls.
        self._beat_guard = RedisGuard(url, password, call_timeout)
        self.heartbeat_failures = 0
        self._owns_client = owns_client
        base = prefix + "throttle:"
        self._conn, self._ends, self._batch, self._pause = (
            base + name for name in ("conn", "ends", "batch", "pause")
        )
        self._acquire = client.register_script(_TRY_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._pause_script = client.register_script(_PAUSE)
        self._heartbeat_script = client.register_script(_HEARTBEAT)
        # The members this store holds, per slot kind and holder; a release gives back the oldest.
        self._held: dict[tuple[Slot, str], list[str]] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        # A beat must not write back a member whose release is on its way: they take turns.
        self._lease_lock = asyncio.Lock()
        self.log = audit.get_logger("ctsync.throttle").bind()
        window_ms = limits.window_seconds * 1000
        self._lease_ms = lease_seconds * 1000
        self._keep_ms = math.ceil(window_ms + self._lease_ms) + 1000

    @property
    def round_trips(self) -> int:
        """Return how many script calls ``try_acquire``, ``release`` and ``pause`` made."""
        return self.guard.round_trips

    @property
    def heartbeats(self) -> int:
        """Return how many lease refreshes this store made."""
        return self._beat_guard.round_trips

    def held(self, slot: Slot) -> int:
        """Return how many slots of this kind this store holds now (every holder)."""
        return sum(len(members) for (kind, _), members in self._held.items() if kind is slot)

    async def ping(self) -> None:
        """Check that Redis answers; raise ``StoreUnavailable`` otherwise."""
        await ping(self.client, self.guard)

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        """Take a slot and return 0.0, or return how many seconds to wait before trying again."""
        member = f"{holder}|{uuid.uuid4().hex}"
        limits = self.limits
        args: list[str | int | float] = [
            slot.value,
            member,
            limits.limit,
            repr(limits.window_seconds * 1000),
            limits.connections,
            limits.batch_executions,
            repr(self._lease_ms),
            repr(CONCURRENCY_HINT * 1000),
            repr(MIN_HINT * 1000),
            self._keep_ms,
        ]
        async with self.guard.call():
            reply = await self._acquire(keys=[self._conn, self._ends, self._batch, self._pause], args=args)
        hint = float(reply) / 1000
        if hint > 0.0:
            return max(hint, MIN_HINT)
        self._held.setdefault((slot, holder), []).append(member)
        self._ensure_heartbeat()
        return 0.0

    async def release(self, slot: Slot, holder: str) -> None:
        """Give back one of ``holder``'s slots; a slot it does not hold is ignored (no round trip)."""
        members = self._held.get((slot, holder))
        if not members:
            return
        # Forgotten locally first: if the call fails the lease is no longer refreshed and expires.
        member = members.pop(0)
        if not members:
            del self._held[(slot, holder)]
        async with self._lease_lock, self.guard.call():
            await self._release(
                keys=[self._conn, self._ends, self._batch], args=[slot.value, member, self._keep_ms]
            )

    async def pause(self, seconds: float) -> None:
        """Let no request of any replica start for ``seconds``; a shorter pause never cuts a longer one."""
        if not seconds > 0:  # also true for NaN
            return
        milliseconds = min(seconds, MAX_PAUSE_SECONDS) * 1000
        async with self.guard.call():
            await self._pause_script(keys=[self._pause], args=[repr(milliseconds)])

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat_task is None or self._heartbeat_task.done():
            self._heartbeat_task = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(), name="ctsync-throttle-heartbeat"
            )

    async def _heartbeat_loop(self) -> None:
        # Owned by this store and cancelled by ``close``; it never raises, a failed refresh is retried at
        # the next beat (the lease is three beats long).
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.refresh_leases()
            except StoreUnavailable as error:
                self.heartbeat_failures += 1
                self.log.warning("throttle.lease_refresh_failed", error=str(error))

    async def refresh_leases(self) -> None:
        """Extend the lease of every slot this store holds, in one script call (the heartbeat's beat)."""
        async with self._lease_lock:
            requests = [m for (slot, _), ms in self._held.items() if slot is Slot.REQUEST for m in ms]
            batches = [m for (slot, _), ms in self._held.items() if slot is Slot.BATCH for m in ms]
            if not requests and not batches:
                return
            args: list[str | int] = [repr(self._lease_ms), self._keep_ms, len(requests), *requests, *batches]
            async with self._beat_guard.call():
                await self._heartbeat_script(keys=[self._conn, self._batch], args=args)

    async def close(self) -> None:
        """Stop the heartbeat, give back what is still held (best effort), close the client if owned."""
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            for slot, holder in list(self._held):
                while self._held.get((slot, holder)):
                    with contextlib.suppress(StoreUnavailable):
                        await self.release(slot, holder)
        finally:
            self._held.clear()
            if self._owns_client:
                await self.client.aclose()


async def open_throttle_store(
    options: RedisOptions,
    limits: ThrottleLimits,
    *,
    lease_seconds: float = LEASE_SECONDS,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
    check: bool = True,
) -> RedisThrottleStore:
    """Return the shared throttle on ``options``' Redis; raise ``StoreUnavailable`` if it is down.

    ``check=False`` skips the PING (start while Redis is down; every call raises until it is back).
    """
    store = RedisThrottleStore(
        redis_client(options.url),
        options.key_prefix,
        limits,
        url=options.url,
        password=options.password,
        lease_seconds=lease_seconds,
        heartbeat_seconds=heartbeat_seconds,
    )
    return await answering(store) if check else store
