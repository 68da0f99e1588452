"""Benchmark the core pipeline in one process.

1. Payloads/s through parse -> dedupe -> route -> outbox -> a no-op sink (unthrottled), for memory and
   SQLite state, beside a bare ``json.loads`` loop over the same payloads (the ratio is what to compare:
   these machines are noisy). Audit logging goes to /dev/null at INFO (every event rendered) and, as a
   second figure, at WARNING with the audit trail off (CTSYNC_AUDIT=off: events filtered).
2. A burst of 10,000 updates over 100 entities under a throttle of 5 requests/s, batch size 100: requests
   used and notifications per entity, against the naive one-request-per-message approach (10,000 requests).

Run: ``make bench`` or ``.venv/bin/python -m bench.pipeline [--payloads N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections import Counter

import orjson

from adapters.memory import MemoryStateStore
from adapters.sqlite.state import SqliteStateStore
from consumer import audit, collector
from consumer.dedupe import Deduplicator
from consumer.pipeline import Pipeline, PipelineOptions
from consumer.ports import StateStore
from consumer.routing import Router
from consumer.testing import ListSource, MemoryDeadLetters, RecordingSink
from consumer.throttle import LocalThrottleStore, Throttle, ThrottleLimits

TYPES = ["product", "category", "customer", "order", "inventory-entry"]


def payloads(count: int, entities: int) -> list[bytes]:
    """Return a realistic mix: messages and change notifications, several changes per entity."""
    out = []
    for i in range(count):
        entity = i % entities
        resource_type = TYPES[entity % len(TYPES)]
        version = i // entities + 2
        resource = {"typeId": resource_type, "id": f"00000000-0000-4000-8000-{entity:012d}"}
        if i % 2:
            body = {
                "notificationType": "Message",
                "projectKey": "acme-prod",
                "id": f"{i:08d}-1111-4222-8333-444455556666",
                "version": 1,
                "sequenceNumber": version,
                "resource": resource,
                "resourceVersion": version,
                "resourceUserProvidedIdentifiers": {"key": f"key-{entity}"},
                "type": "ProductPriceChanged" if resource_type == "product" else "SomethingChanged",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "lastModifiedAt": "2026-01-01T00:00:00.000Z",
                "createdBy": {"clientId": "erp-connector", "isPlatformClient": False},
            }
        else:
            body = {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme-prod",
                "resource": resource,
                "resourceUserProvidedIdentifiers": {"key": f"key-{entity}"},
                "version": version,
                "oldVersion": version - 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        out.append(orjson.dumps(body))
    return out


async def run_pipeline(
    bodies: list[bytes], store: StateStore, limits: ThrottleLimits, batch_size: int = 100
) -> tuple[float, RecordingSink, Pipeline]:
    sink = RecordingSink()
    pipeline = Pipeline(
        source=ListSource(bodies),
        router=Router(),
        deduplicator=Deduplicator(store, 3600),
        throttle=Throttle(LocalThrottleStore(limits), limits),
        sink=sink,
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(batch_size=batch_size, max_in_flight=10_000),
    )
    started = time.perf_counter()
    async with collector.garbage_collected():  # as `ctsync run` does
        await pipeline.run()
    elapsed = time.perf_counter() - started
    await store.close()
    assert pipeline.counts.acked == len(bodies), pipeline.counts
    return elapsed, sink, pipeline


def bare_json_rate(bodies: list[bytes]) -> float:
    started = time.perf_counter()
    for body in bodies:
        json.loads(body)
    return len(bodies) / (time.perf_counter() - started)


UNTHROTTLED = ThrottleLimits(limit=10**9, window_seconds=1.0, connections=10, batch_executions=10)


async def throughput(count: int) -> None:
    bodies = payloads(count, entities=count // 4)
    baseline = bare_json_rate(bodies)
    print(f"payloads: {count} over {count // 4} entities")
    print(f"  bare json.loads loop                  {baseline:12,.0f} payloads/s   (baseline)")
    with open(os.devnull, "wb") as devnull:  # noqa: ASYNC230 (set-up, not the measured part)
        for level in ("INFO", "WARNING"):
            audit.configure(level=level, stream=devnull, audit=level == "INFO")
            for name in ("memory", "sqlite"):
                with tempfile.TemporaryDirectory() as tmp:
                    store: StateStore = (
                        MemoryStateStore() if name == "memory" else SqliteStateStore(f"{tmp}/state.db")
                    )
                    elapsed, sink, _ = await run_pipeline(bodies, store, UNTHROTTLED)
                rate = count / elapsed
                print(
                    f"  ctsync, {name:6} state, audit {level:7} {rate:12,.0f} payloads/s   "
                    f"ratio {rate / baseline:.3f}   ({len(sink.requests)} requests, "
                    f"{len(sink.notifications)} notifications)"
                )


async def burst() -> None:
    with open(os.devnull, "wb") as devnull:  # noqa: ASYNC230 (set-up, not the measured part)
        audit.configure(level="INFO", stream=devnull)
        bodies = []
        for i in range(10_000):
            bodies.append(
                orjson.dumps(
                    {
                        "notificationType": "ResourceUpdated",
                        "projectKey": "acme-prod",
                        "resource": {"typeId": "product", "id": f"product-{i % 100}"},
                        "version": i // 100 + 2,
                        "oldVersion": i // 100 + 1,
                        "modifiedAt": "2026-01-01T00:00:00.000Z",
                    }
                )
            )
        limits = ThrottleLimits(limit=5, window_seconds=1.0, connections=5, batch_executions=5)
        elapsed, sink, _ = await run_pipeline(bodies, MemoryStateStore(), limits)
    per_entity = Counter(n.external_id for n in sink.notifications)
    print("burst: 10,000 updates over 100 entities, throttle 5 requests/s, batch size 100")
    print(
        f"  ctsync: {len(sink.requests)} requests, {len(sink.notifications)} notifications, "
        f"at most {max(per_entity.values())} per entity, all delivered in {elapsed:.2f} s"
    )
    print(
        "  naive one-request-per-message: 10,000 requests (2,000 s at 5 requests/s); "
        f"ratio of requests {10_000 / len(sink.requests):,.0f}x fewer"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(throughput(args.payloads))
    asyncio.run(burst())


if __name__ == "__main__":
    main()
