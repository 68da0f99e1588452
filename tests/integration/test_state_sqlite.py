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
    assert store._sqlite.calls_on_thread == 1  # only the open

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
    assert store._sqlite.calls_on_thread == 2
    view = await store.lookup(["k0", "k1"], ["product:p0", "product:p1"])
    assert view.delivered_keys == {"k0", "k1"} and view.watermarks == {"product:p0": 4, "product:p1": 6}
    other.close()
    await store.close()
