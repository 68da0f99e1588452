"""Benchmark the audit trail: the cost of one audit line, and the bytes the pipeline writes per payload.

1. One line, written by the hot-path writer (``audit.info_writer()``) to /dev/null: ``message.received`` and
   ``message.acked`` with Kafka's source fields, as the pipeline writes them, and one ``batch.sent`` of 100
   message keys; with and without configured secrets (three, one of them short), so the price of the
   secret scrub shows. Best of several rounds, in microseconds per line.
2. Bytes and lines per payload: the payloads of ``bench/pipeline.py`` through the pipeline, audit at INFO
   to memory, from an in-memory source (a position only) and from one whose envelopes carry Kafka's
   source fields (topic, partition, offset), as ``ctsync run`` on Kafka writes them.

Run: ``.venv/bin/python -m bench.audit``.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from adapters.memory import MemoryStateStore
from bench.pipeline import UNTHROTTLED, payloads, run_pipeline
from consumer import audit
from consumer.dedupe import Deduplicator
from consumer.pipeline import Pipeline, PipelineOptions
from consumer.ports import Envelope
from consumer.routing import Router
from consumer.testing import ListSource, MemoryDeadLetters, RecordingSink
from consumer.throttle import LocalThrottleStore, Throttle

KEY = "product:00000000-0000-4000-8000-000000000042:ResourceUpdated:17"
SOURCE_FIELDS = {"topic": "commercetools-changes", "partition": 2, "offset": 1234567}
SECRETS = ["Zx81-client-secret-QwErTy", "ipaas-webhook-key-0123456789", "q7"]


def lines() -> dict[str, Callable[[], dict[str, Any]]]:
    keys = [f"{KEY[:-2]}{i}" for i in range(100)]
    return {
        "message.received": lambda: {
            "source": "kafka",
            "position": "commercetools-changes/2/1234567",
            "message_key": KEY,
            "resource_type": "product",
            "resource_id": "00000000-0000-4000-8000-000000000042",
            "version": 17,
            **SOURCE_FIELDS,
        },
        "message.acked": lambda: {
            "message_key": KEY,
            "position": "commercetools-changes/2/1234567",
            **SOURCE_FIELDS,
        },
        "batch.sent": lambda: {
            "correlation_id": "571143cd-3d98-458f-b2b6-a8ccb750a957",
            "size": 100,
            "status": 200,
            "attempt": 1,
            "duration_ms": 12.5,
            "message_keys": keys,
            "notifications": [
                {"scope": "product/updated", "external_id": f"00000000-0000-4000-8000-{i:012d}"}
                for i in range(100)
            ],
            "detail": None,
        },
    }


async def per_line(secrets: list[str], rounds: int = 7, count: int = 20_000) -> dict[str, float]:
    """Inside an event loop, as in the service: the writer flushes once per loop turn."""
    results = {}
    with open(os.devnull, "wb") as devnull:  # noqa: ASYNC230 (set-up, not the measured part)
        audit.configure(level="INFO", secrets=secrets, stream=devnull)
        write = audit.info_writer()
        assert write is not None
        for event, build in lines().items():
            n = count if event != "batch.sent" else count // 100
            best = float("inf")
            for _ in range(rounds):
                fields = [build() for _ in range(n)]
                started = time.perf_counter()
                for f in fields:
                    write(event, f)
                await asyncio.sleep(0)
                best = min(best, (time.perf_counter() - started) / n)
            results[event] = best * 1e6
    return results


class KafkaShapedSource(ListSource):
    """The list source, its envelopes carrying what the Kafka source gives them."""

    name = "kafka"

    def _envelope(self, index: int) -> Envelope:
        return Envelope(
            body=self._bodies[index],
            position=f"commercetools-changes/{index % 3}/{index // 3}",
            ack=lambda: None,
            nack=lambda: None,
            source_fields={"topic": "commercetools-changes", "partition": index % 3, "offset": index // 3},
        )


async def bytes_per_payload(count: int = 20_000, kafka: bool = False) -> tuple[float, float, Counter[str]]:
    stream = io.BytesIO()
    audit.configure(level="INFO", stream=stream)
    bodies = payloads(count, entities=count // 4)
    if kafka:
        pipeline = Pipeline(
            source=KafkaShapedSource(bodies),
            router=Router(),
            deduplicator=Deduplicator(MemoryStateStore(), 3600),
            throttle=Throttle(LocalThrottleStore(UNTHROTTLED), UNTHROTTLED),
            sink=RecordingSink(),
            dead_letters=MemoryDeadLetters(),
            options=PipelineOptions(batch_size=100, max_in_flight=10_000),
        )
        await pipeline.run()
    else:
        await run_pipeline(bodies, MemoryStateStore(), UNTHROTTLED)
    await asyncio.sleep(0)
    data = stream.getvalue()
    events = Counter(orjson.loads(line)["event"] for line in data.splitlines())
    return len(data) / count, sum(events.values()) / count, events


def main() -> None:
    print("one audit line (hot-path writer, to /dev/null), best of 7 rounds:")
    plain, with_secrets = asyncio.run(per_line([])), asyncio.run(per_line(SECRETS))
    for event in plain:
        print(
            f"  {event:17} {plain[event]:7.2f} µs/line, "
            f"with 3 secrets configured {with_secrets[event]:7.2f} µs"
        )
    for kafka in (False, True):
        size, count, events = asyncio.run(bytes_per_payload(kafka=kafka))
        print(
            f"bench/pipeline.py's payloads, {'Kafka-shaped' if kafka else 'in-memory'} source, "
            f"audit at INFO: {size:.0f} bytes, {count:.2f} lines per payload"
        )
        print("  lines by event: " + ", ".join(f"{e} {n}" for e, n in events.most_common()))


if __name__ == "__main__":
    main()
