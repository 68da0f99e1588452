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
    assert first["event"] == "batch.sent" and first["severity"] == "INFO"
    assert first["message"] == "batch.sent" and list(first)[:5] == [
        "timestamp",
        "severity",
        "level",
        "event",
        "message",
    ]
    assert second["severity"] == "INFO" and second["level"] == "info"
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
    audit.configure(level="WARNING", stream=stream, audit=False)
    log = structlog.get_logger("test")
    log.info(audit.MESSAGE_ACKED)
    log.warning(audit.MESSAGE_INVALID, reason="x")
    assert [e["event"] for e in lines(stream)] == ["message.invalid"]


def test_the_audit_trail_survives_a_warning_level_and_has_its_own_switch() -> None:
    stream = io.BytesIO()
    audit.configure(level="WARNING", stream=stream)  # the audit switch is on by default
    log = structlog.get_logger("test")
    log.info(audit.MESSAGE_HANDED_BACK, message_key="k0")
    log.info("kafka.paused", unsettled=3)  # chatter: filtered by the level
    write = audit.info_writer()
    assert write is not None and audit.info_enabled()
    write(audit.MESSAGE_ACKED, {"message_key": "k1"})
    log.warning(audit.CONFIG_WARNING, reason="typo")
    assert [e["event"] for e in lines(stream)] == [
        "message.handed_back",
        "message.acked",
        "config.warning",
    ]
    # Off: no audit event below WARNING, whatever the level; the warnings follow the level.
    for level in ("DEBUG", "INFO", "WARNING"):
        stream = io.BytesIO()
        audit.configure(level=level, stream=stream, audit=False)
        assert audit.info_writer() is None and not audit.info_enabled()
        log = structlog.get_logger("test")
        log.info(audit.MESSAGE_RECEIVED, message_key="k")
        log.info("kafka.paused")
        log.warning(audit.MESSAGE_DEAD_LETTERED, reason="poison")
        expected = (
            ["kafka.paused", "message.dead_lettered"] if level != "WARNING" else ["message.dead_lettered"]
        )
        assert [e["event"] for e in lines(stream)] == expected
    audit.configure(level="INFO", stream=io.BytesIO())


def test_every_line_has_a_cloud_logging_severity_and_a_message() -> None:
    stream = io.BytesIO()
    audit.configure(level="DEBUG", stream=stream)
    log = structlog.get_logger("test")
    log.debug("kafka.fetch", records=3)
    log.info(audit.SERVICE_STARTED)
    log.warning(audit.MESSAGE_INVALID, reason="not valid JSON: line 1")
    log.error(audit.SINK_UNUSABLE, status=401, detail="key refused")
    log.critical("service.crashed", error="boom")
    log.warning(audit.BATCH_RETRYING, status=503)
    write = audit.info_writer()
    assert write is not None
    write(audit.MESSAGE_RECEIVED, {"message_key": "k"})
    write(audit.MESSAGE_ACKED, {})
    found = [(e["severity"], e["message"]) for e in lines(stream)]
    assert found == [
        ("DEBUG", "kafka.fetch"),
        ("INFO", "service.started"),
        ("WARNING", "message.invalid: not valid JSON: line 1"),
        ("ERROR", "sink.unusable: key refused"),
        ("CRITICAL", "service.crashed: boom"),
        ("WARNING", "batch.retrying"),
        ("INFO", "message.received"),
        ("INFO", "message.acked"),
    ]


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
    # The hot path's field names are ctsync's own; a secret in any value is still scrubbed.
    write(
        audit.BATCH_SENT,
        {
            "detail": "token s3cr3t-value",
            "message_keys": ['k"s3cr3t-value'],
            "notifications": {"product/updated": ["s3cr3t-value", "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln"]},
        },
    )
    first, second, third, fourth = lines(stream)
    assert [e["event"] for e in (first, second, third, fourth)] == [
        "message.acked",
        "message.acked",
        "message.invalid",
        "batch.sent",
    ]
    assert first == {**second, "timestamp": first["timestamp"], "message_key": "k1", "position": "p:1"}
    assert list(first) == list(second) and second["severity"] == "INFO" and second["message_key"] == "k2"
    assert str(second["timestamp"]).endswith("Z")
    assert fourth["detail"] == f"token {audit.REDACTED}"
    assert fourth["message_keys"] == [f'k"{audit.REDACTED}']
    assert fourth["notifications"] == {"product/updated": [audit.REDACTED, f"Bearer {audit.REDACTED}"]}
    assert b"s3cr3t-value" not in stream.getvalue()


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


def test_no_hot_path_writer_when_audit_is_off_or_lines_are_text() -> None:
    audit.configure(level="INFO", stream=io.BytesIO(), audit=False)
    assert audit.info_writer() is None
    audit.configure(level="WARNING", stream=io.BytesIO())
    assert audit.info_writer() is not None
    audit.configure(level="INFO", log_format="console")
    assert audit.info_writer() is None
    audit.configure(level="INFO", stream=io.BytesIO())
    assert audit.info_writer() is not None
