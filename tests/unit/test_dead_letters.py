"""The dead-letter record: each encoding reads back what was written, in the wire format as it was."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
import pytest

from consumer import dead_letters
from consumer.ports import DeadLetter

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def letter(body: bytes = b'{"a": 1}', **fields: object) -> DeadLetter:
    return DeadLetter(
        reason="hook rejected (400)",
        body=body,
        source="kafka",
        position="t/0/7",
        time=WHEN,
        message_key="m-1",
        source_fields={"topic": "t", "partition": 0, "offset": 7, **fields},
        key=b"k\xff",
    )


ORIGIN = dead_letters.DeadLetterOrigin("hook rejected (400)", WHEN.isoformat(), "t/0/7")


@pytest.mark.parametrize("body", [b'{"a": 1}', b"\xff\x00not utf-8"])
def test_a_file_line_reads_back_as_its_payload_and_origin(body: bytes) -> None:
    line = dead_letters.file_line(letter(body))
    assert line.endswith(b"\n") and line.startswith(dead_letters.FILE_RECORD_PREFIX)
    assert dead_letters.read_file_line(line.strip()) == (body, ORIGIN)
    record = orjson.loads(line)
    assert record["payload_encoding"] == ("utf-8" if body.startswith(b"{") else "base64")


def test_a_raw_line_is_its_own_payload_and_a_cut_record_is_malformed() -> None:
    assert dead_letters.read_file_line(b'{"a": 1}') == (b'{"a": 1}', None)
    with pytest.raises(dead_letters.MalformedDeadLetter):
        dead_letters.read_file_line(dead_letters.file_line(letter())[:40])


def test_kafka_headers_read_back() -> None:
    headers = dead_letters.kafka_headers(letter())
    assert dict(headers)["ctsync-source-offset"] == b"7"
    assert dead_letters.from_kafka_headers(headers) == ORIGIN


def test_pubsub_attributes_read_back_and_stay_within_the_limit() -> None:
    attributes = dead_letters.pubsub_attributes(letter(note="x" * 5000))
    assert attributes["ctsync_type"] == dead_letters.DEAD_LETTER_TYPE
    assert attributes["source_key_base64"] == base64.b64encode(b"k\xff").decode()
    assert len(attributes["source_note"].encode()) <= dead_letters.ATTRIBUTE_VALUE_MAX_BYTES
    assert dead_letters.from_pubsub_attributes(attributes) == ORIGIN
    assert dead_letters.replay_fields(ORIGIN) == {
        "dead_letter_reason": "hook rejected (400)",
        "dead_letter_time": WHEN.isoformat(),
        "original_position": "t/0/7",
    }
