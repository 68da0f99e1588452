"""JSONL files: a source of payloads (``ctsync replay``, ``CTSYNC_SOURCE=file:...``) and a dead-letter sink.

A dead-letter record is one JSON object per line (``consumer.dead_letters`` defines it). The file source
reads such records back as their original payloads, so a dead-letter file can be replayed as it is after a
fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from consumer import audit, dead_letters
from consumer.ports import DeadLetter, Envelope, Fetched


class JsonlFileSource:
    """Read payloads from a JSONL file, one envelope per non-blank line; the position is ``path:line``.

    Acks and nacks are no-ops: a file has no broker to tell, and re-reading it is safe because delivered
    keys are remembered. A broken dead-letter record is not passed on: it is logged with its line number
    and kept in ``malformed`` (``(line, reason)``), so a replay can report it.

    With ``follow``, lines appended later are read too, and a file truncated or replaced (rotated) is read
    again from its start (like ``tail -F``), with a ``file.truncated`` / ``file.rotated`` event. With
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
        self.malformed: list[tuple[int, str]] = []
        self.log = audit.get_logger("ctsync.files").bind()

    def open(self) -> None:
        """Open the file now, so a missing file is reported at start."""
        if self._file is None:
            self._file = self.path.open("rb")
            if self.snapshot:
                self._end = os.fstat(self._file.fileno()).st_size

    def _reopen_if_replaced(self) -> bool:
        """At the end of a followed file, notice that it was truncated or replaced (rotated) and go on from
        the start of what is there now, like ``tail -F``; return whether it did."""
        assert self._file is not None
        read_to = self._file.tell()
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False  # moved away, and the new file is not there yet
        current = os.fstat(self._file.fileno())
        if (named.st_dev, named.st_ino) != (current.st_dev, current.st_ino):
            if current.st_size > read_to:
                return False  # lines written to the old file before it was moved: read them first
            self._file.close()
            self._file = self.path.open("rb")
            event = "file.rotated"
        elif current.st_size < read_to:
            self._file.seek(0)
            event = "file.truncated"
        else:
            return False
        self.log.warning(
            event,
            file=str(self.path),
            lines_read=self._line,
            read_bytes=read_to,
            size_now=named.st_size,
            fragment_dropped=len(self._partial),
        )
        self._line = 0
        self._partial = b""
        return True

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
                if self.follow and self._reopen_if_replaced():
                    continue
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
            try:
                body, origin = dead_letters.read_file_line(line)
            except dead_letters.MalformedDeadLetter as exc:
                self.malformed.append((self._line, str(exc)))
                self.log.error("dead_letter.malformed", file=str(self.path), line=self._line, reason=str(exc))
                continue
            fields: dict[str, object] = {"file": str(self.path), "line": self._line}
            if origin is not None:
                fields.update(dead_letters.replay_fields(origin))
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
    """Append dead-letter records to a JSONL file; each write is fsynced before it returns.

    A write that fails (disk full, quota) is cut back to where it started, so the file never keeps a
    fragment that the retry would then continue on the same line. A fragment left by a process killed
    mid-write is closed with a newline first, so it stays a line of its own that a replay reports.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _append(self, lines: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A bare descriptor: no buffer is left for a close to write after the file was cut back.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            if start and os.pread(fd, 1, start - 1) != b"\n":
                lines = b"\n" + lines
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                raise
        finally:
            os.close(fd)

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        lines = b"".join(dead_letters.file_line(letter) for letter in letters)
        await asyncio.to_thread(self._append, lines)

    async def close(self) -> None:
        return None
