from datetime import UTC, datetime
from pathlib import Path

import orjson

from adapters.files import FileDeadLetterSink, JsonlFileSource
from consumer.ports import DeadLetter


async def read_all(source: JsonlFileSource, chunk: int = 2) -> list[tuple[bytes, str]]:
    seen: list[tuple[bytes, str]] = []
    while True:
        fetched = await source.fetch(chunk)
        seen += [(e.body, e.position) for e in fetched.envelopes]
        if fetched.exhausted:
            return seen


async def test_file_source_lines_positions_and_end(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a":1}\n\n{"b":2}\n  {"c":3}  \n{"d":4}')
    source = JsonlFileSource(path)
    first = await source.fetch(2)
    assert first.more_ready and not first.exhausted
    rest = await read_all(source, 10)
    await source.close()
    assert [p for _, p in rest] == [f"{path}:4", f"{path}:5"]
    assert rest[0][0] == b'{"c":3}'


async def test_dead_letters_round_trip_through_the_file_source(tmp_path: Path) -> None:
    sink = FileDeadLetterSink(tmp_path / "dlq" / "dead.jsonl")
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    await sink.write(
        [
            DeadLetter("not valid JSON", b"{oops", "kafka", "t/0@5", now, None, {"offset": 5}),
            DeadLetter("not UTF-8", b"\xff\xfe", "file", "x:1", now),
        ]
    )
    lines = (tmp_path / "dlq" / "dead.jsonl").read_bytes().splitlines()
    records = [orjson.loads(line) for line in lines]
    assert records[0]["reason"] == "not valid JSON" and records[0]["payload"] == "{oops"
    assert records[0]["source_fields"] == {"offset": 5} and records[0]["time"].startswith(
        "2026-01-02T03:04:05"
    )
    assert records[1]["payload_encoding"] == "base64"
    replayed = await read_all(JsonlFileSource(tmp_path / "dlq" / "dead.jsonl"))
    assert [body for body, _ in replayed] == [b"{oops", b"\xff\xfe"]


async def test_follow_reads_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":')
    source = JsonlFileSource(path, follow=True, poll_seconds=0.01)
    first = await source.fetch(10)
    assert [e.body for e in first.envelopes] == [b'{"a":1}'] and not first.exhausted
    with path.open("ab") as f:
        f.write(b"2}\n")
    bodies: list[bytes] = []
    for _ in range(50):
        fetched = await source.fetch(10)
        bodies += [e.body for e in fetched.envelopes]
        if bodies:
            break
    await source.close()
    assert bodies == [b'{"b":2}']
