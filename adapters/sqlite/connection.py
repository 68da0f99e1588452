"""One SQLite connection used from the event loop, with a thread of its own for when SQLite would block.

A short transaction on a local file takes tens of microseconds; sending each through an executor costs more
than the SQL (the interpreter lock bounces between the threads). So a call runs inline on the loop with a
busy timeout of zero, and only when the database is locked by another process (a backfill sharing the file,
say) does it go to the connection's thread, which waits up to ``busy_timeout``. The WAL is checkpointed on
that thread too, every ``checkpoint_every`` calls, so the loop never waits for an fsync.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


def _locked(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
        "locked" in str(error) or "busy" in str(error)
    )


class SqliteConnection:
    """Run functions of a connection to ``path`` (WAL mode, ``schema`` applied on first use: a script, or a
    function that creates or migrates the tables in transactions of its own).

    Every function must be safe to run again after it raised: it is retried on the thread when the
    database was locked.
    """

    def __init__(
        self,
        path: Path,
        schema: str | Callable[[sqlite3.Connection], None],
        *,
        name: str,
        busy_timeout: float = 5.0,
        checkpoint_every: int = 500,
    ) -> None:
        self.path = path
        self.schema = schema
        self.busy_timeout = busy_timeout
        self.checkpoint_every = checkpoint_every
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None
        # Calls handed to the thread and not yet done: meanwhile the loop must not touch the connection.
        self._on_thread = 0
        self._calls = 0
        self.calls_on_thread = 0

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=0.0, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints run on the thread (see ``run``), never inside a commit on the loop.
            db.execute("PRAGMA wal_autocheckpoint=0")
            # A migration takes the write lock: wait for another process's transaction rather than fail.
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if isinstance(self.schema, str):
                db.executescript(self.schema)
            else:
                self.schema(db)
            db.execute("PRAGMA busy_timeout = 0")
            self._db = db
        return self._db

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._calls += 1
        if self._calls % self.checkpoint_every == 0:
            await self._on_its_thread(lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
        if self._on_thread == 0:
            try:
                return fn(self._connect())
            except sqlite3.OperationalError as error:
                if not _locked(error):
                    raise
        return await self._on_its_thread(fn)

    async def run_on_thread(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run a longer function (a scan) on the connection's thread, so the loop does not wait for it."""
        return await self._on_its_thread(fn)

    async def _on_its_thread(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        self._on_thread += 1
        self.calls_on_thread += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._waiting, fn)
        finally:
            self._on_thread -= 1

    def _waiting(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        db = self._connect()
        db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        try:
            return fn(db)
        finally:
            db.execute("PRAGMA busy_timeout = 0")

    async def open(self) -> None:
        """Connect and apply the schema now, so a bad path fails at start."""
        await self._on_its_thread(lambda db: None)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)
