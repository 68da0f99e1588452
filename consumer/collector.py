"""The service's garbage collector regime: young garbage collected soon, the old generation only when due.

The core makes no reference cycles, but httpx leaves one per hook request (a response and its stream,
holding the request body), and asyncio leaves a few around cancelled waits. Those cycles die young: they
become garbage within the request that made them. The envelopes in flight (up to ``CTSYNC_MAX_IN_FLIGHT``,
with their events and entries) live long and hold no cycles; refcounting frees them when they settle.

So:

- objects made at start-up (modules, settings, clients) are frozen out of every collection;
- automatic collections are rare (``THRESHOLDS``): with CPython's defaults the collector ran so often over
  the envelopes in flight that it took about 40 % of the time per payload (bench/pipeline.py);
- every ``interval`` seconds, if anything was allocated since the last look, the two young generations are
  collected (``gc.collect(1)``): that bounds the httpx garbage by time, and costs what was allocated since,
  not what is in flight;
- the old generation is collected when CPython's own rule says so (once the objects promoted since the
  last full collection exceed a quarter of it), and, while the service is ``busy`` (it took in or settled
  something since the last look), every ``full_interval`` seconds: a hook request alive across two ticks
  (a slow hook, a loaded machine) reaches the old generation, and its cycle would otherwise stay there,
  growing memory with the request rate (tests/integration/test_kafka.py's backpressure test saw 16 MiB in
  10 s). Under a full throttle nothing moves, so the envelopes waiting for the budget are never walked
  again. (A full collection each second over 10,000 waiting envelopes cost about 26 ms: 2.6 % of a core.)
  A full collection that finds almost nothing (fewer than ``FEW_UNREACHABLE`` objects: a fast hook's
  requests die young) doubles the wait before the next one, up to ``MAX_FULL_INTERVAL_SECONDS``; one that
  finds garbage brings it back to ``full_interval``. So a busy service with a fast hook walks its envelopes
  in flight every 16 s rather than every 2 s (about 3 % of its CPU at the default budget), and one whose
  requests reach the old generation still has them collected every 2 s.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

# Generation 0 is collected after 50,000 net allocations, generation 1 after 50 of those; generation 2 is
# considered after 10 young collections of generation 1 (the ticks count), subject to CPython's 25 % rule.
THRESHOLDS = (50_000, 50, 10)
INTERVAL_SECONDS = 1.0
FULL_INTERVAL_SECONDS = 2.0
MAX_FULL_INTERVAL_SECONDS = 16.0
# Unreachable objects a full collection must find for the next one to come as soon: one httpx request's
# cycle is a few dozen objects, so this is a few dozen requests' worth.
FEW_UNREACHABLE = 1_000


def collect_young() -> bool:
    """Collect generations 0 and 1 when anything was allocated since they were last collected; return
    whether a collection ran. Never walks the old generation."""
    allocated, young_collections, _ = gc.get_count()
    if allocated == 0 and young_collections == 0:
        return False
    gc.collect(1)
    return True


@asynccontextmanager
async def garbage_collected(
    interval: float = INTERVAL_SECONDS,
    *,
    busy: Callable[[], bool] | None = None,
    full_interval: float = FULL_INTERVAL_SECONDS,
) -> AsyncIterator[None]:
    """Within the block: start-up objects are frozen, automatic collections are rare, the young
    generations are collected every ``interval`` seconds when something was allocated, the old one when
    CPython's rule says so and, while ``busy()`` says work moved since it was last asked, every
    ``full_interval`` seconds. The collector's settings are restored after."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    collector = asyncio.create_task(_collect_every(interval, busy, full_interval), name="ctsync-gc")
    try:
        yield
    finally:
        collector.cancel()
        gc.set_threshold(*previous)
        gc.unfreeze()


def next_full_interval(found: int, current: float, least: float, most: float) -> float:
    """The wait before the next full collection, after one that found ``found`` unreachable objects."""
    return least if found >= FEW_UNREACHABLE else min(current * 2, max(most, least))


async def _collect_every(interval: float, busy: Callable[[], bool] | None, full_interval: float) -> None:
    since_full = 0.0
    due = full_interval
    while True:
        await asyncio.sleep(interval)
        since_full += interval
        if busy is not None and since_full >= due and busy():
            due = next_full_interval(gc.collect(), due, full_interval, MAX_FULL_INTERVAL_SECONDS)
            since_full = 0.0
        else:
            collect_young()
