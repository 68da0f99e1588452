"""One SQLite connection on a thread of its own: SQLite calls block, and a connection stays on its thread."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


class SqliteThread:
    """Run functions of a connection to ``path`` (WAL mode, ``schema`` applied on first use) on one thread."""

    def __init__(self, path: Path, schema: str, *, name: str, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.schema = schema
        self.busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(self.schema)
            self._db = db
        return fn(self._db)

    async def open(self) -> None:
        """Connect and apply the schema now, so a bad path fails at start."""
        await self.run(lambda db: None)

    async def close(self) -> None:
        if self._db is not None:
            await self.run(lambda db: db.close())
            self._db = None
        self._executor.shutdown(wait=True)
