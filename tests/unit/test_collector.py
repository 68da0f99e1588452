"""The service's collector regime: young garbage collected on the tick, the old generation left alone while
nothing is promoted into it, settings restored."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from consumer import collector
from consumer.cli import lifecycle


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@contextmanager
def collections_seen() -> Iterator[list[int]]:
    """Record the generation of every collection that runs within the block."""
    seen: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)


async def test_cycles_are_collected_on_the_tick_and_settings_restored() -> None:
    before = gc.get_threshold()
    async with collector.garbage_collected(interval=0.05):
        assert gc.get_threshold() == collector.THRESHOLDS
        assert gc.get_freeze_count() > 0
        node = Node()
        gone = weakref.ref(node)
        del node
        for _ in range(100):  # poll with a deadline: the tick collects within a few intervals
            if gone() is None:
                break
            await asyncio.sleep(0.05)
        assert gone() is None
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_every_command_runs_under_the_regime() -> None:
    assert lifecycle.garbage_collected is collector.garbage_collected


async def test_an_idle_service_never_walks_what_is_in_flight() -> None:
    async with collector.garbage_collected(interval=0.02):
        # Long-lived objects, like envelopes waiting for the throttle budget, promoted to the old generation.
        in_flight = [{"body": i} for i in range(50_000)]
        gc.collect(1)
        with collections_seen() as seen:
            for _ in range(20):
                await asyncio.sleep(0.02)
        assert 2 not in seen
        del in_flight


async def test_a_busy_service_collects_the_old_generation_on_its_clock_an_idle_one_does_not() -> None:
    moving = [True]
    async with collector.garbage_collected(interval=0.02, busy=lambda: moving[0], full_interval=0.04):
        with collections_seen() as seen:
            for _ in range(10):
                await asyncio.sleep(0.02)
        assert 2 in seen
        moving[0] = False
        with collections_seen() as seen:
            for _ in range(10):
                await asyncio.sleep(0.02)
        assert 2 not in seen


def test_collect_young_skips_when_nothing_was_allocated_and_runs_when_something_was() -> None:
    before = gc.get_threshold()
    gc.disable()
    try:
        with collections_seen() as seen:
            gc.collect(1)
            assert collector.collect_young() is False
            garbage = [[i] for i in range(100)]
            assert collector.collect_young() is True
            del garbage
        assert seen == [1, 1]
    finally:
        gc.enable()
        gc.set_threshold(*before)


def test_a_full_collection_that_finds_little_waits_longer_and_one_that_finds_garbage_comes_soon() -> None:
    few, many = collector.FEW_UNREACHABLE - 1, collector.FEW_UNREACHABLE
    assert collector.next_full_interval(few, 2.0, 2.0, 16.0) == 4.0
    assert collector.next_full_interval(few, 8.0, 2.0, 16.0) == 16.0
    assert collector.next_full_interval(few, 16.0, 2.0, 16.0) == 16.0
    assert collector.next_full_interval(many, 16.0, 2.0, 16.0) == 2.0
    # A full interval above the cap is kept, never shortened by it.
    assert collector.next_full_interval(few, 30.0, 30.0, 16.0) == 30.0


async def test_a_busy_service_making_old_garbage_keeps_its_full_collections_on_the_clock() -> None:
    made: list[int] = []

    async def tick(n: int) -> None:
        for _ in range(n):
            # Cycles that live across a young collection, as a slow hook's requests do.
            cycles = [Node() for _ in range(2 * collector.FEW_UNREACHABLE)]
            gc.collect(1)
            del cycles
            made.append(1)
            await asyncio.sleep(0.02)

    async with collector.garbage_collected(interval=0.02, busy=lambda: True, full_interval=0.04):
        with collections_seen() as garbage_seen:
            await tick(20)
    async with collector.garbage_collected(interval=0.02, busy=lambda: True, full_interval=0.04):
        with collections_seen() as clean_seen:
            for _ in range(20):
                await asyncio.sleep(0.02)
    # Every other tick with garbage about; with none, the waits double (0.04, 0.08, 0.16 s...).
    assert garbage_seen.count(2) >= 6, garbage_seen
    assert clean_seen.count(2) < garbage_seen.count(2), (clean_seen, garbage_seen)
