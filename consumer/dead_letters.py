"""The dead-letter record, one contract: what each sink writes and what each replay reads back.

The wire formats are fixed, so that dead letters written by any earlier version still replay:

- a file holds one JSON object per line, ``{"type": "ctsync.dead_letter", "time": ..., "reason": ...,
  "source": ..., "position": ..., "message_key": ..., "source_fields": {...}, "payload": ...,
  "payload_encoding": "utf-8" | "base64"}``; the payload is the original text, base64 when not UTF-8;
- a Kafka record keeps the original value and key, with ``ctsync-reason``, ``ctsync-time``,
  ``ctsync-source``, ``ctsync-position``, ``ctsync-message-key`` and
  ``ctsync-source-{topic,partition,offset}`` headers;
- a Pub/Sub message keeps the original data, with ``ctsync_type``, ``reason``, ``source``, ``position``,
  ``dead_lettered_at``, ``message_key``, ``source_key`` (or ``source_key_base64``) and ``source_<field>``
  attributes, each value cut to Pub/Sub's 1024-byte limit.

A replay reads back what it needs to filter and report (``DeadLetterOrigin``) and hands it on as the
envelope's ``source_fields`` (``replay_fields``). Pure functions: the adapters do the I/O.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from consumer.ports import DeadLetter

DEAD_LETTER_TYPE: Final = "ctsync.dead_letter"
# Every record a file sink writes starts so (orjson keeps the key order); any other line is a raw payload.
FILE_RECORD_PREFIX: Final = b'{"type":"' + DEAD_LETTER_TYPE.encode() + b'"'
ATTRIBUTE_VALUE_MAX_BYTES: Final = 1024
ATTRIBUTE_NAME_MAX_BYTES: Final = 256


@dataclass(frozen=True, slots=True)
class DeadLetterOrigin:
    """What a replay reads back of a dead letter besides its payload: why and when it was dead-lettered,
    and where the original came from (each None when the record does not say)."""

    reason: str | None = None
    time: str | None = None
    position: str | None = None


def replay_fields(origin: DeadLetterOrigin) -> dict[str, object]:
    """The ``source_fields`` a replayed envelope carries (what ``dead-letters replay`` filters on)."""
    return {
        "dead_letter_reason": origin.reason,
        "dead_letter_time": origin.time,
        "original_position": origin.position,
    }


# ------------------------------------------------------------------------------------------------ file


class MalformedDeadLetter(ValueError):
    """A line that starts as a dead-letter record but is not a whole one (a write cut short, an edit)."""


def file_record(letter: DeadLetter) -> dict[str, Any]:
    """Return the JSON record of a dead letter (original payload as text, or base64 if not UTF-8)."""
    try:
        payload, encoding = letter.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(letter.body).decode("ascii"), "base64"
    return {
        "type": DEAD_LETTER_TYPE,
        "time": letter.time.isoformat(),
        "reason": letter.reason,
        "source": letter.source,
        "position": letter.position,
        "message_key": letter.message_key,
        "source_fields": dict(letter.source_fields),
        "payload": payload,
        "payload_encoding": encoding,
    }


def file_line(letter: DeadLetter) -> bytes:
    """Return the line (newline included) a file sink appends for ``letter``."""
    return orjson.dumps(file_record(letter), default=str) + b"\n"


def read_file_line(line: bytes) -> tuple[bytes, DeadLetterOrigin | None]:
    """Return the payload a line carries: itself, or the original inside a dead-letter record, with what
    the record says of it.

    Raise MalformedDeadLetter for a broken dead-letter record: taking it as a raw payload would lose its
    reason, time and position.
    """
    if not line.startswith(FILE_RECORD_PREFIX):
        return line, None
    try:
        record = orjson.loads(line)
        payload = record["payload"]
        origin = DeadLetterOrigin(record.get("reason"), record.get("time"), record.get("position"))
        if record.get("payload_encoding") == "base64":
            return base64.b64decode(payload, validate=True), origin
        return str(payload).encode("utf-8"), origin
    except orjson.JSONDecodeError:
        raise MalformedDeadLetter("not a whole dead-letter record (a write cut short?)") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedDeadLetter(f"a dead-letter record without a readable payload ({exc!r})") from None


# ------------------------------------------------------------------------------------------------ Kafka

_KAFKA_SOURCE_FIELDS: Final = ("topic", "partition", "offset")


def kafka_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """Return the headers of a dead letter's Kafka record (its value and key are the original's)."""
    headers = [
        ("ctsync-reason", letter.reason.encode("utf-8")),
        ("ctsync-time", letter.time.isoformat().encode("ascii")),
        ("ctsync-source", letter.source.encode("utf-8")),
        ("ctsync-position", letter.position.encode("utf-8")),
    ]
    if letter.message_key is not None:
        headers.append(("ctsync-message-key", letter.message_key.encode("utf-8")))
    for field in _KAFKA_SOURCE_FIELDS:
        if field in letter.source_fields:
            headers.append((f"ctsync-source-{field}", str(letter.source_fields[field]).encode("utf-8")))
    return headers


def from_kafka_headers(headers: Iterable[tuple[str, bytes]]) -> DeadLetterOrigin:
    """Read back what a dead letter's Kafka headers say of it."""
    found = {name: value.decode("utf-8", "replace") for name, value in headers}
    return DeadLetterOrigin(
        found.get("ctsync-reason"), found.get("ctsync-time"), found.get("ctsync-position")
    )


# ---------------------------------------------------------------------------------------------- Pub/Sub


def _truncate(text: str, limit: int = ATTRIBUTE_VALUE_MAX_BYTES) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


def pubsub_attributes(letter: DeadLetter) -> dict[str, str]:
    """Return the Pub/Sub attributes of a dead letter: why, where from, and the source's own fields.

    The source's fields are prefixed ``source_`` (``source_message_id``, ``source_delivery_attempt``,
    ``source_partition``...). Values are cut to Pub/Sub's 1024-byte limit.
    """
    attributes = {
        "ctsync_type": DEAD_LETTER_TYPE,
        "reason": _truncate(letter.reason),
        "source": letter.source,
        "position": _truncate(letter.position),
        "dead_lettered_at": letter.time.isoformat(),
    }
    if letter.message_key is not None:
        attributes["message_key"] = _truncate(letter.message_key)
    if letter.key is not None:
        try:
            attributes["source_key"] = _truncate(letter.key.decode("utf-8"))
        except UnicodeDecodeError:
            attributes["source_key_base64"] = _truncate(base64.b64encode(letter.key).decode("ascii"))
    for name, value in letter.source_fields.items():
        if value is not None:
            attributes[_truncate(f"source_{name}", ATTRIBUTE_NAME_MAX_BYTES)] = _truncate(str(value))
    return attributes


def from_pubsub_attributes(attributes: Mapping[str, str]) -> DeadLetterOrigin:
    """Read back what a dead letter's Pub/Sub attributes say of it."""
    return DeadLetterOrigin(
        attributes.get("reason"), attributes.get("dead_lettered_at"), attributes.get("position")
    )
