"""``BackfillSource``: a Source that sweeps the commercetools API and yields synthetic change notifications.

Each requested type is read in pages of up to 500, sorted by id, with ``where id > "<cursor>"`` (never
offsets) and ``withTotal=false``; one page is read ahead while the pipeline works through the current one.
Every resource becomes one envelope whose ack advances the type's cursor (``consumer.sweep.CursorTracker``);
cursors are saved to a ``CursorStore`` every ``save_every`` seconds and when the source closes, so a
restarted sweep continues where the last one stopped. A type whose cursor says complete is not read again
(unless the sweep is restarted on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from consumer import audit
from consumer import sweep as bf
from consumer.ports import CursorStore, Envelope, Fetched

# (resource path, where, limit) -> pages of resources sorted by id: ``CommercetoolsClient.query_pages``.
PageReader = Callable[[str, str | None, int], AsyncIterator[list[dict[str, Any]]]]


class BackfillSource:
    """Sweep ``types`` through ``read_pages``; yield one envelope per resource (see the module docstring)."""

    name = bf.SOURCE_NAME

    def __init__(
        self,
        read_pages: PageReader,
        types: Sequence[str],
        *,
        project_key: str,
        mode: bf.Mode,
        cursors: CursorStore,
        key: str,
        since: datetime | None = None,
        until: datetime | None = None,
        restart: bool = False,
        save: bool = True,
        save_every: float = 1.0,
        page_size: int = bf.PAGE_SIZE,
        log: Any = None,
    ) -> None:
        for type_id in types:
            bf.resource_path(type_id)
        self.read_pages = read_pages
        self.types = list(types)
        self.project_key = project_key
        self.mode = mode
        self.cursors = cursors
        self.key = key
        self.since = since
        self.until = until
        self.restart = restart
        self.save = save
        self.save_every = save_every
        self.page_size = page_size
        self.log = log if log is not None else audit.get_logger().bind()
        self.counts = bf.SweepCounts()
        self.per_type: dict[str, int] = {}
        self.trackers: dict[str, bf.CursorTracker] = {}
        self.resumed: dict[str, str] = {}
        self.already_complete: list[str] = []
        self.current_type: str | None = None
        self._todo: deque[str] = deque()
        self._pages: AsyncIterator[list[dict[str, Any]]] | None = None
        self._page_number = 0
        self._buffer: deque[Envelope] = deque()
        self._reading: asyncio.Task[None] | None = None
        self._read_all = False
        self._saver: asyncio.Task[None] | None = None
        self._closed = False

    async def open(self) -> None:
        """Load (or, restarting, forget) each type's cursor and start the periodic cursor saver."""
        for type_id in self.types:
            name = bf.cursor_name(self.key, type_id)
            value = None
            if self.restart:
                if self.save:
                    await self.cursors.delete(name)
            else:
                value = await self.cursors.get(name)
            if value == bf.COMPLETE:
                self.already_complete.append(type_id)
                self.counts.types_done += 1
                continue
            if value is not None:
                self.resumed[type_id] = value
            self.trackers[type_id] = bf.CursorTracker(value)
            self.per_type[type_id] = 0
            self._todo.append(type_id)
        self._read_all = not self._todo
        self.log.info(
            audit.BACKFILL_STARTED,
            run_key=self.key,
            types=self.types,
            mode=self.mode.value,
            resumed=self.resumed or None,
            already_complete=self.already_complete or None,
        )
        if self.save:
            self._saver = asyncio.ensure_future(self._save_periodically())

    # ------------------------------------------------------------------------------------------- reading

    async def fetch(self, max_count: int) -> Fetched:
        """Return up to ``max_count`` envelopes, reading pages as needed and keeping one page read ahead."""
        while len(self._buffer) < max_count and not self._read_all:
            reading = self._read_ahead()
            if self._buffer and not reading.done():
                break
            self._reading = None
            await reading
        if not self._read_all and len(self._buffer) <= self.page_size:
            self._read_ahead()
        taken = [self._buffer.popleft() for _ in range(min(max_count, len(self._buffer)))]
        exhausted = self._read_all and not self._buffer
        return Fetched(taken, more_ready=not exhausted, exhausted=exhausted)

    def _read_ahead(self) -> asyncio.Task[None]:
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read_page())
        return self._reading

    async def _read_page(self) -> None:
        """Read the next page of the current type into the buffer; move on to the next type at its end."""
        while self._todo:
            type_id = self._todo[0]
            if self._pages is None:
                self.current_type = type_id
                where = bf.where_clause(after=self.resumed.get(type_id), since=self.since, until=self.until)
                self._pages = self.read_pages(bf.resource_path(type_id), where, self.page_size)
                self._page_number = 0
            try:
                page = await anext(self._pages)
            except StopAsyncIteration:
                self._pages = None
                self._todo.popleft()
                self.trackers[type_id].read_all()
                self.log.info(audit.BACKFILL_TYPE_DONE, type=type_id, resources=self.per_type[type_id])
                continue
            self._take(type_id, page)
            return
        self._read_all = True

    def _take(self, type_id: str, page: list[dict[str, Any]]) -> None:
        tracker = self.trackers[type_id]
        self._page_number += 1
        self.counts.pages += 1
        taken = 0
        for resource in page:
            body = bf.change_notification(type_id, resource, self.project_key, self.mode)
            if body is None:
                self.counts.skipped += 1
                continue
            resource_id = body["resource"]["id"]
            sequence = tracker.received(resource_id)
            self._buffer.append(
                Envelope(
                    body=bf.notification_bytes(body),
                    position=bf.position(type_id, resource_id),
                    ack=partial(tracker.acked, sequence),
                )
            )
            taken += 1
        self.counts.resources += taken
        self.per_type[type_id] += taken
        self.log.info(
            audit.BACKFILL_PAGE,
            type=type_id,
            page=self._page_number,
            size=len(page),
            last_id=page[-1].get("id") if page else None,
        )

    # ------------------------------------------------------------------------------------------ cursors

    @property
    def types_done(self) -> int:
        return len(self.already_complete) + sum(1 for t in self.trackers.values() if t.complete)

    async def save_cursors(self) -> None:
        """Save every cursor that moved since it was last saved."""
        if not self.save:
            return
        for type_id, tracker in self.trackers.items():
            value = tracker.unsaved()
            if value is None:
                continue
            await self.cursors.put(bf.cursor_name(self.key, type_id), value)
            tracker.saved(value)
            self.log.info(audit.BACKFILL_CURSOR_SAVED, type=type_id, cursor=value)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.save_every)
            self.counts.types_done = self.types_done
            try:
                await self.save_cursors()
            except Exception as exc:
                # The next save, or the one at close, tries again; meanwhile a restart re-reads a little more.
                self.log.warning(
                    audit.STATE_RETRYING, operation="cursor save", error=f"{type(exc).__name__}: {exc}"
                )

    async def close(self) -> None:
        """Stop reading and saving, then save the cursors one last time."""
        if self._closed:
            return
        self._closed = True
        for task in (self._reading, self._saver):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._pages is not None:
            aclose = getattr(self._pages, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        self.counts.types_done = self.types_done
        await self.save_cursors()
        self.log.info(
            audit.BACKFILL_FINISHED,
            run_key=self.key,
            pages=self.counts.pages,
            resources=self.counts.resources,
            complete=[t for t, tr in self.trackers.items() if tr.complete] + self.already_complete,
            cursors={t: tr.value for t, tr in self.trackers.items()},
        )
