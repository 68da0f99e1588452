"""A StateStore in one SQLite file: delivered keys, watermarks and claims that survive a restart (one replica,
or processes on one machine sharing the file, such as a backfill beside the service).

Each port call is one short transaction, run inline on the event loop, or on the connection's own thread
when another process holds the database locked (``adapters.sqlite.connection.SqliteConnection``). The purge
of expired rows runs on that thread too.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import orjson

from adapters.sqlite.connection import SqliteConnection
from consumer.ports import Claim, StateView

_T = TypeVar("_T")

# Expired rows are deleted at most this often; lookups ignore them in between.
_PURGE_EVERY_SECONDS = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivered_keys (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    resource TEXT PRIMARY KEY, rank INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS claims (
    resource TEXT PRIMARY KEY, holder TEXT, expires REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT -1, attempt_expires REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
DROP INDEX IF EXISTS delivered_keys_expires;
DROP INDEX IF EXISTS watermarks_expires;
"""
# No index on ``expires``: keeping one up to date cost about 1 µs per watermark written, for a purge that runs
# every ten minutes. The purge scans instead, on the connection's thread, so the loop never waits for it.
#
# A resource's claim and its unconfirmed attempt share one row of ``claims``, so claiming reads and writes one
# row per resource and a delivery deletes it. The claim is ``holder`` until ``expires`` (a NULL holder: no
# claim, the row kept only for its attempt); the attempt is ``attempt`` until ``attempt_expires``.
#
# Batches go to SQLite as one JSON parameter read by ``json_each``: binding one string and letting SQLite
# walk it costs less than binding a parameter per resource (``IN (?, ?, ...)``) or a statement per row
# (``executemany``), and needs no chunking under the host parameter limit.

# Files written before claims and attempts shared a table: (resource, holder, expires) claims and an
# ``attempts`` table. Their rows move into the merged table, attempts without a claim as unclaimed rows. A
# process of the earlier version still writing the file afterwards fails loudly (no ``attempts`` table, or a
# ``claims`` table of five columns) rather than claiming beside the new one unseen.
_MIGRATE_CLAIMS = """
CREATE TABLE IF NOT EXISTS attempts (
    resource TEXT PRIMARY KEY, rank INTEGER NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE claims_merged (
    resource TEXT PRIMARY KEY, holder TEXT, expires REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT -1, attempt_expires REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO claims_merged
    SELECT c.resource, c.holder, c.expires, coalesce(a.rank, -1), coalesce(a.expires, 0)
    FROM claims AS c LEFT JOIN attempts AS a USING (resource);
INSERT INTO claims_merged
    SELECT resource, NULL, 0, rank, expires FROM attempts WHERE resource NOT IN (SELECT resource FROM claims);
DROP TABLE claims;
DROP TABLE attempts;
ALTER TABLE claims_merged RENAME TO claims;
"""


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """One transaction: committed when the block ends, rolled back when it raises."""
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR): a second ROLLBACK would fail with
        # "cannot rollback" and hide the error that matters.
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def _prepare(db: sqlite3.Connection) -> None:
    """Create the tables, or migrate a file of an earlier version (in one transaction, so a process that
    dies midway leaves the old tables whole)."""
    if not _needs_migration(db):
        db.executescript(_SCHEMA)
        return
    with _transaction(db, "BEGIN IMMEDIATE"):
        # Another process may have migrated it between the look and the lock.
        if _needs_migration(db):
            for statement in _MIGRATE_CLAIMS.split(";"):
                if statement.strip():
                    db.execute(statement)
    db.executescript(_SCHEMA)


def _needs_migration(db: sqlite3.Connection) -> bool:
    columns = {row[1] for row in db.execute("PRAGMA table_info(claims)")}
    return bool(columns) and "attempt" not in columns


def _json(items: object) -> str:
    return orjson.dumps(items).decode()


def _keyed(resources: Iterable[str]) -> str:
    """A JSON object keyed by these resources: what the statements below read with ``json_each``'s key."""
    return _json(dict.fromkeys(resources, 0))


# The resources of a JSON object parameter (its keys), for ``resource IN``. (A read joins ``json_each`` to
# the table instead: about a tenth cheaper than the IN list, which SQLite first copies into a temporary
# b-tree.)
_GIVEN = "(SELECT key FROM json_each(?))"
# End ``holder``'s claims on the resources of a JSON object, keeping the rows (and their attempts).
_UNCLAIM = f"UPDATE claims SET holder = NULL, expires = 0 WHERE holder = ? AND resource IN {_GIVEN}"


class UnusableStateFile(ValueError):
    """The state file exists but is not a SQLite database (or is one this store cannot read)."""


class SqliteStateStore:
    """Delivered keys and watermarks in a SQLite database file (WAL mode)."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._sqlite = SqliteConnection(self.path, _prepare, name="ctsync-sqlite", busy_timeout=5.0)
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
        keys = list(message_keys)
        resources = _keyed(resource_keys)
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
        keys = list(message_keys)
        # The resources as a JSON object of their ranks: ``json_each`` reads its keys, and its values too
        # when every rank raises an attempt.
        batch = _json(ranks)
        now = self._clock()

        def claim(db: sqlite3.Connection) -> Claim:
            # IMMEDIATE: another process sharing the file cannot claim between our read and our write.
            with _transaction(db, "BEGIN IMMEDIATE"):
                claims = _claims_of(db, batch, now)
                refused = _held_by_others(claims, holder)
                view = _read(db, keys, batch, now)
                marks = view.watermarks
                if refused:
                    marks = {r: rank for r, rank in marks.items() if r not in refused}
                    view = StateView(view.delivered_keys, marks)
                attempts: dict[str, int] = {}
                raised: dict[str, int] = {}
                kept: list[str] = []
                for resource, rank in ranks.items():
                    if resource in refused:
                        continue
                    watermark = marks.get(resource, -1)
                    previous = claims[resource][1] if resource in claims else -1
                    if previous > watermark:
                        attempts[resource] = previous
                    # Only a higher attempt is written: one that waits behind must not keep it alive.
                    if rank > watermark and rank > previous:
                        raised[resource] = rank
                    else:
                        kept.append(resource)
                if raised:
                    # The whole row: the claim, and the new attempt in place of any earlier one.
                    db.execute(
                        "INSERT OR REPLACE INTO claims SELECT key, ?, ?, value, ? FROM json_each(?)",
                        (
                            holder,
                            now + lease_seconds,
                            now + attempt_seconds,
                            batch if len(raised) == len(ranks) else _json(raised),
                        ),
                    )
                if kept:
                    _hold(db, holder, _keyed(kept), now + lease_seconds)
            return Claim(refused, view, attempts)

        return await self._run(claim)

    async def release_claims(
        self, holder: str, resource_keys: Collection[str], withdrawn: Mapping[str, int] | None = None
    ) -> None:
        resources = _keyed(resource_keys)
        count = len(resource_keys)
        withdrawals = [(resource, rank, holder) for resource, rank in (withdrawn or {}).items()]
        if not count and not withdrawals:
            return

        def release(db: sqlite3.Connection) -> None:
            with _transaction(db):
                # An attempt is withdrawn only by the holder that made it, while it still holds the claim.
                db.executemany(
                    "UPDATE claims SET attempt = -1, attempt_expires = 0"
                    " WHERE resource = ? AND attempt = ? AND holder = ?",
                    withdrawals,
                )
                if count:
                    # Only the claims end: a row's attempt may be live, and looking costs more than leaving
                    # the rows without one to the purge (a released claim counts as none).
                    db.execute(_UNCLAIM, (holder, resources))

        await self._run(release)

    async def extend_claims(
        self, holder: str, resource_keys: Collection[str], lease_seconds: float
    ) -> frozenset[str]:
        if not resource_keys:
            return frozenset()
        resources = _keyed(resource_keys)
        now = self._clock()

        def extend(db: sqlite3.Connection) -> frozenset[str]:
            with _transaction(db, "BEGIN IMMEDIATE"):
                claims = _claims_of(db, resources, now)
                lost = _held_by_others(claims, holder)
                kept = _keyed(r for r in resource_keys if r not in lost) if lost else resources
                _hold(db, holder, kept, now + lease_seconds)
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
        keys = _json(list(message_keys)) if message_keys else None
        marks = _json(watermarks)
        released = _keyed(release)
        count = len(release)
        # Resources whose attempts may need forgetting apart from the released claims' rows (rarely any).
        unreleased = bool(watermarks) and (count < len(watermarks) or not set(release).issuperset(watermarks))
        purge = now - self._last_purge > _PURGE_EVERY_SECONDS
        if purge:
            self._last_purge = now

        def write(db: sqlite3.Connection) -> None:
            with _transaction(db):
                if keys is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO delivered_keys SELECT value, ? FROM json_each(?)",
                        (expires, keys),
                    )
                if watermarks:
                    # An expired watermark no longer counts: the new rank replaces it rather than competing.
                    # (WHERE true: without it SQLite would read ON CONFLICT as part of the SELECT's join.)
                    db.execute(
                        "INSERT INTO watermarks SELECT key, value, ?1 FROM json_each(?2) WHERE true"
                        " ON CONFLICT (resource) DO UPDATE SET"
                        " rank = CASE WHEN expires > ?3 THEN max(rank, excluded.rank) ELSE excluded.rank END,"
                        " expires = excluded.expires",
                        (expires, marks, now),
                    )
                ended = _end_claims(db, holder, released, count, now) if count else 0
                if unreleased or ended < count:
                    # An attempt at or below the resource's watermark was confirmed: forget it, whoever holds
                    # the resource now.
                    db.execute(
                        f"UPDATE claims SET attempt = -1, attempt_expires = 0 WHERE resource IN {_GIVEN}"
                        " AND attempt_expires > 0 AND attempt <="
                        " (SELECT rank FROM watermarks WHERE watermarks.resource = claims.resource)",
                        (marks,),
                    )

        await self._run(write)
        if purge:
            await self._sqlite.run_on_thread(lambda db: _purge(db, now))

    async def close(self) -> None:
        await self._sqlite.close()


def _purge(db: sqlite3.Connection, now: float) -> None:
    """Delete the rows that expired (a scan of each table: there is no index on ``expires``)."""
    with _transaction(db):
        for table in ("delivered_keys", "watermarks"):
            db.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,))
        db.execute("DELETE FROM claims WHERE expires <= ?1 AND attempt_expires <= ?1", (now,))
        # An expired claim whose attempt lives on is gone as a claim: its holder can no longer withdraw.
        db.execute("UPDATE claims SET holder = NULL WHERE expires <= ? AND holder IS NOT NULL", (now,))


def _read(db: sqlite3.Connection, keys: Sequence[str], resources: str, now: float) -> StateView:
    """The delivered state of these message keys and of ``resources`` (a JSON object keyed by them)."""
    delivered: frozenset[str] = frozenset()
    if keys:
        rows = db.execute(
            "SELECT key FROM delivered_keys WHERE expires > ? AND key IN (SELECT value FROM json_each(?))",
            (now, _json(keys)),
        )
        delivered = frozenset(row[0] for row in rows)
    watermarks = dict(
        db.execute(
            "SELECT resource, rank FROM json_each(?) JOIN watermarks ON resource = key WHERE expires > ?",
            (resources, now),
        )
    )
    return StateView(delivered, watermarks)


def _claims_of(db: sqlite3.Connection, resources: str, now: float) -> dict[str, tuple[str | None, int]]:
    """Each resource's live holder (None: unclaimed) and live attempt (-1: none), where it has a row."""
    rows = db.execute(
        "SELECT resource, CASE WHEN expires > ?1 THEN holder END,"
        " CASE WHEN attempt_expires > ?1 THEN attempt ELSE -1 END"
        " FROM json_each(?2) JOIN claims ON resource = key",
        (now, resources),
    )
    return {resource: (owner, attempt) for resource, owner, attempt in rows}


def _held_by_others(claims: Mapping[str, tuple[str | None, int]], holder: str) -> frozenset[str]:
    """The resources of ``_claims_of``'s answer that a live holder other than ``holder`` claims."""
    return frozenset(r for r, (owner, _) in claims.items() if owner is not None and owner != holder)


def _hold(db: sqlite3.Connection, holder: str, resources: str, expires: float) -> None:
    """Claim (or renew) these resources for ``holder``, keeping their attempts."""
    db.execute(
        "INSERT INTO claims (resource, holder, expires) SELECT key, ?, ? FROM json_each(?) WHERE true"
        " ON CONFLICT (resource) DO UPDATE SET holder = excluded.holder, expires = excluded.expires",
        (holder, expires, resources),
    )


def _end_claims(db: sqlite3.Connection, holder: str, resources: str, count: int, now: float) -> int:
    """End ``holder``'s claims on ``resources`` (a JSON object keyed by them, ``count`` of them); return how
    many rows went.

    A row goes with its claim unless it keeps an attempt that is live and above the resource's watermark
    (sent, never confirmed): then only the claim ends.
    """
    deleted = db.execute(
        "DELETE FROM claims WHERE holder = ?1 AND resource IN (SELECT key FROM json_each(?2))"
        " AND (attempt_expires <= ?3 OR attempt <= (SELECT rank FROM watermarks"
        " WHERE watermarks.resource = claims.resource AND watermarks.expires > ?3))",
        (holder, resources, now),
    ).rowcount
    if deleted < count:
        db.execute(_UNCLAIM, (holder, resources))
    return deleted
