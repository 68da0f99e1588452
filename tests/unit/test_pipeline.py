"""The pipeline's orchestration with in-memory ports (the adapters have their own real-server tests)."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.memory import MemoryStateStore
from consumer.dedupe import Deduplicator
from consumer.pipeline import Outcome, Pipeline, PipelineOptions, classify
from consumer.ports import HookResponse
from consumer.retry import backoff_delay
from consumer.routing import Router
from consumer.testing import ListSource, MemoryDeadLetters, RecordingSink
from consumer.throttle import LocalThrottleStore, Throttle, ThrottleLimits


def update(entity: int, version: int) -> bytes:
    return orjson.dumps(
        {
            "notificationType": "ResourceUpdated",
            "projectKey": "acme",
            "resource": {"typeId": "product", "id": f"product-{entity}"},
            "version": version,
            "oldVersion": version - 1,
        }
    )


def make(source: ListSource, sink: RecordingSink, limits: ThrottleLimits, **options: object) -> Pipeline:
    return Pipeline(
        source=source,
        router=Router(),
        deduplicator=Deduplicator(MemoryStateStore(), 60),
        throttle=Throttle(LocalThrottleStore(limits), limits),
        sink=sink,
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(**options),  # type: ignore[arg-type]
    )


async def test_burst_under_throttle_is_merged() -> None:
    source = ListSource(update(i % 100, i // 100 + 2) for i in range(10_000))
    sink = RecordingSink()
    limits = ThrottleLimits(limit=5, window_seconds=1.0, connections=5, batch_executions=5)
    pipeline = make(source, sink, limits, batch_size=100)
    counts = await pipeline.run()
    per_entity = Counter(n.external_id for n in sink.notifications)
    assert len(per_entity) == 100
    assert max(per_entity.values()) <= 2
    assert len(sink.requests) <= 5
    assert counts.acked == 10_000 and sorted(source.acked) == list(range(10_000))


async def test_stop_hands_back_what_did_not_land() -> None:
    source = ListSource([update(i, 2) for i in range(10)], exhaust=False)
    sink = RecordingSink(lambda _: HookResponse(503))
    limits = ThrottleLimits(limit=100, window_seconds=1.0, connections=2, batch_executions=2)
    pipeline = make(source, sink, limits, drain_timeout=0.3, retry_base=0.05, retry_cap=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    for _ in range(500):  # poll with a deadline
        if sink.requests:
            break
        await asyncio.sleep(0.01)
    stop.set()
    counts = await asyncio.wait_for(task, 5)
    assert source.acked == []
    assert sorted(source.nacked) == list(range(10))
    assert counts.handed_back == 10


def test_classify_and_backoff() -> None:
    assert [classify(s) for s in (200, 201, 202, 203, 204, 206, 299)] == [Outcome.DELIVERED] * 7
    assert [classify(s) for s in (301, 302, 303, 307, 308)] == [Outcome.UNUSABLE] * 5
    assert [classify(s) for s in (400, 413, 422)] == [Outcome.REJECTED] * 3
    assert [classify(s) for s in (401, 403, 404)] == [Outcome.UNUSABLE] * 3
    assert [classify(s) for s in (None, 408, 429, 500, 503)] == [Outcome.RETRY] * 5
    assert backoff_delay(1, 1.0, 60.0, rand=lambda: 0.0) == 0.5
    assert backoff_delay(3, 1.0, 60.0, rand=lambda: 1.0) == 4.0
    assert backoff_delay(20, 1.0, 60.0, rand=lambda: 1.0) == 60.0


class CountingStore(MemoryStateStore):
    """Memory state that records the message keys each delivery wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []

    async def record_delivered(self, message_keys, watermarks, ttl_seconds, *, holder="", release=()):  # type: ignore[no-untyped-def]
        self.written.extend(message_keys)
        await super().record_delivered(message_keys, watermarks, ttl_seconds, holder=holder, release=release)


def message(entity: int, message_id: str, version: int) -> bytes:
    body: dict[str, object] = {
        "notificationType": "Message",
        "projectKey": "acme",
        "id": message_id,
        "version": 1,
        "sequenceNumber": 1,
        "resource": {"typeId": "product", "id": f"product-{entity}"},
        "type": "ProductPublished",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "lastModifiedAt": "2026-01-01T00:00:00.000Z",
        "resourceVersion": version,
    }
    return orjson.dumps(body)


async def test_versioned_changes_leave_no_key_and_their_redeliveries_are_settled_unsent() -> None:
    # (Only versionless changes need a key; the router sends none today: beta events are ignored.)
    bodies = [update(1, 2), message(2, "m-1", 5), message(2, "m-2", 6)]
    store = CountingStore()
    limits = ThrottleLimits(limit=100, window_seconds=1.0, connections=2, batch_executions=2)

    async def run(source: ListSource, sink: RecordingSink) -> Pipeline:
        pipeline = Pipeline(
            source=source,
            router=Router(),
            deduplicator=Deduplicator(store, 60),
            throttle=Throttle(LocalThrottleStore(limits), limits),
            sink=sink,
            dead_letters=MemoryDeadLetters(),
            options=PipelineOptions(),
        )
        await pipeline.run()
        return pipeline

    first_sink = RecordingSink()
    first = await run(ListSource(bodies), first_sink)
    assert first.counts.notifications_sent == 2 and len(first_sink.notifications) == 2
    assert store.written == []
    # Delivered again (a redelivery after a crash before the commit): nothing is sent, everything acked.
    again_source, again_sink = ListSource(bodies), RecordingSink()
    again = await run(again_source, again_sink)
    assert again_sink.requests == []
    assert (again.counts.stale, again.counts.duplicate) == (3, 0)
    assert sorted(again_source.acked) == [0, 1, 2]


class RecordingLog:
    """A stand-in for the audit logger: every event with its fields, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def _record(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))

    info = warning = error = debug = _record

    def bind(self, **_: object) -> RecordingLog:
        return self


def subscription_test(i: int) -> bytes:
    return orjson.dumps(
        {
            "notificationType": "ResourceCreated",
            "projectKey": "acme",
            "resource": {"typeId": "subscription", "id": f"s-{i}"},
            "version": 1,
        }
    )


payload_kinds = st.one_of(
    st.tuples(st.just("update"), st.integers(0, 4), st.integers(1, 6)),
    st.tuples(st.just("invalid"), st.just(0), st.just(0)),
    st.tuples(st.just("ignored"), st.integers(0, 3), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payload_kinds, min_size=1, max_size=60), st.integers(1, 25), st.integers(1, 7))
def test_batched_intake_settles_each_payload_once_with_its_own_story(
    kinds: list[tuple[str, int, int]], fetch_max: int, batch_size: int
) -> None:
    bodies = [
        update(a, b) if kind == "update" else b"{not json" if kind == "invalid" else subscription_test(a)
        for kind, a, b in kinds
    ]
    source, sink, log = ListSource(bodies), RecordingSink(), RecordingLog()
    limits = ThrottleLimits(limit=1000, window_seconds=1.0, connections=3, batch_executions=3)
    pipeline = Pipeline(
        source=source,
        router=Router(),
        deduplicator=Deduplicator(MemoryStateStore(), 60),
        throttle=Throttle(LocalThrottleStore(limits), limits),
        sink=sink,
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(batch_size=batch_size, fetch_max=fetch_max),
        log=log,
    )
    counts = asyncio.run(pipeline.run())
    # Every payload acked exactly once, none handed back.
    assert sorted(source.acked) == list(range(len(bodies))) and source.nacked == []
    assert counts.acked == counts.received == len(bodies)
    # Each payload's story: received first, acked last, once each.
    stories: dict[str, list[str]] = {}
    for event, fields in log.events:
        position = fields.get("position")
        if isinstance(position, str) and position.startswith("memory:"):
            stories.setdefault(position, []).append(event)
    for i in range(len(bodies)):
        story = stories[f"memory:{i}"]
        assert story[0] == "message.received" and story[-1] == "message.acked", story
        assert story.count("message.received") == story.count("message.acked") == 1, story
    # Every stage counted each payload once; every updated entity was notified.
    invalid = sum(kind == "invalid" for kind, _, _ in kinds)
    assert (counts.invalid, counts.dead_lettered) == (invalid, invalid)
    assert counts.ignored == sum(kind == "ignored" for kind, _, _ in kinds)
    assert counts.received == counts.invalid + counts.ignored + counts.routed
    notified = {n.external_id for n in sink.notifications}
    assert set(notified) == {f"product-{a}" for kind, a, _ in kinds if kind == "update"}
