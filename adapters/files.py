"""JSONL files: a source of payloads (``ctsync replay``, ``CTSYNC_SOURCE=file:...``) and a dead-letter sink.

A dead-letter record is one JSON object per line::

    {"type": "ctsync.dead_letter", "time": "...", "reason": "...", "source": "kafka", "position": "...",
     "message_key": "...", "source_fields": {...}, "payload": "<original text>", "payload_encoding": "utf-8"}

``payload_encoding`` is ``base64`` when the original bytes were not UTF-8. The file source reads such records
back as their original payloads, so a dead-letter file can be replayed as it is after a fix.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from consumer.ports import DeadLetter, Envelope, Fetched

DEAD_LETTER_TYPE = "ctsync.dead_letter"
_DEAD_LETTER_PREFIX = b'{"type":"' + DEAD_LETTER_TYPE.encode() + b'"'


def dead_letter_record(letter: DeadLetter) -> dict[str, Any]:
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


def original_payload(line: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """Return the payload a line carries: itself, or the original inside a dead-letter record."""
    if not line.startswith(_DEAD_LETTER_PREFIX):
        return line, None
    try:
        record = orjson.loads(line)
        payload = record["payload"]
        if record.get("payload_encoding") == "base64":
            return base64.b64decode(payload, validate=True), record
        return str(payload).encode("utf-8"), record
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return line, None


class JsonlFileSource:
    """Read payloads from a JSONL file, one envelope per non-blank line; the position is ``path:line``.

    Acks and nacks are no-ops: a file has no broker to tell, and re-reading it is safe because delivered
    keys are remembered. With ``follow``, lines appended later are read too (like ``tail -f``). With
    ``snapshot``, reading stops at the size the file had when opened: a dead-letter replay may append to the
    very file it reads, and must not read its own output for ever.
    """

    name = "file"

    def __init__(
        self, path: str | Path, *, follow: bool = False, snapshot: bool = False, poll_seconds: float = 0.5
    ) -> None:
        if follow and snapshot:
            raise ValueError("a file source cannot both follow a file and stop at its size")
        self.path = Path(path)
        self.follow = follow
        self.snapshot = snapshot
        self.poll_seconds = poll_seconds
        self._file: IO[bytes] | None = None
        self._end: int | None = None
        self._line = 0
        self._partial = b""
        self._eof = False

    def open(self) -> None:
        """Open the file now, so a missing file is reported at start."""
        if self._file is None:
            self._file = self.path.open("rb")
            if self.snapshot:
                self._end = os.fstat(self._file.fileno()).st_size

    def _read(self, max_count: int) -> list[Envelope]:
        self.open()
        assert self._file is not None
        envelopes: list[Envelope] = []
        while len(envelopes) < max_count:
            if self._end is None:
                raw = self._file.readline()
            else:
                left = self._end - self._file.tell()
                raw = self._file.readline(left) if left > 0 else b""
            if not raw:
                self._eof = True
                break
            if not raw.endswith(b"\n") and self.follow:
                # A writer is mid-line: keep the fragment and finish it on a later read.
                self._partial += raw
                self._eof = True
                break
            raw = self._partial + raw
            self._partial = b""
            self._line += 1
            line = raw.strip()
            if not line:
                continue
            body, record = original_payload(line)
            fields: dict[str, object] = {"file": str(self.path), "line": self._line}
            if record is not None:
                fields["dead_letter_reason"] = record.get("reason")
                fields["dead_letter_time"] = record.get("time")
                fields["original_position"] = record.get("position")
            envelopes.append(Envelope(body=body, position=f"{self.path}:{self._line}", source_fields=fields))
        else:
            self._eof = False
        return envelopes

    async def fetch(self, max_count: int) -> Fetched:
        self._eof = False
        envelopes = await asyncio.to_thread(self._read, max_count)
        if envelopes or not self._eof:
            return Fetched(envelopes, more_ready=not self._eof, exhausted=self._eof and not self.follow)
        if not self.follow:
            return Fetched((), exhausted=True)
        await asyncio.sleep(self.poll_seconds)
        return Fetched(())

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class FileDeadLetterSink:
    """Append dead-letter records to a JSONL file; each write is flushed and fsynced before it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _append(self, lines: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as file:
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        lines = b"".join(orjson.dumps(dead_letter_record(letter), default=str) + b"\n" for letter in letters)
        await asyncio.to_thread(self._append, lines)

    async def close(self) -> None:
        return None
