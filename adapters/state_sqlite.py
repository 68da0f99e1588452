"""A StateStore in one SQLite file: delivered keys and watermarks that survive a restart (one replica).

SQLite calls are blocking, so they run on one dedicated thread (the connection never changes threads);
each port call is one transaction on that thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from adapters._sqlite import SqliteThread
from consumer.ports import StateView

_T = TypeVar("_T")

# SQLite's default limit on host parameters in one statement is 32766 on current builds, 999 on old ones.
_CHUNK = 900
# Expired rows are deleted at most this often; lookups ignore them in between.
_PURGE_EVERY_SECONDS = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivered_keys (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    resource TEXT PRIMARY KEY, rank INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS delivered_keys_expires ON delivered_keys (expires);
CREATE INDEX IF NOT EXISTS watermarks_expires ON watermarks (expires);
"""


class UnusableStateFile(ValueError):
    """The state file exists but is not a SQLite database (or is one this store cannot read)."""


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class SqliteStateStore:
    """Delivered keys and watermarks in a SQLite database file (WAL mode)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._sqlite = SqliteThread(self.path, _SCHEMA, name="ctsync-sqlite", busy_timeout=5.0)
        self._last_purge = 0.0

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._sqlite.run(fn)

    async def open(self) -> None:
        """Create the file and schema now, so a bad path fails at start.

        Raise UnusableStateFile when the file is there but is not a SQLite database this store can use.
        """
        try:
            await self._sqlite.open()
        except sqlite3.DatabaseError as exc:
            await self._sqlite.close()
            raise UnusableStateFile(
                f"{self.path} is not a usable SQLite state file ({exc}); move it away, or point "
                "CTSYNC_STATE_URL at another file"
            ) from None
        except BaseException:
            await self._sqlite.close()
            raise

    async def lookup(self, message_keys: Collection[str], resource_keys: Collection[str]) -> StateView:
        keys, resources = list(message_keys), list(resource_keys)
        now = self._clock()

        def query(db: sqlite3.Connection) -> StateView:
            delivered: set[str] = set()
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT key FROM delivered_keys WHERE expires > ? AND key IN ({marks})", (now, *chunk)
                )
                delivered.update(row[0] for row in rows)
            watermarks: dict[str, int] = {}
            for chunk in _chunks(resources):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT resource, rank FROM watermarks WHERE expires > ? AND resource IN ({marks})",
                    (now, *chunk),
                )
                watermarks.update(rows)
            return StateView(frozenset(delivered), watermarks)

        return await self._run(query)

    async def record_delivered(
        self, message_keys: Collection[str], watermarks: Mapping[str, int], ttl_seconds: float
    ) -> None:
        now = self._clock()
        expires = now + ttl_seconds
        key_rows = [(key, expires) for key in message_keys]
        mark_rows = [(resource, rank, expires, now) for resource, rank in watermarks.items()]
        purge = now - self._last_purge > _PURGE_EVERY_SECONDS
        if purge:
            self._last_purge = now

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR REPLACE INTO delivered_keys VALUES (?, ?)", key_rows)
                # An expired watermark no longer counts, so the new rank replaces it rather than competing.
                db.executemany(
                    "INSERT INTO watermarks VALUES (?1, ?2, ?3) ON CONFLICT (resource) DO UPDATE SET"
                    " rank = CASE WHEN expires > ?4 THEN max(rank, excluded.rank) ELSE excluded.rank END,"
                    " expires = excluded.expires",
                    mark_rows,
                )
                if purge:
                    db.execute("DELETE FROM delivered_keys WHERE expires <= ?", (now,))
                    db.execute("DELETE FROM watermarks WHERE expires <= ?", (now,))
                db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR): a second ROLLBACK would
                # fail with "cannot rollback" and hide the error that matters.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

        await self._run(write)

    async def close(self) -> None:
        await self._sqlite.close()
