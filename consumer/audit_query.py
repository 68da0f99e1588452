"""``ctsync audit``: answer questions from audit logs (JSON lines): the story of a resource, a message key
or a hook request, and counts by event and by reason over a time range.

The functions over event lists are pure; ``stream_counts`` and ``stream_story`` read the logs themselves, a
line at a time, so memory stays bounded whatever the log's size: counts in one pass; a story in up to three
passes over the files (the first finds the message keys, the second the hook requests carrying them, the
third collects the events), holding only the story's own keys, request ids and events. A line is parsed
only when it contains one of the values searched for (the exact JSON text of the value), which keeps the
passes at about the speed of reading the file.

A story follows the links the log records: a resource's events carry its ``message_key``; ``batch.sent``
carries the ``message_keys`` (and notifications) of the hook request, identified by ``correlation_id``; a
retry or a refusal of that request carries the same ``correlation_id``.

Logs of every ctsync version are read alike: ``notifications`` as a list of ``{scope, external_id}`` (older)
or as ``{scope: [external id, ...]}``; a message's place as ``position`` or as its source's own fields
(Kafka ``topic``/``partition``/``offset``, a Pub/Sub ``message_id``, a file's ``file``/``line``).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final

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
    if isinstance(notifications, dict):
        return any(isinstance(ids, list) and external_id in ids for ids in notifications.values())
    return isinstance(notifications, list) and any(
        isinstance(n, dict) and n.get("external_id") == external_id for n in notifications
    )


def position(event: Event) -> str | None:
    """Where the event's message was read: its ``position``, or one made of its source's own fields."""
    found = event.get("position")
    if found is not None:
        return str(found)
    if event.get("topic") is not None and event.get("offset") is not None:
        return f"{event.get('topic')}/{event.get('partition')}/{event.get('offset')}"
    if event.get("message_id") is not None:
        return str(event.get("message_id"))
    if event.get("file") is not None and event.get("line") is not None:
        return f"{event.get('file')}:{event.get('line')}"
    return None


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
        shown = ((name, position(event) if name == "position" else event.get(name)) for name in STORY_FIELDS)
        fields = " ".join(f"{name}={_value(value)}" for name, value in shown if value not in (None, ""))
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


# --- streaming over files: bounded memory whatever the log size ---------------------------------------

STDIN: Final = Path("-")
# Read in big chunks: a line iterator over a buffered file is the fast path; progress is redrawn at most
# this often.
_PROGRESS_SECONDS: Final = 0.25


class Progress:
    """Bytes read out of the total, redrawn in place on a terminal's stderr (never into a pipe or a file)."""

    def __init__(self, total_bytes: int | None, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.label = ""
        self._drawn_at = 0.0

    def advance(self, size: int) -> None:
        self.done_bytes += size
        now = time.monotonic()
        if self.enabled and now - self._drawn_at >= _PROGRESS_SECONDS:
            self._drawn_at = now
            self._draw()

    def _draw(self) -> None:
        read = f"{self.done_bytes / 2**20:,.0f} MiB"
        if self.total_bytes:
            read += (
                f" of {self.total_bytes / 2**20:,.0f} MiB ({100 * self.done_bytes / self.total_bytes:.0f}%)"
            )
        self.stream.write(f"\r\x1b[Kctsync audit: {self.label}{read}")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self._drawn_at:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


@dataclass
class LogFiles:
    """The logs to read, each re-readable (stdin is spooled to a temporary file when read more than once)."""

    paths: list[Path]
    origins: list[str]
    total_bytes: int | None

    def lines(self, progress: Progress) -> Iterator[tuple[str, int, bytes]]:
        """Yield (origin, line number, raw line) for every line of every file, counting progress."""
        for path, origin in zip(self.paths, self.origins, strict=True):
            with ExitStack() as stack:
                file: IO[bytes] = (
                    sys.stdin.buffer
                    if path == STDIN
                    else stack.enter_context(path.open("rb", buffering=2**20))
                )
                for number, raw in enumerate(file, start=1):
                    progress.advance(len(raw))
                    yield origin, number, raw


def open_logs(paths: Sequence[Path], passes: int, stack: ExitStack) -> LogFiles:
    """Return the logs to read ``passes`` times; stdin is copied to a temporary file when ``passes`` > 1.
    Raise OSError for a file that cannot be read."""
    chosen = list(paths) or [STDIN]
    readable: list[Path] = []
    origins: list[str] = []
    total: int | None = 0
    for path in chosen:
        if path == STDIN:
            origins.append("<stdin>")
            if passes > 1:
                spool = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ctsync-audit-")))
                path = spool / "stdin.jsonl"
                with path.open("wb") as copy:
                    shutil.copyfileobj(sys.stdin.buffer, copy, 2**20)
        else:
            origins.append(str(path))
        if path == STDIN:
            total = None
        else:
            with path.open("rb"):
                pass  # unreadable or missing: fail now, before any pass
            if total is not None:
                total += path.stat().st_size
        readable.append(path)
    return LogFiles(readable, origins, total)


def _event(origin: str, number: int, raw: bytes) -> Event | None:
    text = raw.strip()
    if not text:
        return None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "event" not in data:
        return None
    return Event(origin, number, data)


def _in_range(event: Event, since: datetime | None, until: datetime | None) -> bool:
    if since is None and until is None:
        return True
    when = event.timestamp
    return not (when is None or (since is not None and when < since) or (until is not None and when >= until))


def stream_counts(
    logs: LogFiles, since: datetime | None, until: datetime | None, progress: Progress
) -> tuple[Counts, int]:
    """Count events as ``count`` does, in one pass; return the counts and how many lines were skipped."""
    by_event: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    total = skipped = 0
    first: str | None = None
    last: str | None = None
    progress.label = ""
    for origin, number, raw in logs.lines(progress):
        event = _event(origin, number, raw)
        if event is None:
            skipped += 1 if raw.strip() else 0
            continue
        if not _in_range(event, since, until):
            continue
        total += 1
        by_event[event.name] += 1
        if event.get("reason") is not None:
            by_reason[f"{event.name}: {reason_group(str(event.get('reason')))}"] += 1
        stamp = event.get("timestamp")
        if stamp:
            stamp = str(stamp)
            first = stamp if first is None or stamp < first else first
            last = stamp if last is None or stamp > last else last
    progress.clear()
    counts = Counts(
        total=total,
        by_event=dict(by_event.most_common()),
        by_reason=dict(by_reason.most_common()),
        first=first,
        last=last,
    )
    return counts, skipped


def _needle(value: str) -> bytes | None:
    """The bytes a line must contain to hold ``value`` as a JSON string, or None when its encoding could
    vary between writers (escapes), in which case every line is parsed."""
    if value.isascii() and value.isprintable() and not any(c in value for c in '"\\/'):
        return b'"' + value.encode() + b'"'
    return None


class _Matcher:
    """Parse only the lines that may hold one of the values sought (a plain substring test first)."""

    def __init__(self) -> None:
        self.needles: set[bytes] = set()
        self.parse_all = False

    def add(self, value: str) -> None:
        needle = _needle(value)
        if needle is None:
            self.parse_all = True
        else:
            self.needles.add(needle)

    def events(
        self, logs: LogFiles, since: datetime | None, until: datetime | None, progress: Progress
    ) -> Iterator[Event]:
        needles = sorted(self.needles)
        for origin, number, raw in logs.lines(progress):
            if not self.parse_all and not any(needle in raw for needle in needles):
                continue
            event = _event(origin, number, raw)
            if event is not None and _in_range(event, since, until):
                yield event


def stream_story(
    logs: LogFiles,
    *,
    resource_id: str | None = None,
    message_key: str | None = None,
    correlation_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress,
) -> list[Event]:
    """Return the same story as ``story_of_resource`` / ``story_of_message_key`` /
    ``story_of_correlation_id`` over all the logs' events, reading them a line at a time."""
    keys: set[str] = set()
    correlation_ids: set[str] = set()
    passes = 3 if resource_id is not None or correlation_id is not None else 2
    step = 1

    def begin(matcher: _Matcher) -> Iterator[Event]:
        nonlocal step
        progress.label = f"pass {step}/{passes}: "
        step += 1
        return matcher.events(logs, since, until, progress)

    def own(event: Event) -> bool:
        """An event of the resource itself (its messages, or a notification naming it)."""
        return resource_id is not None and (
            event.get("resource_id") == resource_id or _names_external_id(event, resource_id)
        )

    # Pass 1: the seed's message keys (a resource's own events; a request's keys).
    if resource_id is not None:
        seed = _Matcher()
        seed.add(resource_id)
        for event in begin(seed):
            if own(event):
                if event.get("correlation_id"):
                    correlation_ids.add(str(event.get("correlation_id")))
                if event.name != "batch.sent":  # a batch's other keys belong to other resources
                    keys |= _keys(event)
    elif correlation_id is not None:
        correlation_ids.add(correlation_id)
        seed = _Matcher()
        seed.add(correlation_id)
        for event in begin(seed):
            if event.get("correlation_id") == correlation_id:
                keys |= _keys(event)
    else:
        assert message_key is not None
        keys.add(message_key)
    # Pass 2: the hook requests that carried those keys.
    carriers = _Matcher()
    for key in keys:
        carriers.add(key)
    if keys:
        for event in begin(carriers):
            if event.get("correlation_id") and _keys(event) & keys:
                correlation_ids.add(str(event.get("correlation_id")))
    # Pass 3: every event of the story, in the logs' order.
    wanted = _Matcher()
    for value in (*keys, *correlation_ids, *([resource_id] if resource_id is not None else [])):
        wanted.add(value)
    story = [
        event
        for event in begin(wanted)
        if own(event)
        or _keys(event) & keys
        or (event.get("correlation_id") and str(event.get("correlation_id")) in correlation_ids)
    ]
    progress.clear()
    return story
