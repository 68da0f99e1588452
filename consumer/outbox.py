"""Pending notifications: one per entity, merging newer changes, batched, each owing its envelopes' acks.

One entry per (scope family, external id). A newer change of a pending entity merges into the entry: a burst
of 50 updates to one product is one notification, and the entry owes the acks of all 50 envelopes. An entity
whose notification is in flight gets a new entry that waits until the flight lands, so two notifications of
one entity never race (a retried ``updated`` can never overtake a later ``deleted``).

When to send is ``should_send``: at once when intake is idle, accumulate while a backlog is being read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consumer.dedupe import version_rank
from consumer.messages import ChangeEvent
from consumer.routing import Action, Notification, Route

T = TypeVar("T")
EntityKey = tuple[str, str]


@dataclass(slots=True, eq=False)
class PendingNotification(Generic[T]):
    """A notification waiting to be sent, the envelopes it will settle and the state it will record.

    ``action`` follows the entity's newest known state: ``deleted`` when the newest change is a deletion,
    else ``created`` when a creation was merged (iPaaS.com does not know the entity yet), else ``updated``.
    """

    family: str
    external_id: str
    since: float
    action: Action = Action.UPDATED
    version: int | None = None
    newest_action: Action = Action.UPDATED
    created_seen: bool = False
    owed: list[T] = field(default_factory=list)
    message_keys: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> EntityKey:
        return (self.family, self.external_id)

    def merge(self, route: Route, event: ChangeEvent, owed: T) -> None:
        """Fold one more change of this entity into the entry."""
        action = route.action
        if event.version is None or self.version is None or event.version >= self.version:
            self.newest_action = action
            if event.version is not None:
                self.version = event.version
        if action is Action.CREATED:
            self.created_seen = True
        if self.newest_action is Action.DELETED:
            self.action = Action.DELETED
        elif self.created_seen:
            self.action = Action.CREATED
        else:
            self.action = Action.UPDATED
        self.owed.append(owed)
        self.message_keys.append(event.message_key)
        if event.version is not None:
            rank = version_rank(event.version, action is Action.DELETED)
            resource = event.resource_key
            if rank > self.ranks.get(resource, -1):
                self.ranks[resource] = rank

    def notification(self, debug: bool) -> Notification:
        scope = f"{self.family}/{self.action.value}"
        return Notification(f"{scope}/debug" if debug else scope, self.external_id)


class Outbox(Generic[T]):
    """Pending notifications in arrival order; pure and synchronous (times are passed in)."""

    def __init__(self) -> None:
        self._ready: dict[EntityKey, PendingNotification[T]] = {}
        self._blocked: dict[EntityKey, PendingNotification[T]] = {}
        self._in_flight: set[EntityKey] = set()
        self._pending_keys: set[str] = set()

    def __len__(self) -> int:
        """Return how many entries wait (ready or behind an in-flight notification of their entity)."""
        return len(self._ready) + len(self._blocked)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def is_pending(self, message_key: str) -> bool:
        """Return whether a message with this key waits in (or flies with) an entry already."""
        return message_key in self._pending_keys

    def oldest_ready_since(self) -> float | None:
        for entry in self._ready.values():
            return entry.since
        return None

    def add(self, route: Route, event: ChangeEvent, owed: T, now: float) -> bool:
        """Add a routed change; return True when it merged into an entry that was already pending."""
        key = (route.family, route.external_id)
        entry = self._ready.get(key) or self._blocked.get(key)
        merged = entry is not None
        if entry is None:
            entry = PendingNotification(route.family, route.external_id, since=now)
            if key in self._in_flight:
                self._blocked[key] = entry
            else:
                self._ready[key] = entry
        entry.merge(route, event, owed)
        self._pending_keys.add(event.message_key)
        return merged

    def take(self, max_size: int) -> list[PendingNotification[T]]:
        """Take up to ``max_size`` of the oldest ready entries and mark their entities in flight."""
        taken: list[PendingNotification[T]] = []
        for key in self._ready:
            if len(taken) == max_size:
                break
            taken.append(self._ready[key])
        for entry in taken:
            del self._ready[entry.key]
            self._in_flight.add(entry.key)
        return taken

    def finish(self, entries: list[PendingNotification[T]]) -> None:
        """Mark taken entries as landed (delivered or dead-lettered); unblock what waited behind them."""
        for entry in entries:
            self._pending_keys.difference_update(entry.message_keys)
            self._in_flight.discard(entry.key)
            waiting = self._blocked.pop(entry.key, None)
            if waiting is not None:
                self._ready[entry.key] = waiting

    def drain(self) -> Iterator[PendingNotification[T]]:
        """Remove and yield every entry not in flight (to hand its envelopes back at shutdown)."""
        while self._ready:
            yield self._ready.popitem()[1]
        while self._blocked:
            yield self._blocked.popitem()[1]
        self._pending_keys.clear()


def should_send(
    *,
    ready: int,
    oldest_age: float,
    backlogged: bool,
    intake_blocked: bool,
    flushing: bool,
    pace_seconds: float,
) -> bool:
    """Decide whether a batch should leave now (a throttle slot is still needed).

    Under light load a batch leaves at once. While a backlog is being read (the source already holds more)
    a batch waits until its oldest entry has waited one fair share of the budget, ``window / limit``
    seconds: sending sooner would spend budget on notifications that the next moment would merge. Waiting
    longer would not help, since the budget refills at that pace. When intake cannot go on (the in-flight
    bound is reached) or the service is flushing, waiting gains nothing.
    """
    if ready == 0:
        return False
    if flushing or intake_blocked or not backlogged:
        return True
    return oldest_age >= pace_seconds
