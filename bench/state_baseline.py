"""``bench.state``'s baseline: the SQLite state store as it was before claims and attempts shared one table
(``adapters/sqlite/state.py`` at commit ced9765, unchanged below), so both are measured in the same run."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from adapters.sqlite.connection import SqliteConnection
from consumer.ports import Claim, StateView

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
CREATE TABLE IF NOT EXISTS claims (
    resource TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    resource TEXT PRIMARY KEY, rank INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
DROP INDEX IF EXISTS delivered_keys_expires;
DROP INDEX IF EXISTS watermarks_expires;
"""
# No index on ``expires``: keeping one up to date cost about 1 µs per watermark written, for a purge that runs
# every ten minutes. The purge scans instead, on the connection's thread, so the loop never waits for it.


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
        self._sqlite = SqliteConnection(self.path, _SCHEMA, name="ctsync-sqlite", busy_timeout=5.0)
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
        return await self._run(lambda db: _read(db, keys, resources, now))

    async def claim(
        self,
        holder: str,
        ranks: Mapping[str, int],
        message_keys: Collection[str],
        lease_seconds: float,
        attempt_seconds: float,
    ) -> Claim:
        keys, resources = list(message_keys), list(ranks)
        now = self._clock()

        def claim(db: sqlite3.Connection) -> Claim:
            # IMMEDIATE: another process sharing the file cannot claim between our read and our write.
            db.execute("BEGIN IMMEDIATE")
            try:
                refused = _take(db, holder, resources, now, now + lease_seconds)
                granted = [r for r in resources if r not in refused]
                view = _read(db, keys, granted, now)
                earlier = _select(db, "SELECT resource, rank FROM attempts", granted, now)
                attempts: dict[str, int] = {}
                raised: list[tuple[str, int, float]] = []
                for resource in granted:
                    watermark = view.watermarks.get(resource, -1)
                    previous = earlier.get(resource, -1)
                    if previous > watermark:
                        attempts[resource] = previous
                    # Only a higher attempt is written: one that waits behind must not keep it alive.
                    if ranks[resource] > max(watermark, previous):
                        raised.append((resource, ranks[resource], now + attempt_seconds))
                db.executemany("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)", raised)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return Claim(refused, view, attempts)

        return await self._run(claim)

    async def release_claims(
        self, holder: str, resource_keys: Collection[str], withdrawn: Mapping[str, int] | None = None
    ) -> None:
        rows = [(resource, holder) for resource in resource_keys]
        withdrawals = [(resource, rank, holder) for resource, rank in (withdrawn or {}).items()]
        if rows or withdrawals:
            await self._run(lambda db: _release(db, rows, withdrawals))

    async def extend_claims(
        self, holder: str, resource_keys: Collection[str], lease_seconds: float
    ) -> frozenset[str]:
        resources = list(resource_keys)
        if not resources:
            return frozenset()
        now = self._clock()

        def extend(db: sqlite3.Connection) -> frozenset[str]:
            db.execute("BEGIN IMMEDIATE")
            try:
                lost = _take(db, holder, resources, now, now + lease_seconds)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return lost

        return await self._run(extend)

    async def record_delivered(
        self,
        message_keys: Collection[str],
        watermarks: Mapping[str, int],
        ttl_seconds: float,
        *,
        holder: str = "",
        release: Collection[str] = (),
    ) -> None:
        now = self._clock()
        expires = now + ttl_seconds
        key_rows = [(key, expires) for key in message_keys]
        mark_rows = [(resource, rank, expires, now) for resource, rank in watermarks.items()]
        released = list(release)
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
                for chunk in _chunks(released):
                    marks = ",".join("?" * len(chunk))
                    db.execute(
                        f"DELETE FROM claims WHERE holder = ? AND resource IN ({marks})", (holder, *chunk)
                    )
                for chunk in _chunks(list(watermarks)):
                    marks = ",".join("?" * len(chunk))
                    # An attempt at or below the resource's watermark was confirmed: forget it.
                    db.execute(
                        f"DELETE FROM attempts WHERE resource IN ({marks}) AND rank <= "
                        "(SELECT rank FROM watermarks WHERE watermarks.resource = attempts.resource)",
                        chunk,
                    )
                db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR): a second ROLLBACK would
                # fail with "cannot rollback" and hide the error that matters.
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

        await self._run(write)
        if purge:
            await self._sqlite.run_on_thread(lambda db: _purge(db, now))

    async def close(self) -> None:
        await self._sqlite.close()


def _purge(db: sqlite3.Connection, now: float) -> None:
    """Delete the rows that expired (a scan of each table: there is no index on ``expires``)."""
    db.execute("BEGIN")
    try:
        for table in ("delivered_keys", "watermarks", "claims", "attempts"):
            db.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _read(db: sqlite3.Connection, keys: Sequence[str], resources: Sequence[str], now: float) -> StateView:
    delivered: set[str] = set()
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        rows = db.execute(
            f"SELECT key FROM delivered_keys WHERE expires > ? AND key IN ({marks})", (now, *chunk)
        )
        delivered.update(row[0] for row in rows)
    watermarks = _select(db, "SELECT resource, rank FROM watermarks", resources, now)
    return StateView(frozenset(delivered), watermarks)


def _select(db: sqlite3.Connection, query: str, resources: Sequence[str], now: float) -> dict[str, Any]:
    """Run ``query`` (two columns, keyed by resource) over the unexpired rows of these resources."""
    found: dict[str, Any] = {}
    for chunk in _chunks(resources):
        marks = ",".join("?" * len(chunk))
        found.update(db.execute(f"{query} WHERE expires > ? AND resource IN ({marks})", (now, *chunk)))
    return found


def _take(
    db: sqlite3.Connection, holder: str, resources: Sequence[str], now: float, expires: float
) -> frozenset[str]:
    """Claim (or renew) each resource no other live holder holds; return the ones another holds."""
    holders = _select(db, "SELECT resource, holder FROM claims", resources, now)
    refused = frozenset(r for r, owner in holders.items() if owner != holder)
    db.executemany(
        "INSERT OR REPLACE INTO claims VALUES (?, ?, ?)",
        [(resource, holder, expires) for resource in resources if resource not in refused],
    )
    return refused


def _release(
    db: sqlite3.Connection, rows: Sequence[tuple[str, str]], withdrawals: Sequence[tuple[str, int, str]]
) -> None:
    db.execute("BEGIN")
    try:
        # An attempt is withdrawn only by the holder that made it, while it still holds the claim.
        db.executemany(
            "DELETE FROM attempts WHERE resource = ?1 AND rank = ?2"
            " AND EXISTS (SELECT 1 FROM claims WHERE resource = ?1 AND holder = ?3)",
            withdrawals,
        )
        db.executemany("DELETE FROM claims WHERE resource = ? AND holder = ?", rows)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
