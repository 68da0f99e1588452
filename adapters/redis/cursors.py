"""Sweep cursors (``consumer.ports.CursorStore``) in one Redis hash under the deployment's key prefix,
``<prefix>backfill-cursors``, with no TTL: a cursor is small, and a sweep resumes from it after any pause.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from adapters.redis.state import RedisGuard, RedisOptions, ping, redis_client


class RedisCursorStore:
    """Cursors in one Redis hash, ``<deployment prefix>backfill-cursors`` (no TTL: a cursor is small)."""

    def __init__(self, client: aioredis.Redis, prefix: str, guard: RedisGuard) -> None:
        self.client = client
        self.key = f"{prefix}backfill-cursors"
        self.guard = guard

    async def get(self, name: str) -> str | None:
        async with self.guard.call():
            value: bytes | str | None = await self.client.hget(self.key, name)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def put(self, name: str, value: str) -> None:
        async with self.guard.call():
            await self.client.hset(self.key, name, value)

    async def delete(self, name: str) -> None:
        async with self.guard.call():
            await self.client.hdel(self.key, name)

    async def close(self) -> None:
        await self.client.aclose()


async def open_cursor_store(options: RedisOptions) -> RedisCursorStore:
    """Open the cursor hash of ``options``' deployment; raise ``StoreUnavailable`` if Redis is down."""
    client = redis_client(options.url)
    guard = RedisGuard(options.url, options.password)
    try:
        await ping(client, guard)
    except BaseException:
        await client.aclose()
        raise
    return RedisCursorStore(client, options.key_prefix, guard)
