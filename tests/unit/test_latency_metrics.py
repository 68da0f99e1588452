"""End-to-end latency (issue 17, item 9): received -> accepted by the hook, and commercetools' change time ->
accepted, observed per accepted message against the pipeline's explicit clocks."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from adapters.memory import MemoryStateStore
from consumer.dedupe import Deduplicator
from consumer.messages import parse
from consumer.pipeline import END_TO_END_BUCKETS, LatencyHistogram, Pipeline, PipelineOptions, epoch_seconds
from consumer.ports import HookResponse
from consumer.routing import Notification, Router
from consumer.testing import ListSource, MemoryDeadLetters, RecordingSink
from consumer.throttle import LocalThrottleStore, Throttle, ThrottleLimits

LIMITS = ThrottleLimits(limit=100, window_seconds=1.0, connections=2, batch_executions=2)
CHANGED = "2026-01-01T00:00:00.000Z"


def update(entity: int, version: int, **extra: object) -> bytes:
    body = {
        "notificationType": "ResourceUpdated",
        "resource": {"typeId": "product", "id": f"p-{entity}"},
        "version": version,
        "oldVersion": version - 1,
        "modifiedAt": CHANGED,
        **extra,
    }
    return orjson.dumps(body)


def message(number: int, created_at: object) -> bytes:
    return orjson.dumps(
        {
            "notificationType": "Message",
            "id": f"m-{number}",
            "version": 1,
            "sequenceNumber": 2,
            "resource": {"typeId": "order", "id": f"o-{number}"},
            "resourceVersion": 2,
            "type": "OrderStateChanged",
            "createdAt": created_at,
        }
    )


def test_the_change_time_is_read_from_messages_and_change_notifications() -> None:
    assert getattr(parse(update(1, 2)), "changed_at", None) == CHANGED
    assert getattr(parse(message(1, "2026-02-02T10:00:00.5Z")), "changed_at", None) == (
        "2026-02-02T10:00:00.5Z"
    )
    # Absent or not a string: nothing measured, and the payload is still valid.
    assert getattr(parse(message(2, 17)), "changed_at", "x") is None
    assert getattr(parse(message(3, None)), "changed_at", "x") is None
    assert epoch_seconds(CHANGED) == 1767225600.0
    assert epoch_seconds("2026-01-01T01:00:00+01:00") == 1767225600.0
    assert epoch_seconds("yesterday") is None


def test_a_histogram_counts_in_fixed_cumulative_buckets() -> None:
    histogram = LatencyHistogram((1.0, 10.0))
    for seconds in (0.5, 1.0, 3.0, 99.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [(1.0, 2), (10.0, 3), (float("inf"), 4)]
    assert (histogram.count, histogram.sum) == (4, 103.5)
    assert list(END_TO_END_BUCKETS) == sorted(END_TO_END_BUCKETS) and END_TO_END_BUCKETS[-1] >= 3600


async def test_latency_is_observed_per_accepted_message_with_explicit_clocks() -> None:
    now = [1000.0]
    wall = epoch_seconds("2026-01-01T00:00:42Z")
    assert wall is not None
    answers = iter([HookResponse(503), HookResponse(200)])

    def respond(_: Sequence[Notification]) -> HookResponse:
        now[0] += 2.0  # every request takes two seconds on the pipeline's clock
        return next(answers, HookResponse(200))

    bodies = [update(i, 2) for i in range(3)] + [
        message(7, "2026-01-01T00:00:40Z"),
        message(8, "not a time"),
        b"not json {",
    ]
    pipeline = Pipeline(
        source=ListSource(bodies),
        router=Router(),
        deduplicator=Deduplicator(MemoryStateStore(), 60),
        throttle=Throttle(LocalThrottleStore(LIMITS), LIMITS),
        sink=RecordingSink(respond),
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(batch_size=100, retry_base=0.001, retry_cap=0.002),
        clock=lambda: now[0],
        wall_clock=lambda: wall,
    )
    counts = await pipeline.run()
    assert counts.acked == 6 and counts.dead_lettered == 1 and counts.retries == 1
    # Five accepted messages, received at 1000 and accepted after a 503 and a 200: 4 s each.
    delivery = pipeline.delivery_latency
    assert delivery.count == 5 and delivery.sum == 20.0
    assert dict(delivery.cumulative())[2.5] == 0 and dict(delivery.cumulative())[5.0] == 5
    # Four carry a change time: three changed 42 s before acceptance, one 2 s before.
    change = pipeline.change_latency
    assert change.count == 4 and change.sum == 3 * 42.0 + 2.0
    # Nothing left behind per message once settled.
    assert pipeline._received == {}


async def test_a_change_time_ahead_of_our_clock_counts_as_zero() -> None:
    wall = epoch_seconds(CHANGED)
    assert wall is not None
    pipeline = Pipeline(
        source=ListSource([update(1, 2)]),
        router=Router(),
        deduplicator=Deduplicator(MemoryStateStore(), 60),
        throttle=Throttle(LocalThrottleStore(LIMITS), LIMITS),
        sink=RecordingSink(),
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(),
        wall_clock=lambda: wall - 5.0,
    )
    await pipeline.run()
    assert pipeline.change_latency.count == 1 and pipeline.change_latency.sum == 0.0
