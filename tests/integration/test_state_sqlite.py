"""The SQLite state store runs its short transactions on the loop, and on its own thread only while another
process holds the database locked, so the loop never waits for a lock."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from adapters.sqlite.state import SqliteStateStore


async def test_a_locked_database_is_waited_for_on_the_thread_while_the_loop_runs_on(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "state.db")
    await store.open()
    await store.record_delivered(["k0"], {"product:p0": 4}, 60)
    assert store._sqlite.calls_on_thread == 2  # the open, and the first purge of expired rows

    other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process (a backfill) is writing
    ticks = 0

    async def ticking() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(ticking())
    started = time.monotonic()
    writing = asyncio.create_task(store.record_delivered(["k1"], {"product:p1": 6}, 60))
    await asyncio.sleep(0.3)
    assert not writing.done()
    other.execute("COMMIT")
    await asyncio.wait_for(writing, 5)
    ticker.cancel()
    assert time.monotonic() - started >= 0.3
    assert ticks >= 10, "the loop kept running while the write waited for the lock"
    assert store._sqlite.calls_on_thread == 3
    view = await store.lookup(["k0", "k1"], ["product:p0", "product:p1"])
    assert view.delivered_keys == {"k0", "k1"} and view.watermarks == {"product:p0": 4, "product:p1": 6}
    other.close()
    await store.close()


async def test_expired_rows_are_purged_on_the_thread_without_an_expires_index(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)  # a file from an earlier version, with its two expires indexes
    old.executescript(
        "CREATE TABLE delivered_keys (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE watermarks (resource TEXT PRIMARY KEY, rank INTEGER NOT NULL, expires REAL NOT NULL)"
        " WITHOUT ROWID;"
        "CREATE INDEX delivered_keys_expires ON delivered_keys (expires);"
        "CREATE INDEX watermarks_expires ON watermarks (expires);"
    )
    old.close()
    now = [1000.0]
    store = SqliteStateStore(path, clock=lambda: now[0])
    await store.open()
    await store.record_delivered(["k"], {"product:p1": 4}, 60)
    now[0] += 3600  # expired, and the next purge is due
    await store.record_delivered([], {"product:p2": 6}, 60)
    on_thread = store._sqlite.calls_on_thread
    await store.record_delivered([], {"product:p3": 8}, 60)
    assert store._sqlite.calls_on_thread == on_thread  # not due again so soon
    await store.close()
    check = sqlite3.connect(path)
    indexes = check.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE '%expires'")
    assert indexes.fetchall() == []
    assert check.execute("SELECT key FROM delivered_keys").fetchall() == []
    assert sorted(r for (r,) in check.execute("SELECT resource FROM watermarks")) == [
        "product:p2",
        "product:p3",
    ]
    check.close()


async def test_a_file_of_the_earlier_schema_keeps_its_claims_and_attempts(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)  # claims and attempts in two tables, as the previous version wrote them
    old.executescript(
        "CREATE TABLE delivered_keys (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE watermarks (resource TEXT PRIMARY KEY, rank INTEGER NOT NULL, expires REAL NOT NULL)"
        " WITHOUT ROWID;"
        "CREATE TABLE claims (resource TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL)"
        " WITHOUT ROWID;"
        "CREATE TABLE attempts (resource TEXT PRIMARY KEY, rank INTEGER NOT NULL, expires REAL NOT NULL)"
        " WITHOUT ROWID;"
        "INSERT INTO watermarks VALUES ('product:p1', 3, 5000), ('product:p2', 3, 5000);"
        # p1: claimed by "old" with an attempt; p2: an attempt whose claim was released; p3: a claim only;
        # p4: an attempt that expired.
        "INSERT INTO claims VALUES ('product:p1', 'old', 1030), ('product:p3', 'old', 1030);"
        "INSERT INTO attempts VALUES ('product:p1', 7, 1300), ('product:p2', 9, 1300),"
        " ('product:p4', 5, 999);"
    )
    old.close()
    now = [1000.0]
    store = SqliteStateStore(path, clock=lambda: now[0])
    await store.open()
    taken = await store.claim("new", {f"product:p{i}": 4 for i in range(1, 5)}, [], 30, 300)
    assert taken.refused == {"product:p1", "product:p3"}
    assert taken.attempts == {"product:p2": 9}
    assert taken.view.watermarks == {"product:p2": 3}
    # The old holder's claim and attempt hold on: it may withdraw the attempt it made, and release.
    assert await store.extend_claims("old", ["product:p1"], 30) == frozenset()
    await store.release_claims("old", ["product:p1", "product:p3"], withdrawn={"product:p1": 7})
    after = await store.claim("new", {"product:p1": 4, "product:p3": 4}, [], 30, 300)
    assert after.refused == frozenset() and after.attempts == {}
    await store.close()
    check = sqlite3.connect(path)
    tables = {name for (name,) in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"delivered_keys", "watermarks", "claims"}
    check.close()


async def test_an_attempt_outlives_its_claim_until_a_delivery_covers_it(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteStateStore(tmp_path / "state.db", clock=lambda: now[0])
    await store.open()
    await store.record_delivered([], {"product:p1": 3}, 3600)
    assert (await store.claim("a", {"product:p1": 7}, [], 30, 300)).attempts == {}
    # Renewing keeps the attempt; so does a release that confirms nothing.
    assert await store.extend_claims("a", ["product:p1"], 30) == frozenset()
    await store.release_claims("a", ["product:p1"])
    assert (await store.claim("b", {"product:p1": 5}, [], 30, 300)).attempts == {"product:p1": 7}
    # A lower attempt does not keep it alive; "a" no longer holds the claim, so it cannot withdraw it.
    await store.release_claims("a", [], withdrawn={"product:p1": 7})
    now[0] += 200
    assert (await store.claim("b", {"product:p1": 5}, [], 30, 300)).attempts == {"product:p1": 7}
    # A delivery below the attempt releases the claim and keeps the attempt; one at it forgets it.
    await store.record_delivered([], {"product:p1": 5}, 3600, holder="b", release=["product:p1"])
    assert (await store.claim("c", {"product:p1": 6}, [], 30, 300)).attempts == {"product:p1": 7}
    await store.record_delivered([], {"product:p1": 7}, 3600, holder="c", release=["product:p1"])
    after = await store.claim("d", {"product:p1": 7}, [], 30, 300)
    assert after.attempts == {} and after.view.watermarks == {"product:p1": 7}
    # A delivery by a holder that does not hold the claim still forgets a confirmed attempt.
    assert (await store.claim("d", {"product:p1": 9}, [], 30, 300)).refused == frozenset()
    await store.record_delivered([], {"product:p1": 9}, 3600, holder="e", release=["product:p1"])
    assert (await store.claim("e", {"product:p1": 10}, [], 30, 300)).refused == {"product:p1"}
    await store.release_claims("d", ["product:p1"])
    assert (await store.claim("e", {"product:p1": 8}, [], 30, 300)).attempts == {}
    # An attempt past its time counts as none, and the purge takes the row once the claim expired too.
    now[0] += 301
    assert (await store.claim("f", {"product:p1": 5}, [], 30, 300)).attempts == {}
    await store.release_claims("f", ["product:p1"])
    now[0] += 1000
    await store.record_delivered([], {"product:p2": 1}, 3600)
    await store.close()
    check = sqlite3.connect(tmp_path / "state.db")
    assert check.execute("SELECT count(*) FROM claims").fetchone() == (0,)
    check.close()
