import asyncio
import io

import orjson
import structlog

from consumer import audit


def lines(stream: io.BytesIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_timestamp_level_event_and_redaction() -> None:
    stream = io.BytesIO()
    audit.configure(level="INFO", secrets=["s3cr3t-value", "abc"], stream=stream)
    log = structlog.get_logger("test")
    log.info(audit.BATCH_SENT, correlation_id="c-1", status=200)
    log.info(
        audit.SINK_UNUSABLE,
        detail="server said: token s3cr3t-value is wrong",
        headers={"Authorization": "Bearer xyz", "x-correlation-id": "c-2"},
        error="Bearer abc.def-ghi rejected",
        client_secret="whatever",
        api_key=None,
        nested=[{"password": "p"}],
    )
    log.debug("not.shown")
    first, second = lines(stream)
    assert first["event"] == "batch.sent" and first["level"] == "info"
    assert str(first["timestamp"]).endswith("Z") and "T" in str(first["timestamp"])
    text = orjson.dumps(second).decode()
    assert "s3cr3t-value" not in text and "xyz" not in text and "abc.def-ghi" not in text
    assert second["client_secret"] == audit.REDACTED
    assert second["headers"] == {"Authorization": audit.REDACTED, "x-correlation-id": "c-2"}
    assert second["nested"] == [{"password": audit.REDACTED}]
    assert second["api_key"] is None
    # Too short to scrub by value without mangling text; field names still cover it.
    assert second["detail"] == f"server said: token {audit.REDACTED} is wrong"


def test_level_filters() -> None:
    stream = io.BytesIO()
    audit.configure(level="WARNING", stream=stream)
    log = structlog.get_logger("test")
    log.info(audit.MESSAGE_ACKED)
    log.warning(audit.MESSAGE_INVALID, reason="x")
    assert [e["event"] for e in lines(stream)] == ["message.invalid"]


def test_secret_with_json_escapes_is_scrubbed() -> None:
    stream = io.BytesIO()
    secret = 'pa"ss\\word-9'
    audit.configure(level="INFO", secrets=[secret], stream=stream)
    structlog.get_logger("test").error(audit.SINK_UNUSABLE, detail=f"bad {secret} here")
    raw = stream.getvalue()
    assert secret.encode() not in raw and orjson.dumps(secret)[1:-1] not in raw
    assert lines(stream)[0]["detail"] == f"bad {audit.REDACTED} here"


def test_timestamps_are_iso_8601_utc_with_microseconds() -> None:
    import time
    from datetime import UTC, datetime, timedelta

    from consumer.audit import iso_timestamp

    now = time.time_ns()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    expected = (epoch + timedelta(microseconds=now // 1000)).isoformat(timespec="microseconds")
    assert iso_timestamp(now) == expected.replace("+00:00", "Z")
    assert iso_timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert iso_timestamp(1_999_999_999) == "1970-01-01T00:00:01.999999Z"


def test_hot_path_info_lines_are_structlog_lines_in_order_and_redacted() -> None:
    stream = io.BytesIO()
    audit.configure(level="INFO", secrets=["s3cr3t-value"], stream=stream)
    write = audit.info_writer()
    assert write is not None
    log = structlog.get_logger("test")
    log.info(audit.MESSAGE_ACKED, message_key="k1", position="p:1", topic="t")
    write(audit.MESSAGE_ACKED, {"message_key": "k2", "position": "p:2", "topic": "t"})
    log.warning(audit.MESSAGE_INVALID, reason="x")
    write(
        audit.BATCH_SENT,
        {"detail": "token s3cr3t-value", "token": "abc", "notifications": [{"password": "p"}]},
    )
    first, second, third, fourth = lines(stream)
    assert [e["event"] for e in (first, second, third, fourth)] == [
        "message.acked",
        "message.acked",
        "message.invalid",
        "batch.sent",
    ]
    assert list(first) == list(second) and second["level"] == "info" and second["message_key"] == "k2"
    assert str(second["timestamp"]).endswith("Z")
    assert fourth["detail"] == f"token {audit.REDACTED}" and fourth["token"] == audit.REDACTED
    assert fourth["notifications"] == [{"password": audit.REDACTED}]


def test_hot_path_info_lines_are_flushed_once_per_loop_turn() -> None:
    class CountingStream(io.BytesIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    stream = CountingStream()
    audit.configure(level="INFO", stream=stream)
    write = audit.info_writer()
    assert write is not None

    async def burst() -> None:
        before = stream.flushes
        for i in range(100):
            write(audit.MESSAGE_ACKED, {"message_key": f"k{i}"})
        assert stream.flushes == before
        await asyncio.sleep(0)
        assert stream.flushes == before + 1

    asyncio.run(burst())
    asyncio.run(burst())  # a new loop gets its own flush
    write(audit.MESSAGE_ACKED, {"message_key": "outside a loop"})  # flushed at once
    assert stream.flushes == 3 and len(lines(stream)) == 201


def test_no_hot_path_writer_when_info_is_filtered_or_lines_are_text() -> None:
    audit.configure(level="WARNING", stream=io.BytesIO())
    assert audit.info_writer() is None
    audit.configure(level="INFO", log_format="console")
    assert audit.info_writer() is None
    audit.configure(level="INFO", stream=io.BytesIO())
    assert audit.info_writer() is not None
