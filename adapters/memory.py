"""In-process state: delivered keys, watermarks and claims in dicts, and sweep cursors in a dict (tests,
``memory://``); nothing survives the process.

One store object may be shared by several pipelines in one process (the core's multi-replica tests), so
claims are kept per holder like in the shared stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

from consumer.ports import Claim, StateView

_V = TypeVar("_V")


class MemoryStateStore:
    """A StateStore in dicts, bounded by ``max_entries`` (oldest entries are forgotten first)."""

    def __init__(self, max_entries: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys: dict[str, float] = {}
        self._watermarks: dict[str, tuple[int, float]] = {}
        # resource -> (holder, lease expiry)
        self._claims: dict[str, tuple[str, float]] = {}
        # resource -> (attempted rank, expiry)
        self._attempts: dict[str, tuple[int, float]] = {}
        self._max_entries = max_entries
        self._clock = clock

    async def lookup(self, message_keys: Collection[str], resource_keys: Collection[str]) -> StateView:
        now = self._clock()
        keys = self._keys
        delivered = frozenset(k for k in message_keys if keys.get(k, 0.0) > now)
        watermarks: dict[str, int] = {}
        for resource in resource_keys:
            found = self._watermarks.get(resource)
            if found is not None and found[1] > now:
                watermarks[resource] = found[0]
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
        self._release(holder, release)
        now = self._clock()
        expires = now + ttl_seconds
        for key in message_keys:
            self._keys.pop(key, None)
            self._keys[key] = expires
        for resource, rank in watermarks.items():
            previous = self._watermarks.pop(resource, None)
            if previous is not None and previous[1] > expires - ttl_seconds:
                rank = max(rank, previous[0])
            self._watermarks[resource] = (rank, expires)
            attempt = self._attempts.get(resource)
            if attempt is not None and (attempt[0] <= rank or attempt[1] <= now):
                del self._attempts[resource]
        self._evict(self._keys)
        self._evict(self._watermarks)
        self._evict(self._attempts)

    async def claim(
        self,
        holder: str,
        ranks: Mapping[str, int],
        message_keys: Collection[str],
        lease_seconds: float,
        attempt_seconds: float,
    ) -> Claim:
        now = self._clock()
        refused = frozenset(r for r in ranks if not self._take(holder, r, now + lease_seconds, now))
        granted = [r for r in ranks if r not in refused]
        view = await self.lookup(message_keys, granted)
        attempts: dict[str, int] = {}
        for resource in granted:
            watermark = view.watermarks.get(resource, -1)
            found = self._attempts.get(resource)
            previous = found[0] if found is not None and found[1] > now else -1
            if previous > watermark:
                attempts[resource] = previous
            # Only a higher attempt is written: one that waits behind an attempt must not keep it alive.
            if ranks[resource] > max(watermark, previous):
                self._attempts[resource] = (ranks[resource], now + attempt_seconds)
        return Claim(refused, view, attempts)

    async def release_claims(
        self, holder: str, resource_keys: Collection[str], withdrawn: Mapping[str, int] | None = None
    ) -> None:
        for resource, rank in (withdrawn or {}).items():
            current = self._claims.get(resource)
            attempt = self._attempts.get(resource)
            if current is not None and current[0] == holder and attempt is not None and attempt[0] == rank:
                del self._attempts[resource]
        self._release(holder, resource_keys)

    async def extend_claims(
        self, holder: str, resource_keys: Collection[str], lease_seconds: float
    ) -> frozenset[str]:
        now = self._clock()
        return frozenset(r for r in resource_keys if not self._take(holder, r, now + lease_seconds, now))

    def _take(self, holder: str, resource: str, expires: float, now: float) -> bool:
        current = self._claims.get(resource)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._claims[resource] = (holder, expires)
        return True

    def _release(self, holder: str, resource_keys: Collection[str]) -> None:
        claims = self._claims
        for resource in resource_keys:
            current = claims.get(resource)
            if current is not None and current[0] == holder:
                del claims[resource]

    def _evict(self, table: dict[str, _V]) -> None:
        # Insertion order is refresh order, so the first entries are the least recently delivered.
        excess = len(table) - self._max_entries
        if excess > 0:
            for key in list(table)[:excess]:
                del table[key]

    async def close(self) -> None:
        return None


class MemoryCursorStore:
    """Cursors in a dict: for ``memory://`` state, dry runs and tests."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.writes = 0

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def put(self, name: str, value: str) -> None:
        self.writes += 1
        self.values[name] = value

    async def delete(self, name: str) -> None:
        self.values.pop(name, None)

    async def close(self) -> None:
        return None
