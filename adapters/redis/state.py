"""Dedupe state in Redis, shared by every replica: delivered keys and watermarks, each with a TTL.

Keys live under the prefix ``RedisOptions`` gives, which wiring derives from the commercetools project key
and the hook URL (``key_prefix``), so two deployments can share one Redis. The prefix's hash is a Redis
Cluster hash tag (``ctsync:{...}:``): all keys of a deployment sit in one slot, which lets one script touch
any of them.

One round trip per port call, whatever the batch size: ``lookup`` is one ``MGET`` over the message keys and
the watermark keys; ``claim`` is one script that claims the batch's resources and reads their watermarks
and keys in the same atomic step; ``record_delivered`` is one script that sets the keys, raises the
watermarks (never lowers them) and ends the claims atomically. ``round_trips`` counts the calls, for the
scale benchmark.

Every Redis failure surfaces as ``StoreUnavailable``, a builtin ``ConnectionError``, within the client's
timeouts: the core then stops taking work and reports not-ready rather than hanging.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from consumer.audit import display_url
from consumer.ports import Claim, StateView

# Every command gives up after this long without an answer (a hung or unreachable Redis).
SOCKET_TIMEOUT: Final = 2.0
CONNECT_TIMEOUT: Final = 2.0
# The whole call, retry included, is bounded too: a belt over the client's own timeouts.
CALL_TIMEOUT: Final = 5.0

_KEY: Final = b"k:"
_WATERMARK: Final = b"w:"
_CLAIM: Final = b"c:"
_ATTEMPT: Final = b"a:"

# KEYS: message keys, then watermark keys, then the attempt key of each watermark key (same order), then
# claim keys to release. ARGV[1]: TTL in ms, ARGV[2]: how many KEYS are message keys, ARGV[3]: how many are
# watermark keys, ARGV[4]: the holder releasing its claims, ARGV[5...]: the rank of each watermark key.
# A watermark only moves up; a write refreshes its TTL; an attempt at or below it is forgotten. The claims
# are released in the same step as the watermarks rise, so no other holder can claim in between and judge
# against the old watermark.
_RECORD_DELIVERED: Final = """
local ttl = ARGV[1]
local count = tonumber(ARGV[2])
local marks = tonumber(ARGV[3])
for i = 1, count do
    redis.call('SET', KEYS[i], '1', 'PX', ttl)
end
-- Ranks stay strings as given: a Lua number would print large ones in exponent notation.
for j = 1, marks do
    local key = KEYS[count + j]
    local rank = ARGV[j + 4]
    local current = redis.call('GET', key)
    if current and tonumber(current) > tonumber(rank) then
        rank = current
    end
    redis.call('SET', key, rank, 'PX', ttl)
    local attempt = redis.call('GET', KEYS[count + marks + j])
    if attempt and tonumber(attempt) <= tonumber(rank) then
        redis.call('DEL', KEYS[count + marks + j])
    end
end
for i = count + 2 * marks + 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[4] then
        redis.call('DEL', KEYS[i])
    end
end
return #KEYS
"""

# KEYS: n claim keys, their n watermark keys and n attempt keys in the same order, then message keys.
# ARGV[1]: holder, ARGV[2]: lease in ms, ARGV[3]: n, ARGV[4]: attempt TTL in ms, ARGV[5...]: the rank each
# resource is about to be sent at (-1: none). Returns two strings per resource, then one per message key:
# the watermark ("r": another holder has the resource, "": none) and the attempt standing above it (""), and
# "1" for a delivered message key. The attempt is raised to the rank about to be sent when that is higher.
_CLAIM_SCRIPT: Final = """
local holder, lease, n, attempt_ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}
for i = 1, n do
    local owner = redis.call('GET', KEYS[i])
    if owner and owner ~= holder then
        out[#out + 1] = 'r'
        out[#out + 1] = ''
    else
        redis.call('SET', KEYS[i], holder, 'PX', lease)
        local watermark = redis.call('GET', KEYS[n + i])
        local attempt = redis.call('GET', KEYS[2 * n + i])
        local w = watermark and tonumber(watermark) or -1
        local a = attempt and tonumber(attempt) or -1
        out[#out + 1] = watermark or ''
        out[#out + 1] = (a > w) and attempt or ''
        -- Only a higher attempt is written: one that waits behind an attempt must not keep it alive.
        if tonumber(ARGV[4 + i]) > math.max(w, a) then
            redis.call('SET', KEYS[2 * n + i], ARGV[4 + i], 'PX', attempt_ttl)
        end
    end
end
for i = 3 * n + 1, #KEYS do
    out[#out + 1] = redis.call('EXISTS', KEYS[i]) == 1 and '1' or ''
end
return out
"""

# KEYS: claim keys; ARGV[1]: holder, ARGV[2]: lease in ms. Renews the holder's claims, takes back any that
# expired and nobody took, and returns the keys another holder took meanwhile.
_EXTEND_CLAIMS: Final = """
local lost = {}
for i = 1, #KEYS do
    local owner = redis.call('GET', KEYS[i])
    if owner and owner ~= ARGV[1] then
        lost[#lost + 1] = KEYS[i]
    else
        redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    end
end
return lost
"""

# KEYS: n claim keys to release, then k pairs (claim key, attempt key) of withdrawn attempts. ARGV[1]: holder,
# ARGV[2]: n, ARGV[3...]: the withdrawn ranks. An attempt is withdrawn only while its holder holds the claim
# and the attempt still stands at that rank; then the claims end.
_RELEASE_CLAIMS: Final = """
local n = tonumber(ARGV[2])
for j = 1, (#KEYS - n) / 2 do
    local claim, attempt = KEYS[n + 2 * j - 1], KEYS[n + 2 * j]
    if redis.call('GET', claim) == ARGV[1] and redis.call('GET', attempt) == ARGV[2 + j] then
        redis.call('DEL', attempt)
    end
end
for i = 1, n do
    if redis.call('GET', KEYS[i]) == ARGV[1] then
        redis.call('DEL', KEYS[i])
    end
end
return #KEYS
"""


class StoreUnavailable(ConnectionError):
    """Redis did not answer (down, unreachable, timed out, refused the credentials, out of memory).

    The message names CTSYNC_STATE_URL and the Redis address without credentials, never a password.
    """


def key_prefix(project_key: str | None, hook_url: str | None) -> str:
    """Return the key prefix of one deployment: ``ctsync:{<12 hex>}:`` from project key and hook URL.

    The braces make the hash a Redis Cluster hash tag, so a deployment's keys share one slot.
    """
    identity = f"{project_key or ''}|{(hook_url or '').rstrip('/')}"
    return f"ctsync:{{{hashlib.sha1(identity.encode()).hexdigest()[:12]}}}:"


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """A Redis to keep state in: its URL (which may hold the password; never shown) and the deployment's
    key prefix (see ``key_prefix``)."""

    url: str = field(repr=False)
    key_prefix: str
    password: str | None = field(default=None, repr=False)


def _scrub(text: str, password: str | None) -> str:
    return text.replace(password, "[redacted]") if password else text


def describe_failure(url: str, error: BaseException, password: str | None = None) -> str:
    """Return an operator's line for a Redis failure: variable, address without credentials, cause."""
    detail = _scrub(str(error), password) or type(error).__name__
    return f"CTSYNC_STATE_URL: Redis at {display_url(url)} is unavailable: {type(error).__name__}: {detail}"


def redis_client(
    url: str,
    *,
    socket_timeout: float = SOCKET_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> aioredis.Redis:
    """Return a client for ``url`` whose every command fails fast rather than hanging.

    One immediate retry lets a pooled connection that a Redis restart closed reconnect transparently.
    """
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
    )
    return client


class RedisGuard:
    """Turn any Redis failure or overlong call into ``StoreUnavailable`` and count round trips."""

    def __init__(self, url: str, password: str | None, call_timeout: float = CALL_TIMEOUT) -> None:
        self.url = url
        self._password = password
        self.call_timeout = call_timeout
        self.round_trips = 0

    @asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """Bound one round trip in time and translate its failure."""
        self.round_trips += 1
        try:
            async with asyncio.timeout(self.call_timeout):
                yield
        except (RedisError, OSError, TimeoutError) as error:
            raise StoreUnavailable(describe_failure(self.url, error, self._password)) from None


async def ping(client: aioredis.Redis, guard: RedisGuard) -> None:
    """Check that Redis answers; raise ``StoreUnavailable`` otherwise."""
    async with guard.call():
        await client.ping()


class RedisStateStore:
    """Delivered keys and watermarks in Redis, one round trip per call; shared by every replica."""

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        *,
        url: str = "redis://",
        password: str | None = None,
        call_timeout: float = CALL_TIMEOUT,
        owns_client: bool = True,
    ) -> None:
        self.client = client
        self.prefix = prefix.encode()
        self.guard = RedisGuard(url, password, call_timeout)
        self._owns_client = owns_client
        self._record = client.register_script(_RECORD_DELIVERED)
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._extend = client.register_script(_EXTEND_CLAIMS)
        self._release = client.register_script(_RELEASE_CLAIMS)

    @property
    def round_trips(self) -> int:
        """Return how many Redis round trips this store made (one per lookup, one per record)."""
        return self.guard.round_trips

    def _key(self, kind: bytes, name: str) -> bytes:
        return self.prefix + kind + name.encode()

    async def ping(self) -> None:
        """Check that Redis answers; raise ``StoreUnavailable`` otherwise."""
        await ping(self.client, self.guard)

    async def lookup(self, message_keys: Collection[str], resource_keys: Collection[str]) -> StateView:
        """Return which keys were delivered and the resources' watermarks, with one ``MGET``."""
        keys, resources = list(message_keys), list(resource_keys)
        if not keys and not resources:
            return StateView(frozenset(), {})
        names = [self._key(_KEY, key) for key in keys] + [self._key(_WATERMARK, r) for r in resources]
        async with self.guard.call():
            values = await self.client.mget(names)
        delivered = frozenset(
            key for key, value in zip(keys, values[: len(keys)], strict=True) if value is not None
        )
        watermarks = {
            resource: int(value)
            for resource, value in zip(resources, values[len(keys) :], strict=True)
            if value is not None
        }
        return StateView(delivered, watermarks)

    async def record_delivered(
        self,
        message_keys: Collection[str],
        watermarks: Mapping[str, int],
        ttl_seconds: float,
        *,
        holder: str = "",
        release: Collection[str] = (),
    ) -> None:
        """Remember keys, raise watermarks (never lower them) and end the holder's claims, atomically, with
        one script call."""
        keys = [self._key(_KEY, key) for key in message_keys]
        claims = [self._key(_CLAIM, resource) for resource in release] if holder else []
        if not keys and not watermarks and not claims:
            return
        names = (
            keys
            + [self._key(_WATERMARK, resource) for resource in watermarks]
            + [self._key(_ATTEMPT, resource) for resource in watermarks]
            + claims
        )
        ttl_ms = max(int(ttl_seconds * 1000), 1)
        args: list[int | str] = [
            ttl_ms,
            len(keys),
            len(watermarks),
            holder,
            *(int(rank) for rank in watermarks.values()),
        ]
        async with self.guard.call():
            await self._record(keys=names, args=args)

    async def claim(
        self,
        holder: str,
        ranks: Mapping[str, int],
        message_keys: Collection[str],
        lease_seconds: float,
        attempt_seconds: float,
    ) -> Claim:
        """Claim the resources no other holder holds, note the ranks about to be sent, and read the delivered
        state and earlier attempts, with one script call."""
        resources, keys = list(ranks), list(message_keys)
        if not resources and not keys:
            return Claim(frozenset(), StateView(frozenset(), {}))
        names = (
            [self._key(_CLAIM, r) for r in resources]
            + [self._key(_WATERMARK, r) for r in resources]
            + [self._key(_ATTEMPT, r) for r in resources]
            + [self._key(_KEY, k) for k in keys]
        )
        args: list[str | int] = [
            holder,
            _lease_ms(lease_seconds),
            len(resources),
            _lease_ms(attempt_seconds),
            *(int(ranks[r]) for r in resources),
        ]
        async with self.guard.call():
            values = await self._claim(keys=names, args=args)
        refused: set[str] = set()
        watermarks: dict[str, int] = {}
        attempts: dict[str, int] = {}
        for i, resource in enumerate(resources):
            watermark, attempt = values[2 * i], values[2 * i + 1]
            if watermark == b"r":
                refused.add(resource)
                continue
            if watermark:
                watermarks[resource] = int(watermark)
            if attempt:
                attempts[resource] = int(attempt)
        delivered = frozenset(
            key for key, value in zip(keys, values[2 * len(resources) :], strict=True) if value == b"1"
        )
        return Claim(frozenset(refused), StateView(delivered, watermarks), attempts)

    async def release_claims(
        self, holder: str, resource_keys: Collection[str], withdrawn: Mapping[str, int] | None = None
    ) -> None:
        """End the holder's claims on these resources (withdrawing rejected attempts first), with one script
        call."""
        withdrawn = withdrawn or {}
        names = [self._key(_CLAIM, r) for r in resource_keys]
        for resource in withdrawn:
            names += [self._key(_CLAIM, resource), self._key(_ATTEMPT, resource)]
        if names:
            args: list[str | int] = [holder, len(resource_keys), *(int(r) for r in withdrawn.values())]
            async with self.guard.call():
                await self._release(keys=names, args=args)

    async def extend_claims(
        self, holder: str, resource_keys: Collection[str], lease_seconds: float
    ) -> frozenset[str]:
        """Renew the holder's claims with one script call; return the resources another holder took."""
        resources = list(resource_keys)
        if not resources:
            return frozenset()
        by_name = {self._key(_CLAIM, r): r for r in resources}
        async with self.guard.call():
            lost = await self._extend(keys=list(by_name), args=[holder, _lease_ms(lease_seconds)])
        return frozenset(by_name[name] for name in lost)

    async def close(self) -> None:
        """Close the client (when this store made it)."""
        if self._owns_client:
            await self.client.aclose()


def _lease_ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


class _Pingable(Protocol):
    async def ping(self) -> None: ...

    async def close(self) -> None: ...


_P = TypeVar("_P", bound=_Pingable)


async def answering(store: _P) -> _P:
    """Return ``store`` once its Redis answered a PING; close it and raise if it does not."""
    try:
        await store.ping()
    except BaseException:
        await store.close()
        raise
    return store


async def open_state_store(options: RedisOptions, *, check: bool = True) -> RedisStateStore:
    """Return the state store on ``options``' Redis; raise ``StoreUnavailable`` if it does not answer.

    ``check=False`` skips the PING: the service can then start while Redis is down, report not-ready, and
    let its retries find Redis (every call raises ``StoreUnavailable`` until then).
    """
    client = redis_client(options.url)
    store = RedisStateStore(client, options.key_prefix, url=options.url, password=options.password)
    return await answering(store) if check else store
