"""In-process state: delivered keys and watermarks in dicts (tests, ``memory://``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

from consumer.ports import StateView

_V = TypeVar("_V")


class MemoryStateStore:
    """A StateStore in dicts, bounded by ``max_entries`` (oldest entries are forgotten first)."""

    def __init__(self, max_entries: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys: dict[str, float] = {}
        self._watermarks: dict[str, tuple[int, float]] = {}
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
        self, message_keys: Collection[str], watermarks: Mapping[str, int], ttl_seconds: float
    ) -> None:
        expires = self._clock() + ttl_seconds
        for key in message_keys:
            self._keys.pop(key, None)
            self._keys[key] = expires
        for resource, rank in watermarks.items():
            previous = self._watermarks.pop(resource, None)
            if previous is not None and previous[1] > expires - ttl_seconds:
                rank = max(rank, previous[0])
            self._watermarks[resource] = (rank, expires)
        self._evict(self._keys)
        self._evict(self._watermarks)

    def _evict(self, table: dict[str, _V]) -> None:
        # Insertion order is refresh order, so the first entries are the least recently delivered.
        excess = len(table) - self._max_entries
        if excess > 0:
            for key in list(table)[:excess]:
                del table[key]

    async def close(self) -> None:
        return None
