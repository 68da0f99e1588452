"""The pure part of the backfill, the cursor stores, and BackfillSource over fake pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from adapters.backfill_source import BackfillSource
from adapters.memory import MemoryCursorStore
from adapters.sqlite.cursors import SqliteCursorStore
from consumer import sweep as bf
from consumer import throttle
from consumer.cli import sweep_text
from consumer.messages import ChangeEvent, NotificationType, parse
from consumer.ports import Slot
from consumer.routing import Route, Router, scope_map_from_dict
from consumer.throttle import LocalThrottleStore, ThrottleLimits


def test_api_time_is_utc_with_milliseconds_and_z() -> None:
    when = datetime(2026, 1, 31, 13, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    assert bf.api_time(when) == "2026-01-31T11:04:05.678Z"
    assert bf.api_time(datetime(2026, 1, 31)) == "2026-01-31T00:00:00.000Z"


def test_where_clause_combines_cursor_and_time_bounds() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    until = datetime(2026, 2, 1, tzinfo=UTC)
    assert bf.where_clause() is None
    assert bf.where_clause(after='a"b') == 'id > "a\\"b"'
    assert bf.where_clause(after="x", since=since, until=until) == (
        'id > "x" and lastModifiedAt >= "2026-01-01T00:00:00.000Z" '
        'and lastModifiedAt < "2026-02-01T00:00:00.000Z"'
    )


PRODUCT = {
    "id": "p-1",
    "version": 7,
    "key": "shirt",
    "lastModifiedAt": "2026-01-02T03:04:05.000Z",
    "masterData": {
        "current": {"masterVariant": {"sku": "OLD"}},
        "staged": {"masterVariant": {"sku": "SKU-1"}},
    },
    "createdBy": {"clientId": "ipaas-client"},
}


def test_product_becomes_a_resource_created_with_master_variant_sku() -> None:
    body = bf.change_notification("product", PRODUCT, "proj", bf.Mode.CREATED)
    assert body is not None
    assert "createdBy" not in body and "lastModifiedBy" not in body
    event = parse(bf.notification_bytes(body))
    assert isinstance(event, ChangeEvent)
    assert event.kind is NotificationType.RESOURCE_CREATED
    assert (event.resource_type, event.resource_id, event.version) == ("product", "p-1", 7)
    assert dict(event.identifiers) == {"key": "shirt", "sku": "SKU-1"}
    assert event.project_key == "proj"
    assert event.message_key == "product:p-1:ResourceCreated:7"


def test_updated_mode_routes_to_updated_and_identifiers_follow_the_scope_map() -> None:
    router = Router(
        scope_map_from_dict(
            {
                "types": {
                    "product": {"external_id": "sku"},
                    "order": {"external_id": "orderNumber"},
                    "customer": {"external_id": "customerNumber"},
                    "category": {"external_id": "key"},
                }
            }
        ),
        ignore_client_ids=["ipaas-client"],
    )
    cases = [
        ("product", PRODUCT, "product/updated", "SKU-1"),
        ("order", {"id": "o-1", "version": 2, "orderNumber": "ORD-1"}, "transaction/updated", "ORD-1"),
        (
            "customer",
            {"id": "c-1", "version": 1, "customerNumber": "CN-1", "key": "k"},
            "customer/updated",
            "CN-1",
        ),
        ("category", {"id": "cat-1", "version": 3, "key": "shoes"}, "product/category/updated", "shoes"),
    ]
    for type_id, resource, scope, external_id in cases:
        body = bf.change_notification(type_id, resource, "proj", bf.Mode.UPDATED)
        assert body is not None
        event = parse(bf.notification_bytes(body))
        assert isinstance(event, ChangeEvent)
        route = router.route(event)
        assert isinstance(route, Route), route
        assert (route.scope(False), route.external_id, route.fallback) == (scope, external_id, False)


def test_a_resource_without_id_or_version_is_skipped() -> None:
    assert bf.change_notification("product", {"id": "x"}, "p", bf.Mode.CREATED) is None
    assert bf.change_notification("product", {"version": 1}, "p", bf.Mode.CREATED) is None


def test_unknown_type_is_refused() -> None:
    with pytest.raises(bf.UnknownType):
        bf.resource_path("no-such-type")
    assert bf.resource_path("inventory-entry") == "inventory"


def test_cursor_moves_to_the_last_id_below_which_everything_is_acked() -> None:
    tracker = bf.CursorTracker("start")
    sequences = [tracker.received(resource_id) for resource_id in ("a", "b", "c", "d")]
    assert tracker.value == "start" and tracker.unsaved() is None
    tracker.acked(sequences[1])
    tracker.acked(sequences[3])
    assert tracker.value == "start"
    tracker.acked(sequences[0])
    assert tracker.value == "b" and tracker.unsaved() == "b"
    tracker.saved("b")
    assert tracker.unsaved() is None
    tracker.acked(sequences[2])
    assert tracker.value == "d" and not tracker.complete
    tracker.read_all()
    assert tracker.complete and tracker.value == bf.COMPLETE


def test_run_key_depends_on_command_mode_and_bounds() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    assert bf.run_key("backfill", bf.Mode.CREATED) == "backfill:created::"
    assert bf.run_key("reconcile", bf.Mode.UPDATED, since) == "reconcile:updated:2026-01-01T00:00:00.000Z:"


def test_share_limits_floor_with_a_minimum_of_one() -> None:
    limits = ThrottleLimits(limit=5, window_seconds=60, connections=5, batch_executions=1)
    share = throttle.share_limits(limits, 0.5)
    assert (share.limit, share.connections, share.batch_executions) == (2, 2, 1)
    assert throttle.share_limits(limits, 1.0) == limits
    with pytest.raises(ValueError):
        throttle.share_limits(limits, 0.0)
    assert throttle.ceiling_per_minute(ThrottleLimits(10, 2.0, 5, 5), 100) == 30_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_share_store_keeps_the_sweep_to_its_share_of_the_window() -> None:
    clock = Clock()
    full = ThrottleLimits(limit=10, window_seconds=2.0, connections=10, batch_executions=10)
    inner = LocalThrottleStore(full, clock=clock)
    store = throttle.ShareThrottleStore(inner, throttle.share_limits(full, 0.5), clock=clock)
    granted = 0
    for _ in range(20):
        if await store.try_acquire(Slot.REQUEST, "sweep") == 0.0:
            granted += 1
            await store.release(Slot.REQUEST, "sweep")
    assert granted == 5
    # Live traffic still has the other half of the window.
    live = [await inner.try_acquire(Slot.REQUEST, "live") for _ in range(6)]
    assert live.count(0.0) == 5
    clock.now += 2.01
    assert await store.try_acquire(Slot.REQUEST, "sweep") == 0.0


async def test_share_store_waits_for_the_whole_budget_without_wasting_window_places() -> None:
    clock = Clock()
    full = ThrottleLimits(limit=4, window_seconds=1.0, connections=10, batch_executions=10)
    inner = LocalThrottleStore(full, clock=clock)
    store = throttle.ShareThrottleStore(inner, throttle.share_limits(full, 0.5), clock=clock)
    for _ in range(4):  # live traffic fills the whole window
        assert await inner.try_acquire(Slot.REQUEST, "live") == 0.0
    assert await store.try_acquire(Slot.REQUEST, "sweep") > 0.0
    assert await store.try_acquire(Slot.REQUEST, "sweep") > 0.0
    # The refused attempts hold one local reservation, not a place per attempt.
    assert store.ledger.in_flight_requests == 1
    for _ in range(4):
        await inner.release(Slot.REQUEST, "live")
    clock.now += 1.01
    assert await store.try_acquire(Slot.REQUEST, "sweep") == 0.0
    assert store.ledger.in_flight_requests == 1
    await store.release(Slot.REQUEST, "sweep")
    assert store.ledger.in_flight_requests == 0 and inner.ledger.in_flight_requests == 0


def test_subscription_report_warns_for_dropping_statuses() -> None:
    lines = sweep_text.subscription_report(
        [
            {"key": "ok", "destination": {"type": "GoogleCloudPubSub"}, "status": "Healthy"},
            {"key": "stopped", "destination": {"type": "ConfluentCloud"}, "status": "ManuallySuspended"},
        ]
    )
    assert lines[0] == ("subscription ok: destination GoogleCloudPubSub, status Healthy", False)
    assert lines[1] == ("subscription stopped: destination ConfluentCloud, status ManuallySuspended", False)
    assert lines[2][1] and "drops" in lines[2][0]
    assert sweep_text.subscription_report([]) == [("no subscriptions in this project", True)]


def test_progress_line_is_honest_about_the_unknown_total() -> None:
    line = sweep_text.progress_line(
        type_id="product",
        counts=bf.SweepCounts(pages=3, resources=1500),
        types_total=4,
        notified=1000,
        queued=500,
        elapsed=60.0,
        ceiling_per_min=3000.0,
    )
    assert "pages 3" in line and "resources 1500" in line and "notified 1000" in line
    assert "1,000/min" in line and "queued 500 (>= 10s at the budget)" in line
    assert "total unknown" in line


# --------------------------------------------------------------------------------- cursor stores


async def test_sqlite_cursor_store_shares_the_state_file(tmp_path: Path) -> None:
    from adapters.sqlite.state import SqliteStateStore

    path = tmp_path / "state.db"
    state = SqliteStateStore(path)
    await state.open()
    store = SqliteCursorStore(path)
    await store.open()
    assert await store.get("k|product") is None
    await store.put("k|product", "abc")
    await store.put("k|product", "abd")
    await state.record_delivered(["x"], {"product:1": 2}, 60)
    await store.close()
    again = SqliteCursorStore(path)
    assert await again.get("k|product") == "abd"
    await again.delete("k|product")
    assert await again.get("k|product") is None
    await again.close()
    assert (await state.lookup(["x"], [])).delivered_keys == {"x"}
    await state.close()


# ------------------------------------------------------------------------- BackfillSource, fake pages


def fake_api(resources: dict[str, list[dict[str, Any]]], calls: list[tuple[str, str | None]]) -> Any:
    """A PageReader over in-memory resources that understands the sweep's ``id >`` condition."""

    async def read(path: str, where: str | None, limit: int) -> AsyncIterator[list[dict[str, Any]]]:
        calls.append((path, where))
        after = where.split('id > "')[1].split('"')[0] if where and 'id > "' in where else ""
        items = sorted((r for r in resources[path] if r["id"] > after), key=lambda r: r["id"])
        for start in range(0, len(items), limit):
            yield items[start : start + limit]

    return read


def resources(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i:04d}", "version": 1, "key": f"k{i}"} for i in range(count)]


async def drain(source: BackfillSource, ack: bool = True, max_count: int = 7) -> list[str]:
    positions = []
    while True:
        fetched = await source.fetch(max_count)
        for envelope in fetched.envelopes:
            positions.append(envelope.position)
            if ack:
                envelope.ack()
        if fetched.exhausted:
            return positions


async def test_source_sweeps_every_type_and_marks_it_complete() -> None:
    calls: list[tuple[str, str | None]] = []
    api = fake_api({"products": resources("p", 23), "categories": resources("c", 5)}, calls)
    cursors = MemoryCursorStore()
    source = BackfillSource(
        api, ["product", "category"], project_key="p", mode=bf.Mode.CREATED, cursors=cursors, key="k",
        page_size=10,
    )  # fmt: skip
    await source.open()
    positions = await drain(source)
    await source.close()
    assert len(positions) == 28 and len(set(positions)) == 28
    assert positions[0] == "backfill:product:p0000"
    assert source.counts.pages == 4 and source.per_type == {"product": 23, "category": 5}
    assert cursors.values == {"k|product": bf.COMPLETE, "k|category": bf.COMPLETE}
    again = BackfillSource(
        api, ["product", "category"], project_key="p", mode=bf.Mode.CREATED, cursors=cursors, key="k"
    )
    await again.open()
    assert again.already_complete == ["product", "category"] and not again.trackers
    assert (await again.fetch(10)).exhausted
    await again.close()


async def test_source_resumes_after_the_saved_cursor_and_restart_forgets_it() -> None:
    calls: list[tuple[str, str | None]] = []
    api = fake_api({"products": resources("p", 30)}, calls)
    cursors = MemoryCursorStore()
    first = BackfillSource(
        api, ["product"], project_key="p", mode=bf.Mode.CREATED, cursors=cursors, key="k", page_size=10
    )
    await first.open()
    fetched = await first.fetch(12)
    for envelope in fetched.envelopes[:5] + fetched.envelopes[6:]:
        envelope.ack()  # the sixth is still in flight when the sweep stops
    await first.close()
    assert cursors.values == {"k|product": "p0004"}
    second = BackfillSource(
        api, ["product"], project_key="p", mode=bf.Mode.CREATED, cursors=cursors, key="k", page_size=10
    )
    await second.open()
    assert second.resumed == {"product": "p0004"}
    positions = await drain(second)
    await second.close()
    assert positions[0] == "backfill:product:p0005" and len(positions) == 25
    assert calls[-1] == ("products", 'id > "p0004"')
    restarted = BackfillSource(
        api, ["product"], project_key="p", mode=bf.Mode.CREATED, cursors=cursors, key="k", restart=True
    )
    await restarted.open()
    assert len(await drain(restarted)) == 30
    await restarted.close()


async def test_a_dry_run_source_reads_cursors_but_never_writes_them() -> None:
    api = fake_api({"products": resources("p", 5)}, [])
    cursors = MemoryCursorStore()
    await cursors.put("k|product", "p0001")
    source = BackfillSource(
        api, ["product"], project_key="p", mode=bf.Mode.CREATED, cursors=cursors, key="k", save=False
    )
    await source.open()
    assert len(await drain(source)) == 3
    await source.close()
    assert cursors.values == {"k|product": "p0001"} and cursors.writes == 1
