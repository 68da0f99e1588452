"""Sweep cursors (``consumer.ports.CursorStore``) in the ``backfill_cursors`` table of the SQLite state file,
through a connection of their own: the file is in WAL mode, so they never block the state store's reads.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from adapters.sqlite.connection import SqliteConnection

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS backfill_cursors (
    name TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL
) WITHOUT ROWID;
"""


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
