from consumer.dedupe import version_rank
from consumer.messages import ChangeEvent, NotificationType
from consumer.outbox import Outbox, should_send
from consumer.routing import Action, Route


def change(kind: NotificationType, version: int, resource_id: str = "p1") -> ChangeEvent:
    return ChangeEvent(kind=kind, resource_type="product", resource_id=resource_id, version=version)


CREATED, UPDATED, DELETED = (
    NotificationType.RESOURCE_CREATED,
    NotificationType.RESOURCE_UPDATED,
    NotificationType.RESOURCE_DELETED,
)
ACTION = {CREATED: Action.CREATED, UPDATED: Action.UPDATED, DELETED: Action.DELETED}


def add(
    box: Outbox[str], kind: NotificationType, version: int, external_id: str = "p1", now: float = 0.0
) -> bool:
    event = change(kind, version, external_id)
    return box.add(Route("product", ACTION[kind], external_id), event, f"{external_id}@{version}", now)


def test_burst_coalesces_into_one_entry_owing_every_ack() -> None:
    box: Outbox[str] = Outbox()
    assert add(box, UPDATED, 1) is False
    for version in range(2, 51):
        assert add(box, UPDATED, version) is True
    assert len(box) == 1
    [entry] = box.take(100)
    assert entry.action is Action.UPDATED
    assert len(entry.owed) == 50
    assert entry.ranks == {"product:p1": 100}
    assert entry.notification(debug=False).scope == "product/updated"


def test_deleted_supersedes_and_late_update_does_not_revive() -> None:
    box: Outbox[str] = Outbox()
    add(box, CREATED, 1)
    add(box, UPDATED, 2)
    add(box, DELETED, 3)
    add(box, UPDATED, 2)  # out of order: older than the deletion
    [entry] = box.take(10)
    assert entry.action is Action.DELETED
    assert entry.ranks == {"product:p1": 7}


def test_created_wins_over_updates_and_recreation_after_delete() -> None:
    box: Outbox[str] = Outbox()
    add(box, UPDATED, 3)
    add(box, CREATED, 1)
    [entry] = box.take(10)
    assert entry.action is Action.CREATED
    box.finish([entry])
    add(box, DELETED, 4)
    add(box, CREATED, 5)  # a new resource reusing the external id (key-based ids)
    [entry] = box.take(10)
    assert entry.action is Action.CREATED


def test_in_flight_entity_waits_behind_its_flight() -> None:
    box: Outbox[str] = Outbox()
    add(box, UPDATED, 1, "a")
    add(box, UPDATED, 1, "b")
    first = box.take(1)
    assert [e.external_id for e in first] == ["a"]
    assert add(box, DELETED, 2, "a") is False  # a new entry, not merged into the flying one
    assert [e.external_id for e in box.take(10)] == ["b"]
    assert box.take(10) == []
    assert len(box) == 1
    box.finish(first)
    [again] = box.take(10)
    assert again.external_id == "a" and again.action is Action.DELETED


def test_take_respects_batch_size_and_arrival_order() -> None:
    box: Outbox[str] = Outbox()
    for i in range(25):
        add(box, UPDATED, 1, f"e{i}", now=float(i))
    assert box.oldest_ready_since() == 0.0
    batch = box.take(10)
    assert [e.external_id for e in batch] == [f"e{i}" for i in range(10)]
    assert box.oldest_ready_since() == 10.0
    assert box.ready_count == 15 and box.in_flight_count == 10


def test_pending_keys_and_drain() -> None:
    box: Outbox[str] = Outbox()
    add(box, UPDATED, 1, "a")
    assert box.is_pending("product:a:ResourceUpdated:1")
    drained = list(box.drain())
    assert len(drained) == 1 and len(box) == 0
    assert not box.is_pending("product:a:ResourceUpdated:1")


def test_should_send_policy() -> None:
    base = dict(
        ready=3, oldest_age=0.0, backlogged=False, intake_blocked=False, flushing=False, pace_seconds=0.2
    )
    assert should_send(**base) is True  # light load: at once
    assert should_send(**{**base, "ready": 0}) is False
    assert should_send(**{**base, "backlogged": True}) is False  # a backlog is being read: merge more
    assert should_send(**{**base, "backlogged": True, "oldest_age": 0.2}) is True
    assert should_send(**{**base, "backlogged": True, "intake_blocked": True}) is True
    assert should_send(**{**base, "backlogged": True, "flushing": True}) is True


def test_a_landed_flight_settles_the_older_changes_that_waited_behind_it() -> None:
    # The traced case: v3..v14 and the deletion v18 fly; v16 (another partition, late) waits behind them.
    box: Outbox[str] = Outbox()
    for version in range(3, 15):
        add(box, UPDATED, version)
    add(box, DELETED, 18)
    flight = box.take(10)
    add(box, UPDATED, 16)
    add(box, UPDATED, 19)  # newer than anything delivered: stays
    covered = box.finish(flight, delivered=True)
    assert [(c.owed, c.watermark) for c in covered] == [("p1@16", version_rank(18, True))]
    [entry] = box.take(10)
    assert entry.owed == ["p1@19"] and entry.ranks == {"product:p1": 38}
    assert not box.is_pending("product:p1:ResourceUpdated:16")


def test_a_waiting_entry_wholly_covered_is_dropped() -> None:
    box: Outbox[str] = Outbox()
    add(box, DELETED, 5)
    flight = box.take(10)
    add(box, UPDATED, 4)
    add(box, DELETED, 5)  # a redelivery of the flying message
    covered = box.finish(flight, delivered=True)
    assert sorted((c.owed, c.watermark) for c in covered) == [("p1@4", 11), ("p1@5", None)]
    assert len(box) == 0 and box.take(10) == []


def test_a_failed_flight_leaves_the_waiting_changes_as_they_are() -> None:
    box: Outbox[str] = Outbox()
    add(box, DELETED, 5)
    flight = box.take(10)
    add(box, UPDATED, 4)
    assert box.finish(flight) == []  # dead-lettered: nothing was delivered, nothing is covered
    [entry] = box.take(10)
    assert entry.owed == ["p1@4"] and entry.action is Action.UPDATED


def test_merging_never_downgrades_a_pending_deletion() -> None:
    box: Outbox[str] = Outbox()
    add(box, DELETED, 5)
    add(box, UPDATED, 5)  # same version: a deletion outranks the update of the version it deleted
    add(box, UPDATED, 3)
    versionless = ChangeEvent(kind=UPDATED, resource_type="product", resource_id="p1", version=None)
    box.add(Route("product", Action.UPDATED, "p1"), versionless, "p1@none", 0.0)
    [entry] = box.take(10)
    assert entry.action is Action.DELETED and entry.version == 5


def test_judging_a_taken_entry_again_refolds_its_action() -> None:
    box: Outbox[str] = Outbox()
    add(box, CREATED, 1)
    add(box, UPDATED, 2)
    add(box, UPDATED, 3)
    [entry] = box.take(10)
    assert entry.action is Action.CREATED
    covered = box.settle_covered(entry, {"product:p1": version_rank(2, False)}, frozenset())
    assert [c.owed for c in covered] == ["p1@1", "p1@2"]
    assert entry.owed == ["p1@3"] and entry.action is Action.UPDATED and entry.ranks == {"product:p1": 6}


def test_a_deferred_entry_takes_in_what_waited_and_returns_when_due() -> None:
    box: Outbox[str] = Outbox()
    add(box, UPDATED, 1, "a")
    flight = box.take(10)
    add(box, UPDATED, 2, "a")  # waits behind the flight
    box.defer(flight, until=5.0)  # another replica holds the resource
    add(box, DELETED, 3, "a")  # merges into the deferred entry
    assert len(box) == 1 and box.take(10) == []
    assert box.release_due(4.0) == 5.0 and box.take(10) == []
    assert box.release_due(5.0) is None
    [entry] = box.take(10)
    assert entry.owed == ["a@1", "a@2", "a@3"] and entry.action is Action.DELETED
