"""Microbenchmark of the SQLite state store's hot path: what one payload costs the event loop's thread.

Per cycle, a batch of 100 distinct resources goes through what the pipeline does with a batch: ``claim``
(holder, ranks, no message keys, lease, attempt TTL) and ``record_delivered`` (no keys, the same ranks,
releasing the claims), or ``claim`` and ``release_claims`` (a batch taken and given back). Three files:
an empty one; one with 100,000 resources already present, the batches new ones; the same, the batches
raising resources already present (the steady state of a long-running service). The figure is CPU time of
the calling thread (the loop's: the store runs its transactions inline) per resource, median of
interleaved rounds, for the baseline (``adapters/sqlite/state.py`` as of ``--baseline`` commit, read from
git: by default ced9765, the store before claims and attempts shared a table) and the current
``adapters.sqlite.state``.

Run: ``.venv/bin/python -m bench.state [--cycles N] [--rounds R] [--present K] [--baseline COMMIT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

from adapters.sqlite.state import SqliteStateStore
from consumer.ports import StateStore

ROOT = Path(__file__).resolve().parent.parent

BATCH = 100
HOLDER = "bench-holder"
LEASE, ATTEMPT_TTL, TTL = 30.0, 300.0, 7 * 86400.0


class Opened(StateStore, Protocol):
    async def open(self) -> None: ...


def baseline_store(commit: str) -> Callable[[Path], Opened]:
    """The SQLite store class as it was at ``commit``, loaded from git (no copy of old code in the tree)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:adapters/sqlite/state.py"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    module = types.ModuleType(f"baseline_state_{commit}")
    exec(compile(source, f"{commit}:adapters/sqlite/state.py", "exec"), module.__dict__)
    return cast(Callable[[Path], Opened], module.SqliteStateStore)


async def measure(
    make: Callable[[Path], Opened],
    directory: Path,
    present: int,
    raise_present: bool,
    cycles: int,
    release_only: bool,
) -> float:
    """Return µs of this thread's CPU per resource over ``cycles`` batches, on a fresh file."""
    path = directory / f"state-{time.monotonic_ns()}.db"
    store = make(path)
    await store.open()
    for start in range(0, present, 1000):
        await store.record_delivered(
            [], {f"product:p{i}": 2 for i in range(start, min(present, start + 1000))}, TTL
        )
    if raise_present:
        batches = [
            {f"product:p{(c * BATCH + j) % present}": 4 + 2 * c for j in range(BATCH)} for c in range(cycles)
        ]
    else:
        batches = [{f"product:n{c}-{j}": 4 for j in range(BATCH)} for c in range(cycles)]
    try:
        started = time.thread_time()
        for ranks in batches:
            await store.claim(HOLDER, ranks, [], LEASE, ATTEMPT_TTL)
            if release_only:
                await store.release_claims(HOLDER, list(ranks))
            else:
                await store.record_delivered([], ranks, TTL, holder=HOLDER, release=list(ranks))
        return (time.thread_time() - started) / (cycles * BATCH) * 1e6
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--present", type=int, default=100_000)
    parser.add_argument("--baseline", default="ced9765", help="the commit whose store is the baseline")
    args = parser.parse_args()
    stores: dict[str, Callable[[Path], Opened]] = {
        "baseline": baseline_store(args.baseline),
        "current": SqliteStateStore,
    }
    files = [
        ("empty file", 0, False),
        ("new resources", args.present, False),
        ("present ones", args.present, True),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for release_only in (False, True):
            cycle = "claim + release_claims" if release_only else "claim + record_delivered"
            for label, present, raise_present in files:
                figures: dict[str, list[float]] = {name: [] for name in stores}
                for _ in range(args.rounds):
                    for name, make in stores.items():
                        figures[name].append(
                            await measure(make, Path(tmp), present, raise_present, args.cycles, release_only)
                        )
                before, after = (statistics.median(figures[name]) for name in stores)
                print(
                    f"{cycle:26} {label:14} baseline {before:6.2f} µs/resource  current {after:6.2f}"
                    f"  ({(after / before - 1) * 100:+.0f}%)"
                )


if __name__ == "__main__":
    asyncio.run(main())
