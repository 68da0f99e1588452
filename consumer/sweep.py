"""Initial load and reconciliation: turn what already exists in commercetools into change notifications.

A sweep pages through the API, a resource type at a time, by a cursor on ``id`` (never offsets), and turns
every resource into a synthetic Platform change notification (``ResourceCreated`` for an initial load,
``ResourceUpdated`` for a catch-up). Those go through the ordinary pipeline, so dedupe (a version live traffic
already delivered is stale), routing, outbox coalescing, the throttle, audit and dead letters apply unchanged.

This module is the pure part: which API path serves a type, the ``where`` of a page, the notification built
from a resource, the resumable cursor (the last id below which every resource is settled, by the same
lowest-unacked rule as Kafka offsets) and the counts of a sweep. The port that keeps cursors is
``ports.CursorStore``; the budget share is ``throttle.ShareThrottleStore``; the terminal text lives with the
commands (``consumer.cli.sweep``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import orjson

from consumer.offsets import PartitionOffsets

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


def text_value(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def identifiers(type_id: str, resource: Mapping[str, Any]) -> dict[str, str]:
    """Return the ``resourceUserProvidedIdentifiers`` commercetools would send for ``resource``.

    ``key``, ``externalId``, ``orderNumber``, ``customerNumber`` and ``sku`` where the resource has them; for
    a product, ``sku`` is its master variant's (staged data first: it holds the latest edits).
    """
    found: dict[str, str] = {}
    for name in ("key", "externalId", "orderNumber", "customerNumber", "sku"):
        value = text_value(resource.get(name))
        if value is not None:
            found[name] = value
    if type_id == "product" and "sku" not in found:
        data = resource.get("masterData")
        if isinstance(data, Mapping):
            for projection in ("staged", "current"):
                variant = data.get(projection)
                master = variant.get("masterVariant") if isinstance(variant, Mapping) else None
                sku = text_value(master.get("sku")) if isinstance(master, Mapping) else None
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
    resource_id = text_value(resource.get("id"))
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
    modified = text_value(resource.get("lastModifiedAt"))
    if modified is not None:
        body["modifiedAt"] = modified
    found = identifiers(type_id, resource)
    if found:
        body["resourceUserProvidedIdentifiers"] = found
    return body


def notification_bytes(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body)


# ----------------------------------------------------------------------------------------------- cursors


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


@dataclass(slots=True)
class SweepCounts:
    """What a sweep read, per type and in all."""

    pages: int = 0
    resources: int = 0
    skipped: int = 0
    types_done: int = 0
