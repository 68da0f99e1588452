"""``ctsync audit``: answer questions from audit logs (JSON lines): the story of a resource, a message key
or a hook request, and counts by event and by reason over a time range. Pure: the caller reads the lines.

A story follows the links the log records: a resource's events carry its ``message_key``; ``batch.sent``
carries the ``message_keys`` (and notifications) of the hook request, identified by ``correlation_id``; a
retry or a refusal of that request carries the same ``correlation_id``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

# Fields shown in a story line, in this order, when an event has them.
STORY_FIELDS: Final = (
    "resource_type",
    "resource_id",
    "version",
    "message_key",
    "scope",
    "external_id",
    "correlation_id",
    "size",
    "status",
    "attempt",
    "delay_s",
    "watermark",
    "reason",
    "position",
    "error",
)
_RELATIVE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_REASON_LIMIT: Final = 80


@dataclass(frozen=True, slots=True)
class Event:
    """One audit log line: where it was read and its fields."""

    origin: str
    line: int
    fields: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.fields.get("event", ""))

    @property
    def timestamp(self) -> datetime | None:
        text = self.fields.get("timestamp")
        return parse_timestamp(text) if isinstance(text, str) else None

    def get(self, name: str) -> Any:
        return self.fields.get(name)


@dataclass
class Reading:
    """Events read from lines, and how many lines were not audit events (blank, text, broken JSON)."""

    events: list[Event] = field(default_factory=list)
    skipped: int = 0


def read_events(lines: Iterable[bytes | str], origin: str, into: Reading | None = None) -> Reading:
    """Parse the JSON objects with an ``event`` field among ``lines``; count the other lines as skipped."""
    reading = into if into is not None else Reading()
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            reading.skipped += 1
            continue
        if not isinstance(data, dict) or "event" not in data:
            reading.skipped += 1
            continue
        reading.events.append(Event(origin, number, data))
    return reading


def parse_timestamp(text: str) -> datetime | None:
    """Parse an ISO 8601 timestamp (``Z`` or an offset; naive means UTC); None when unparseable."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_bound(text: str, now: datetime | None = None) -> datetime:
    """Parse a ``--since``/``--until`` value: ISO 8601 (a date alone is its midnight UTC) or an age such
    as ``90s``, ``15m``, ``2h``, ``7d`` (before ``now``); raise ValueError otherwise."""
    match = _RELATIVE.fullmatch(text.strip())
    if match is not None:
        now = now or datetime.now(UTC)
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    when = parse_timestamp(text)
    if when is None:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (2026-01-31T12:00:00Z) nor an age (15m, 2h, 7d)"
        )
    return when


def in_range(events: Iterable[Event], since: datetime | None, until: datetime | None) -> list[Event]:
    """Keep the events from ``since`` (inclusive) to ``until`` (exclusive); events without a time are kept
    only when no bound is given."""
    if since is None and until is None:
        return list(events)
    kept = []
    for event in events:
        when = event.timestamp
        if when is None or (since is not None and when < since) or (until is not None and when >= until):
            continue
        kept.append(event)
    return kept


def _keys(event: Event) -> set[str]:
    keys = {str(k) for k in event.get("message_keys") or () if k}
    if event.get("message_key"):
        keys.add(str(event.get("message_key")))
    return keys


def _names_external_id(event: Event, external_id: str) -> bool:
    if event.get("external_id") == external_id:
        return True
    notifications = event.get("notifications")
    return isinstance(notifications, list) and any(
        isinstance(n, dict) and n.get("external_id") == external_id for n in notifications
    )


def _follow(events: Sequence[Event], keys: set[str], correlation_ids: set[str]) -> list[Event]:
    """Return the events of ``keys`` and of the hook requests that carried them, widening both sets."""
    for event in events:
        if event.get("correlation_id") and _keys(event) & keys:
            correlation_ids.add(str(event.get("correlation_id")))
    return [
        event
        for event in events
        if _keys(event) & keys
        or (event.get("correlation_id") and str(event.get("correlation_id")) in correlation_ids)
    ]


def story_of_resource(events: Sequence[Event], resource_id: str) -> list[Event]:
    """Every event about a resource: its own, those of its message keys, and its hook requests."""
    keys: set[str] = set()
    own: list[Event] = []
    for event in events:
        if event.get("resource_id") == resource_id or _names_external_id(event, resource_id):
            own.append(event)
            if event.name != "batch.sent":  # a batch's other keys belong to other resources
                keys |= _keys(event)
    correlation_ids = {str(e.get("correlation_id")) for e in own if e.get("correlation_id")}
    linked = _follow(events, keys, correlation_ids)
    chosen = {id(e) for e in own} | {id(e) for e in linked}
    return [e for e in events if id(e) in chosen]


def story_of_message_key(events: Sequence[Event], message_key: str) -> list[Event]:
    """Every event of a message key, and of the hook requests that carried it."""
    return _follow(events, {message_key}, set())


def story_of_correlation_id(events: Sequence[Event], correlation_id: str) -> list[Event]:
    """A hook request's events (sent, retried, refused) and the story of every message key it carried."""
    keys: set[str] = set()
    for event in events:
        if event.get("correlation_id") == correlation_id:
            keys |= _keys(event)
    return _follow(events, keys, {correlation_id})


def reason_group(reason: str) -> str:
    """Group reasons by what precedes their details: 'not valid JSON: line 1...' -> 'not valid JSON'."""
    head = reason.split(":", 1)[0].strip() or reason
    return head if len(head) <= _REASON_LIMIT else head[: _REASON_LIMIT - 3] + "..."


@dataclass(frozen=True, slots=True)
class Counts:
    total: int
    by_event: dict[str, int]
    by_reason: dict[str, int]
    first: str | None
    last: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "first": self.first,
            "last": self.last,
            "by_event": self.by_event,
            "by_reason": self.by_reason,
        }


def count(events: Sequence[Event]) -> Counts:
    """Count events by name, and by reason (grouped, see ``reason_group``) for those that carry one."""
    by_event = Counter(e.name for e in events)
    by_reason = Counter(
        f"{e.name}: {reason_group(str(e.get('reason')))}" for e in events if e.get("reason") is not None
    )
    stamps = sorted(str(e.get("timestamp")) for e in events if e.get("timestamp"))
    return Counts(
        total=len(events),
        by_event=dict(by_event.most_common()),
        by_reason=dict(by_reason.most_common()),
        first=stamps[0] if stamps else None,
        last=stamps[-1] if stamps else None,
    )


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else repr(value)
    return orjson.dumps(value).decode()


def story_lines(events: Sequence[Event]) -> list[str]:
    """Return one line per event for people: time, event, then the identifying fields."""
    lines = []
    width = max((len(e.name) for e in events), default=0)
    for event in events:
        fields = " ".join(
            f"{name}={_value(event.get(name))}" for name in STORY_FIELDS if event.get(name) not in (None, "")
        )
        if event.name == "batch.sent" and event.get("message_keys"):
            fields += f" message_keys={len(event.get('message_keys'))}"
        lines.append(f"{event.get('timestamp') or '-':<27}  {event.name:<{width}}  {fields}".rstrip())
    return lines


def count_lines(counts: Counts) -> list[str]:
    """Return a people's table of counts: by event, then by reason."""
    lines = [f"{counts.total} events" + (f" from {counts.first} to {counts.last}" if counts.first else "")]
    if counts.by_event:
        width = max(len(name) for name in counts.by_event)
        lines.append("")
        lines.append(f"{'event':<{width}}  count")
        lines += [f"{name:<{width}}  {n:>5}" for name, n in counts.by_event.items()]
    if counts.by_reason:
        width = max(len(name) for name in counts.by_reason)
        lines.append("")
        lines.append(f"{'reason':<{width}}  count")
        lines += [f"{name:<{width}}  {n:>5}" for name, n in counts.by_reason.items()]
    return lines


def events_json(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [{**e.fields, "_origin": f"{e.origin}:{e.line}"} for e in events]
