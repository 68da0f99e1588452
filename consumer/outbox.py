"""Pending notifications: one per entity, merging newer changes, batched, each owing its envelopes' acks.

One entry per (scope family, external id). A newer change of a pending entity merges into the entry: a burst
of 50 updates to one product is one notification, and the entry owes the acks of all 50 envelopes. An entity
whose notification is in flight gets a new entry that waits until the flight lands, so two notifications of
one entity never race (a retried ``updated`` can never overtake a later ``deleted``).

The order rule: for every entity, the notifications iPaaS.com accepts rise strictly in watermark rank. So
when a flight lands delivered, the changes that waited behind it are judged again against what it carried:
those it covers (rank at or below the rank it delivered for their resource, or the very message it carried)
are settled without a notification of their own. An entry keeps every change it merged, with its rank, so
it can be judged again change by change; its action follows its highest-ranked change, so merging an older
change never downgrades a pending deletion.

An entry can also be deferred: taken for sending, it found its resource claimed by another process, and
waits until a given time before it is tried again (changes of that entity merge into it meanwhile).

When to send is ``should_send``: at once when intake is idle, accumulate while a backlog is being read.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consumer.dedupe import version_rank
from consumer.messages import ChangeEvent
from consumer.routing import Action, Notification, Route

T = TypeVar("T")
EntityKey = tuple[str, str]

# The rank of a change that carries no version: it is never judged stale, only a duplicate by its key.
NO_RANK = -1


@dataclass(frozen=True, slots=True)
class Covered(Generic[T]):
    """A change settled because a delivered notification already covered it.

    ``watermark`` is the rank that covered it, or None when the very same message was delivered.
    """

    owed: T
    message_key: str
    resource: str
    watermark: int | None


@dataclass(slots=True, eq=False)
class PendingNotification(Generic[T]):
    """A notification waiting to be sent, the changes it carries and the envelopes it will settle.

    ``owed``, ``message_keys`` and ``changes`` (resource, rank, action) run in parallel, one item per change
    in arrival order. ``action`` follows the entity's newest known state: ``deleted`` when the
    highest-ranked change is a deletion, else ``created`` when a creation was merged (iPaaS.com does not
    know the entity yet), else ``updated``. ``ranks`` is the highest rank per resource (``NO_RANK`` for a
    resource whose changes carry no version): what a delivery records. ``lowest_rank`` is the lowest rank
    of a versioned change, and ``versionless`` says some change has no version: together they tell at a
    glance that nothing of the entry is covered by a watermark.
    """

    family: str
    external_id: str
    since: float
    action: Action = Action.UPDATED
    newest_rank: int = NO_RANK
    newest_action: Action = Action.UPDATED
    created_seen: bool = False
    not_before: float = 0.0
    versionless: bool = False
    lowest_rank: int = 1 << 62
    owed: list[T] = field(default_factory=list)
    message_keys: list[str] = field(default_factory=list)
    changes: list[tuple[str, int, Action]] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> EntityKey:
        return (self.family, self.external_id)

    @property
    def version(self) -> int | None:
        """Return the version of the highest-ranked change (None when no change carried one)."""
        return None if self.newest_rank == NO_RANK else self.newest_rank // 2

    def merge(self, route: Route, event: ChangeEvent, owed: T) -> None:
        """Fold one more change of this entity into the entry."""
        action = route.action
        rank = NO_RANK if event.version is None else version_rank(event.version, action is Action.DELETED)
        self.owed.append(owed)
        self.message_keys.append(event.message_key)
        self.changes.append((event.resource_key, rank, action))
        self._fold(event.resource_key, rank, action)

    def _fold(self, resource: str, rank: int, action: Action) -> None:
        if rank == NO_RANK:
            self.versionless = True
            # No version to compare: it is the newest news, except that it never undoes a deletion.
            if self.newest_action is not Action.DELETED or action is Action.DELETED:
                self.newest_action = action
        else:
            if rank >= self.newest_rank:
                self.newest_rank = rank
                self.newest_action = action
            if rank < self.lowest_rank:
                self.lowest_rank = rank
        if action is Action.CREATED:
            self.created_seen = True
        if self.newest_action is Action.DELETED:
            self.action = Action.DELETED
        elif self.created_seen:
            self.action = Action.CREATED
        else:
            self.action = Action.UPDATED
        current = self.ranks.get(resource)
        if current is None or rank > current:
            self.ranks[resource] = rank

    def settle_covered(
        self, watermarks: Mapping[str, int], delivered_keys: Collection[str]
    ) -> list[Covered[T]]:
        """Remove and return the changes already covered by what was delivered; refold what remains."""
        lowest = self.lowest_rank
        if not delivered_keys and all(watermarks.get(r, NO_RANK) < lowest for r in self.ranks):
            return []
        covered: list[Covered[T]] = []
        keep: list[int] = []
        for i, (key, (resource, rank, _)) in enumerate(zip(self.message_keys, self.changes, strict=True)):
            if key in delivered_keys:
                covered.append(Covered(self.owed[i], key, resource, None))
                continue
            watermark = watermarks.get(resource)
            if rank != NO_RANK and watermark is not None and rank <= watermark:
                covered.append(Covered(self.owed[i], key, resource, watermark))
                continue
            keep.append(i)
        if covered:
            self._keep(keep)
        return covered

    def absorb(self, other: PendingNotification[T]) -> None:
        """Take in the changes of a later entry of the same entity."""
        self.owed.extend(other.owed)
        self.message_keys.extend(other.message_keys)
        self.changes.extend(other.changes)
        self._keep(range(len(self.owed)))

    def _keep(self, indices: list[int] | range) -> None:
        owed, keys, changes = self.owed, self.message_keys, self.changes
        self.owed = [owed[i] for i in indices]
        self.message_keys = [keys[i] for i in indices]
        self.changes = [changes[i] for i in indices]
        self.action, self.newest_rank, self.newest_action = Action.UPDATED, NO_RANK, Action.UPDATED
        self.created_seen = self.versionless = False
        self.lowest_rank = 1 << 62
        self.ranks = {}
        for resource, rank, action in self.changes:
            self._fold(resource, rank, action)

    def notification(self, debug: bool) -> Notification:
        scope = f"{self.family}/{self.action.value}"
        return Notification(f"{scope}/debug" if debug else scope, self.external_id)


class Outbox(Generic[T]):
    """Pending notifications in arrival order; pure and synchronous (times are passed in)."""

    def __init__(self) -> None:
        self._ready: dict[EntityKey, PendingNotification[T]] = {}
        self._blocked: dict[EntityKey, PendingNotification[T]] = {}
        self._deferred: dict[EntityKey, PendingNotification[T]] = {}
        self._in_flight: set[EntityKey] = set()
        self._pending_keys: set[str] = set()

    def __len__(self) -> int:
        """Return how many entries wait (ready, deferred, or behind an in-flight notification)."""
        return len(self._ready) + len(self._blocked) + len(self._deferred)

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
        entry = self._ready.get(key) or self._blocked.get(key) or self._deferred.get(key)
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

    def finish(self, entries: list[PendingNotification[T]], *, delivered: bool = False) -> list[Covered[T]]:
        """Mark taken entries as landed and unblock what waited behind them.

        ``delivered``: the entries' notifications were accepted, so each waiting entry is judged again
        against what its entity's flight carried; the changes that flight covered are removed and returned
        (to be settled as stale), and an entry left empty is dropped. Otherwise (dead-lettered, dropped as
        already covered) nothing was delivered and the waiting entries stand as they are.
        """
        covered: list[Covered[T]] = []
        for entry in entries:
            self._pending_keys.difference_update(entry.message_keys)
            self._in_flight.discard(entry.key)
            waiting = self._blocked.pop(entry.key, None)
            if waiting is None:
                continue
            if delivered:
                settled = waiting.settle_covered(entry.ranks, set(entry.message_keys))
                covered.extend(settled)
                self._pending_keys.difference_update(c.message_key for c in settled)
                if not waiting.owed:
                    continue
            self._pending_keys.update(waiting.message_keys)
            self._ready[entry.key] = waiting
        return covered

    def settle_covered(
        self, entry: PendingNotification[T], watermarks: Mapping[str, int], delivered_keys: Collection[str]
    ) -> list[Covered[T]]:
        """Judge a taken entry again against the delivered state; return the changes that state covers."""
        covered = entry.settle_covered(watermarks, delivered_keys)
        if covered:
            self._pending_keys.difference_update(c.message_key for c in covered)
            self._pending_keys.update(entry.message_keys)
        return covered

    def defer(self, entries: list[PendingNotification[T]], until: float) -> None:
        """Put taken entries back, not to be taken before ``until`` (their resource is claimed elsewhere)."""
        for entry in entries:
            self._in_flight.discard(entry.key)
            waiting = self._blocked.pop(entry.key, None)
            if waiting is not None:
                entry.absorb(waiting)
            entry.not_before = until
            self._deferred[entry.key] = entry

    def release_due(self, now: float) -> float | None:
        """Make the deferred entries whose time has come ready; return when the next one is due."""
        due = [key for key, entry in self._deferred.items() if entry.not_before <= now]
        for key in due:
            self._ready[key] = self._deferred.pop(key)
        return min((entry.not_before for entry in self._deferred.values()), default=None)

    def drain(self) -> Iterator[PendingNotification[T]]:
        """Remove and yield every entry not in flight (to hand its envelopes back at shutdown)."""
        for table in (self._ready, self._blocked, self._deferred):
            while table:
                yield table.popitem()[1]
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
