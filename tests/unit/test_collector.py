"""The service's collector regime: rare automatic collections, a full one on a clock, settings restored."""

from __future__ import annotations

import asyncio
import gc
import weakref

from consumer.cli import lifecycle


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


async def test_cycles_are_collected_on_the_clock_and_settings_restored() -> None:
    before = gc.get_threshold()
    async with lifecycle.garbage_collected_on_a_clock(interval=0.05):
        assert gc.get_threshold() == lifecycle.GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        node = Node()
        gone = weakref.ref(node)
        del node
        for _ in range(100):  # poll with a deadline: the clock collects within a few intervals
            if gone() is None:
                break
            await asyncio.sleep(0.05)
        assert gone() is None
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
