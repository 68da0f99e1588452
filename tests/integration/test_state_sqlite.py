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
