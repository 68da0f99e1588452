"""Where sweep cursors live between runs (``consumer.sweep.CursorStore``), next to the dedupe state.

- ``memory://`` state: ``MemoryCursorStore`` (a dict; a restarted sweep starts over, dedupe still skips what
  was delivered);
- ``sqlite:///...`` state: ``SqliteCursorStore``, a ``backfill_cursors`` table in the same database file,
  through a connection of its own (the file is in WAL mode, so it never blocks the state store's reads);
- ``redis://`` state: ``RedisCursorStore``, one hash under the deployment's key prefix.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from adapters._sqlite import SqliteConnection

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from adapters.state_redis import RedisGuard, RedisOptions

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS backfill_cursors (
    name TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL
) WITHOUT ROWID;
"""


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


class SqliteCursorStore:
    """Cursors in the ``backfill_cursors`` table of the SQLite state file; calls run on one thread."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._sqlite = SqliteConnection(self.path, _SCHEMA, name="ctsync-cursors", busy_timeout=30.0)

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._sqlite.run(fn)

    async def open(self) -> None:
        """Create the file and schema now, so a bad path fails at start."""
        await self._sqlite.open()

    async def get(self, name: str) -> str | None:
        def read(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT value FROM backfill_cursors WHERE name = ?", (name,)).fetchone()
            return str(row[0]) if row is not None else None

        return await self._run(read)

    async def put(self, name: str, value: str) -> None:
        now = self._clock()

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO backfill_cursors VALUES (?1, ?2, ?3)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                (name, value, now),
            )

        await self._run(write)

    async def delete(self, name: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM backfill_cursors WHERE name = ?", (name,)))

    async def close(self) -> None:
        await self._sqlite.close()


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


async def open_redis_cursor_store(options: RedisOptions) -> RedisCursorStore:
    """Open the cursor hash of ``options``' deployment; raise ``StoreUnavailable`` if Redis is down."""
    from adapters.state_redis import RedisGuard, ping, redis_client

    client = redis_client(options.url)
    guard = RedisGuard(options.url, options.password)
    try:
        await ping(client, guard)
    except BaseException:
        await client.aclose()
        raise
    return RedisCursorStore(client, options.key_prefix, guard)
