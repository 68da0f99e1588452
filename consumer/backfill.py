"""Initial load and reconciliation: turn what already exists in commercetools into change notifications.

A sweep pages through the API, a resource type at a time, by a cursor on ``id`` (never offsets), and turns
every resource into a synthetic Platform change notification (``ResourceCreated`` for an initial load,
``ResourceUpdated`` for a catch-up). Those go through the ordinary pipeline, so dedupe (a version live traffic
already delivered is stale), routing, outbox coalescing, the throttle, audit and dead letters apply unchanged.

This module is the pure part: which API path serves a type, the ``where`` of a page, the notification built
from a resource, the resumable cursor (the last id below which every resource is settled, by the same
lowest-unacked rule as Kafka offsets), the ``CursorStore`` port that keeps it, a ``ThrottleStore`` wrapper
that holds a sweep to a share of the budget, and the progress line a person at a terminal reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol

import orjson

from consumer.offsets import PartitionOffsets
from consumer.ports import Slot, ThrottleStore
from consumer.throttle import ThrottleLedger, ThrottleLimits

SOURCE_NAME: Final = "backfill"
PAGE_SIZE: Final = 500
# A cursor's value once every resource of its type was settled: not an id (ids are UUIDs or keys without it).
COMPLETE: Final = "*complete*"

# The query endpoint of each resource type id that a change subscription can name.
RESOURCE_PATHS: Final[Mapping[str, str]] = {
    "product": "products",
    "category": "categories",
    "customer": "customers",
    "customer-group": "customer-groups",
    "business-unit": "business-units",
    "order": "orders",
    "inventory-entry": "inventory",
    "payment": "payments",
    "standalone-price": "standalone-prices",
    "product-selection": "product-selections",
    "store": "stores",
    "channel": "channels",
    "cart": "carts",
    "cart-discount": "cart-discounts",
    "discount-code": "discount-codes",
    "product-discount": "product-discounts",
    "product-type": "product-types",
    "tax-category": "tax-categories",
    "shipping-method": "shipping-methods",
    "shopping-list": "shopping-lists",
    "quote": "quotes",
    "quote-request": "quote-requests",
    "staged-quote": "staged-quotes",
    "review": "reviews",
    "state": "states",
    "zone": "zones",
    "type": "types",
    "associate-role": "associate-roles",
    "attribute-group": "attribute-groups",
}


class Mode(StrEnum):
    """What the synthetic notifications say: an initial load (created) or a catch-up (updated)."""

    CREATED = "created"
    UPDATED = "updated"

    @property
    def notification_type(self) -> str:
        return "ResourceCreated" if self is Mode.CREATED else "ResourceUpdated"


class UnknownType(ValueError):
    """A ``--type`` no sweep can read."""


def resource_path(type_id: str) -> str:
    """Return the API path that lists ``type_id`` resources; raise UnknownType if there is none."""
    try:
        return RESOURCE_PATHS[type_id]
    except KeyError:
        raise UnknownType(f"{type_id!r} is not a resource type a sweep can read") from None


def api_time(when: datetime) -> str:
    """Render a time the way commercetools writes ``lastModifiedAt``: UTC, milliseconds, ``Z``.

    The same shape as the stored values keeps comparisons right even where a server compares text.
    """
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def where_clause(
    *, after: str | None = None, since: datetime | None = None, until: datetime | None = None
) -> str | None:
    """Return the ``where`` of a sweep's pages: past the cursor, modified in ``[since, until)``."""
    conditions = []
    if after is not None:
        conditions.append(f"id > {_quoted(after)}")
    if since is not None:
        conditions.append(f"lastModifiedAt >= {_quoted(api_time(since))}")
    if until is not None:
        conditions.append(f"lastModifiedAt < {_quoted(api_time(until))}")
    return " and ".join(conditions) or None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def identifiers(type_id: str, resource: Mapping[str, Any]) -> dict[str, str]:
    """Return the ``resourceUserProvidedIdentifiers`` commercetools would send for ``resource``.

    ``key``, ``externalId``, ``orderNumber``, ``customerNumber`` and ``sku`` where the resource has them; for
    a product, ``sku`` is its master variant's (staged data first: it holds the latest edits).
    """
    found: dict[str, str] = {}
    for name in ("key", "externalId", "orderNumber", "customerNumber", "sku"):
        value = _text(resource.get(name))
        if value is not None:
            found[name] = value
    if type_id == "product" and "sku" not in found:
        data = resource.get("masterData")
        if isinstance(data, Mapping):
            for projection in ("staged", "current"):
                variant = data.get(projection)
                master = variant.get("masterVariant") if isinstance(variant, Mapping) else None
                sku = _text(master.get("sku")) if isinstance(master, Mapping) else None
                if sku is not None:
                    found["sku"] = sku
                    break
    return found


def position(type_id: str, resource_id: str) -> str:
    """Return the audit ``position`` of a swept resource: ``backfill:<type>:<id>``."""
    return f"{SOURCE_NAME}:{type_id}:{resource_id}"


def change_notification(
    type_id: str, resource: Mapping[str, Any], project_key: str, mode: Mode
) -> dict[str, Any] | None:
    """Build the Platform change notification that stands for ``resource``; None when it has no id/version.

    There is no ``createdBy``: the sweep, not an API client, is its author, so echo suppression never drops
    it. ``modifiedAt`` is the resource's ``lastModifiedAt``.
    """
    resource_id = _text(resource.get("id"))
    version = resource.get("version")
    if resource_id is None or type(version) is not int or version < 0:
        return None
    body: dict[str, Any] = {
        "notificationType": mode.notification_type,
        "projectKey": project_key,
        "resource": {"typeId": type_id, "id": resource_id},
        "version": version,
    }
    if mode is Mode.UPDATED:
        # A sweep does not know the version it follows; the resource's own is the honest lower bound.
        body["oldVersion"] = version
    modified = _text(resource.get("lastModifiedAt"))
    if modified is not None:
        body["modifiedAt"] = modified
    found = identifiers(type_id, resource)
    if found:
        body["resourceUserProvidedIdentifiers"] = found
    return body


def notification_bytes(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body)


# ----------------------------------------------------------------------------------------------- cursors


class CursorStore(Protocol):
    """Where sweep cursors are kept between runs: one string value per name."""

    async def get(self, name: str) -> str | None: ...

    async def put(self, name: str, value: str) -> None: ...

    async def delete(self, name: str) -> None: ...

    async def close(self) -> None: ...


def run_key(command: str, mode: Mode, since: datetime | None = None, until: datetime | None = None) -> str:
    """Return the name of a sweep for its cursors: the same command with the same bounds resumes."""
    return ":".join((command, mode.value, api_time(since) if since else "", api_time(until) if until else ""))


def cursor_name(key: str, type_id: str) -> str:
    return f"{key}|{type_id}"


class CursorTracker:
    """The resumable position of one type's sweep: the last id below which every resource is settled.

    Resources get sequence numbers in the order they are read (ascending id); acks arrive out of order and
    ``PartitionOffsets`` gives the lowest one not yet settled, exactly as for Kafka offsets.
    """

    __slots__ = ("_ids", "_offsets", "_position", "_read_all", "_saved", "_sequence")

    def __init__(self, start_after: str | None = None) -> None:
        self._offsets = PartitionOffsets()
        self._ids: dict[int, str] = {}
        self._sequence = 0
        self._position = start_after
        self._saved = start_after
        self._read_all = False

    def received(self, resource_id: str) -> int:
        """Register a resource read (in ascending id order); return its sequence number for the ack."""
        sequence = self._sequence
        self._sequence += 1
        self._offsets.received(sequence)
        self._ids[sequence] = resource_id
        return sequence

    def acked(self, sequence: int) -> None:
        self._offsets.acked(sequence)
        committable = self._offsets.committable()
        if committable is None:
            return
        self._offsets.committed(committable)
        last = committable - 1
        self._position = self._ids[last]
        for done in [s for s in self._ids if s <= last]:
            del self._ids[done]

    def read_all(self) -> None:
        """Record that the last page was read: once everything is settled the type is complete."""
        self._read_all = True

    @property
    def outstanding(self) -> int:
        return self._offsets.outstanding

    @property
    def complete(self) -> bool:
        return self._read_all and self._offsets.outstanding == 0

    @property
    def value(self) -> str | None:
        """Return what to save: ``COMPLETE``, the last settled id, or None (nothing settled yet)."""
        return COMPLETE if self.complete else self._position

    def unsaved(self) -> str | None:
        """Return the value to save when it changed since the last ``saved``, else None."""
        value = self.value
        return value if value is not None and value != self._saved else None

    def saved(self, value: str) -> None:
        self._saved = value


# ---------------------------------------------------------------------------------------- budget share


def share_limits(limits: ThrottleLimits, share: float) -> ThrottleLimits:
    """Return the part of ``limits`` a sweep may use: ``floor(limit * share)`` requests per window (at least
    one) and as large a part of the concurrency limits (at least one each)."""
    if not 0.0 < share <= 1.0:
        raise ValueError("the budget share must be above 0 and at most 1")
    return ThrottleLimits(
        limit=max(1, math.floor(limits.limit * share)),
        window_seconds=limits.window_seconds,
        connections=max(1, math.floor(limits.connections * share)),
        batch_executions=max(1, math.floor(limits.batch_executions * share)),
    )


class ShareThrottleStore:
    """A ``ThrottleStore`` that holds its user to a share of the budget of another ``ThrottleStore``.

    A slot is first taken from a local ledger with the share's limits, then from the inner store (the whole
    subscription's budget: in process, or shared through Redis with ``ctsync run``). So the sweep alone never
    uses more than its share, and the sweep and live traffic together stay within the whole limit.

    When the inner store refuses, the local slot is kept as a reservation for the next attempt rather than
    given back: releasing a request slot counts a window place for a whole window, which a request that never
    happened must not cost. (A reservation left by a waiter that was cancelled is taken by the next one.)
    """

    def __init__(
        self,
        inner: ThrottleStore,
        limits: ThrottleLimits,
        *,
        close_inner: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.limits = limits
        self.ledger = ThrottleLedger(limits)
        self.clock = clock
        self._close_inner = close_inner
        self._reserved: dict[tuple[Slot, str], int] = {}

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        """Take a slot of the share, then of the whole budget; return 0.0 or seconds to wait."""
        key = (slot, holder)
        if self._reserved.get(key, 0) == 0:
            hint = self.ledger.try_acquire(slot, holder, self.clock())
            if hint > 0.0:
                return hint
            self._reserved[key] = self._reserved.get(key, 0) + 1
        hint = await self.inner.try_acquire(slot, holder)
        if hint > 0.0:
            return hint
        self._reserved[key] -= 1
        return 0.0

    async def release(self, slot: Slot, holder: str) -> None:
        try:
            await self.inner.release(slot, holder)
        finally:
            self.ledger.release(slot, holder, self.clock())

    async def pause(self, seconds: float) -> None:
        self.ledger.pause(seconds, self.clock())
        await self.inner.pause(seconds)

    async def close(self) -> None:
        if self._close_inner:
            await self.inner.close()


def ceiling_per_minute(limits: ThrottleLimits, batch_size: int) -> float:
    """Return the most notifications per minute ``limits`` let through at ``batch_size`` per request."""
    return limits.limit * batch_size * 60.0 / limits.window_seconds


# -------------------------------------------------------------------------------------------- progress


@dataclass(slots=True)
class SweepCounts:
    """What a sweep read, per type and in all."""

    pages: int = 0
    resources: int = 0
    skipped: int = 0
    types_done: int = 0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_line(
    *,
    type_id: str | None,
    counts: SweepCounts,
    types_total: int,
    notified: int,
    queued: int,
    elapsed: float,
    ceiling_per_min: float,
) -> str:
    """Return the one-line progress a person at a terminal sees.

    The sweep reads with ``withTotal=false`` (counting is expensive on large projects), so the total is
    unknown and no overall ETA is claimed; what is known is how long the resources read but not yet notified
    take at the budget's ceiling, which is a lower bound for the time still to go.
    """
    rate = notified * 60.0 / elapsed if elapsed > 0 else 0.0
    parts = [
        f"backfill {type_id or '-'} ({counts.types_done}/{types_total} types done)",
        f"pages {counts.pages}",
        f"resources {counts.resources}",
        f"notified {notified}",
        f"{rate:,.0f}/min",
    ]
    if queued and ceiling_per_min > 0:
        parts.append(f"queued {queued} (>= {_duration(queued * 60.0 / ceiling_per_min)} at the budget)")
    parts.append("total unknown (withTotal=false)")
    return ", ".join(parts)


def summary_lines(
    *,
    types: Sequence[str],
    counts: SweepCounts,
    per_type: Mapping[str, int],
    notified: int,
    elapsed: float,
    ceiling_per_min: float,
) -> list[str]:
    """Return the end-of-sweep summary (stderr)."""
    rate = notified * 60.0 / elapsed if elapsed > 0 else 0.0
    ceiling = f"budget ceiling {ceiling_per_min:,.0f}/min" if ceiling_per_min > 0 else "no throttle"
    lines = [
        f"swept {counts.resources} resources in {counts.pages} pages ("
        + ", ".join(f"{t}: {per_type.get(t, 0)}" for t in types)
        + ")",
        f"  notified {notified} in {_duration(elapsed)}: {rate:,.0f}/min ({ceiling})",
    ]
    if counts.skipped:
        lines.append(f"  {counts.skipped} resources without an id or version were skipped")
    return lines


# ------------------------------------------------------------------------------ subscription health

# The statuses in which commercetools drops what it could not deliver (shared docs, commercetools.md).
DROPPING_STATUSES: Final = frozenset({"ConfigurationErrorDeliveryStopped", "ManuallySuspended"})


def subscription_report(subscriptions: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """Return ``(line, is_warning)`` for each subscription: key, destination type and health status."""
    if not subscriptions:
        return [("no subscriptions in this project", True)]
    lines: list[tuple[str, bool]] = []
    for subscription in subscriptions:
        name = _text(subscription.get("key")) or f"(no key, id {subscription.get('id')})"
        destination = subscription.get("destination")
        kind = destination.get("type") if isinstance(destination, Mapping) else None
        status = _text(subscription.get("status")) or "unknown"
        lines.append((f"subscription {name}: destination {kind or 'unknown'}, status {status}", False))
        if status in DROPPING_STATUSES:
            lines.append(
                (
                    f"  warning: {status}: commercetools drops the notifications it cannot deliver; fix the "
                    "subscription, then reconcile from the time it stopped delivering",
                    True,
                )
            )
        elif status != "Healthy":
            lines.append((f"  warning: {status}: deliveries are delayed or failing", True))
    return lines
