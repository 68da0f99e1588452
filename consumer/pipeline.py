"""The life of a message: source -> parse -> filter -> dedupe -> route -> outbox -> sink -> ack / dead-letter.

``Pipeline.run`` owns three kinds of task in one TaskGroup: the intake (reads the source, settles what needs
no notification, fills the outbox), the dispatcher (decides when a batch leaves) and one delivery task per
batch (throttle, request, retry, split, then settle). Shutdown order is decided in ``run`` alone: stop
intake -> flush the outbox -> wait for deliveries up to the drain deadline -> hand back the rest.

Nothing is acked before its notification was accepted or it was dead-lettered with a reason.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from consumer import audit
from consumer.dedupe import Deduplicator, Verdict, rank_version
from consumer.messages import ChangeEvent, InvalidMessage, parse
from consumer.outbox import NO_RANK, Covered, Outbox, PendingNotification, should_send
from consumer.ports import DeadLetter, DeadLetterSink, Envelope, HookResponse, Sink, Source
from consumer.retry import backoff_delay
from consumer.routing import Action, Ignored, Notification, Router
from consumer.throttle import Throttle

_T = TypeVar("_T")
Entry = PendingNotification[Envelope]


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"
    UNUSABLE = "unusable"


# Any 2xx: a 201 taken for a failure would send an accepted batch again and again.
SUCCESS_STATUSES = frozenset(range(200, 300))


def classify(status: int | None) -> Outcome:
    """Classify a hook answer. None means no answer arrived (timeout, connection error)."""
    if status in SUCCESS_STATUSES:
        return Outcome.DELIVERED
    if status is not None and 300 <= status < 400:
        # A redirect is not followed (the key would leave for another address): like a wrong URL.
        return Outcome.UNUSABLE
    if status in (400, 413, 422):
        # 413 too: a smaller batch may pass, and a single notification that is still too large is poison.
        return Outcome.REJECTED
    if status is not None and 400 <= status < 500 and status not in (408, 425, 429):
        # 401/403 (key refused), 404/405/410 (wrong URL): retrying faster or dead-lettering cannot help.
        return Outcome.UNUSABLE
    return Outcome.RETRY


class SinkUnusable(RuntimeError):
    """The hook refused our key or URL (401/403/404...) and this run does not wait for a fix."""


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    batch_size: int = 100
    max_in_flight: int = 10_000
    debug: bool = False
    drain_timeout: float = 30.0
    fetch_max: int = 1_000
    stop_on_unusable_sink: bool = False
    retry_base: float = 1.0
    retry_cap: float = 60.0
    retry_after_cap: float = 600.0
    unusable_retry_base: float = 15.0
    unusable_retry_cap: float = 300.0
    store_retry_cap: float = 30.0
    # A claim on a resource being sent lapses this long after its last renewal (a holder that died); a live
    # holder renews its claims every third of it. An entity claimed elsewhere is tried again after about
    # ``claim_retry`` seconds.
    claim_lease: float = 15.0
    claim_retry: float = 0.25
    # A notification sent and never confirmed (its process died in between) holds back older changes of its
    # resource until its own change comes again, for at most ``attempt_ttl`` seconds; they look again every
    # ``attempt_retry`` seconds.
    attempt_ttl: float = 300.0
    attempt_retry: float = 1.0


@dataclass(slots=True)
class Counts:
    received: int = 0
    routed: int = 0
    invalid: int = 0
    ignored: int = 0
    duplicate: int = 0
    stale: int = 0
    coalesced: int = 0
    notifications_sent: int = 0
    requests: int = 0
    retries: int = 0
    dead_lettered: int = 0
    acked: int = 0
    handed_back: int = 0
    claim_waits: int = 0
    requests_by_status: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Health:
    """What readiness reports: whether the sink takes our notifications (not after a 401/403) and whether
    the state store answers."""

    sink_usable: bool = True
    sink_problem: str = ""
    state_problem: str = ""


class LatencyHistogram:
    """Cumulative-bucket counts of durations in seconds, cheap enough to observe every hook request."""

    BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self, buckets: Sequence[float] = BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """Return ``(upper bound, observations at or below it)`` pairs, the last bound being infinity."""
        total, out = 0, []
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


# End-to-end latencies span milliseconds (an idle pipeline) to an hour (a backlog behind the throttle).
END_TO_END_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0
)  # fmt: skip


def epoch_seconds(timestamp: str) -> float | None:
    """Return the Unix time of an ISO 8601 timestamp (``Z`` or an offset; naive means UTC), None if it
    is not one."""
    try:
        when = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _where(envelope: Envelope) -> dict[str, Any]:
    """Where an envelope came from, for its audit line: the source's own fields (Kafka topic, partition and
    offset; a Pub/Sub message id...), which say all its position says, or the position alone."""
    fields = envelope.source_fields
    return dict(fields) if fields else {"position": envelope.position}


def _with_watermark(key: str, watermark: int | None) -> dict[str, Any]:
    return {"message_key": key} if watermark is None else {"message_key": key, "watermark": watermark}


def _by_scope(notifications: Sequence[Notification]) -> dict[str, list[str]]:
    """A batch's notifications as ``{scope: [external id, ...]}``: each scope written once."""
    grouped: dict[str, list[str]] = {}
    for notification in notifications:
        ids = grouped.get(notification.scope)
        if ids is None:
            grouped[notification.scope] = [notification.external_id]
        else:
            ids.append(notification.external_id)
    return grouped


class Pipeline:
    """One service instance's pipeline from a source to a sink."""

    def __init__(
        self,
        *,
        source: Source,
        router: Router,
        deduplicator: Deduplicator,
        throttle: Throttle,
        sink: Sink,
        dead_letters: DeadLetterSink,
        options: PipelineOptions,
        log: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.router = router
        self.deduplicator = deduplicator
        self.throttle = throttle
        self.sink = sink
        self.dead_letters = dead_letters
        self.options = options
        # Bound once: the lazy proxy that get_logger returns re-resolves itself on every call.
        self.log = log if log is not None else audit.get_logger().bind()
        # Per-message INFO events cost their keyword arguments even when filtered out.
        self._info = log is not None or audit.info_enabled()
        self._info_line = (audit.info_writer() if log is None else None) or self._log_info
        self.clock = clock
        self.wall_clock = wall_clock
        self.counts = Counts()
        self.health = Health()
        self.batch_latency = LatencyHistogram()
        # Received by ctsync -> accepted by the hook, and commercetools' change time -> accepted, per
        # message whose notification the hook accepted (what a covered or dead-lettered one waited is not
        # a delivery). ``_received`` holds, per routed envelope in the outbox, when it was received and the
        # change time the payload gave.
        self.delivery_latency = LatencyHistogram(END_TO_END_BUCKETS)
        self.change_latency = LatencyHistogram(END_TO_END_BUCKETS)
        self._received: dict[int, tuple[float, str | None]] = {}
        self.outbox: Outbox[Envelope] = Outbox()
        self.holder = f"ctsync-{uuid.uuid4().hex[:12]}"
        limits = throttle.limits
        self._pace = limits.window_seconds / limits.limit
        # Every envelope not yet acked or handed back, with its message key once parsed (None if invalid).
        self._unsettled: dict[int, tuple[Envelope, str | None]] = {}
        # Resources this process has claimed for the entries in flight, with how many entries hold each.
        self._claims: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._sink_ok = asyncio.Event()
        self._sink_ok.set()
        self._backlogged = False
        self._intake_blocked = False
        self._intake_done = False
        self._flushing = False
        self._deliveries: set[asyncio.Task[None]] = set()
        self._delivery_slots = asyncio.Semaphore(limits.batch_executions)
        self._fatal: BaseException | None = None
        self._room = asyncio.Event()
        self._stopping = asyncio.Event()
        self._abort = asyncio.Event()
        self._abandon = asyncio.Event()

    # ----------------------------------------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event | None = None) -> Counts:
        """Run until the source is exhausted or ``stop`` is set; drain, hand back the rest, return counts.

        A finite source (a file) is delivered to the end. A stop gives in-flight work ``drain_timeout``
        seconds to land; whatever has not landed then is handed back to the source, never lost.
        """
        stop = stop or asyncio.Event()
        try:
            async with asyncio.TaskGroup() as group:
                intake = group.create_task(self._intake(), name="ctsync-intake")
                dispatcher = group.create_task(self._dispatch(group), name="ctsync-dispatcher")
                stopping = group.create_task(self._until_stopping(stop), name="ctsync-stop")
                keeper = group.create_task(self._keep_claims(), name="ctsync-claims")
                await asyncio.wait({intake, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not stopping.done():
                    await asyncio.wait({dispatcher, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not dispatcher.done() and self._fatal is None:
                    self.log.info(
                        audit.SERVICE_STOPPING,
                        drain_timeout_s=self.options.drain_timeout,
                        pending=len(self.outbox),
                        unsettled=len(self._unsettled),
                    )
                    self._changed.set()
                    abandoned = asyncio.ensure_future(self._abandon.wait())
                    try:
                        await asyncio.wait(
                            {dispatcher, abandoned},
                            timeout=self.options.drain_timeout,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        abandoned.cancel()
                for task in (intake, dispatcher, stopping, keeper, *self._deliveries):
                    task.cancel()
        finally:
            self._hand_back()
            await self._release_all_claims()
        if self._fatal is not None:
            raise self._fatal
        return self.counts

    def abandon(self) -> None:
        """Stop waiting for in-flight work now (a second signal); what has not landed is handed back."""
        self._abandon.set()
        self._abort.set()

    async def _until_stopping(self, stop: asyncio.Event) -> None:
        """Return once a stop is requested or a delivery failed for good; tell the intake to stop."""
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._abort.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._stopping.set()
        self._flushing = True
        self._room.set()
        self._changed.set()

    def _hand_back(self) -> None:
        """Nack every envelope not settled, so the source redelivers it (at-least-once)."""
        for envelope, key in list(self._unsettled.values()):
            self.log.info(
                audit.MESSAGE_HANDED_BACK,
                message_key=key,
                position=envelope.position,
                **envelope.source_fields,
            )
            envelope.nack()
            self.counts.handed_back += 1
        self._unsettled.clear()
        self._received.clear()
        list(self.outbox.drain())

    # -------------------------------------------------------------------------------------------- intake

    async def _intake(self) -> None:
        try:
            while not self._stopping.is_set():
                room = self.options.max_in_flight - len(self._unsettled)
                if (
                    room <= 0
                    or not self._sink_ok.is_set()
                    or self.throttle.store_problem is not None
                    or self.health.state_problem
                ):
                    self._intake_blocked = True
                    self._changed.set()
                    self._room.clear()
                    try:
                        async with asyncio.timeout(1.0):
                            await self._room.wait()
                    except TimeoutError:
                        pass
                    continue
                self._intake_blocked = False
                fetched = await self.source.fetch(min(room, self.options.fetch_max))
                self._backlogged = fetched.more_ready
                if fetched.envelopes:
                    await self._take_in(fetched.envelopes)
                if fetched.exhausted:
                    return
        finally:
            self._intake_done = True
            self._flushing = True
            self._changed.set()

    async def _take_in(self, envelopes: Sequence[Envelope]) -> None:
        """Take in what one fetch returned, one pass per stage over the whole batch: parse, register and
        filter, dead-letter the invalid, judge (one state lookup), merge into the outbox, settle what needs
        no notification. No await and no future per payload: the awaits are per batch."""
        now = self.clock()
        log = self.log
        info = self._info
        line = self._info_line
        counts = self.counts
        unsettled = self._unsettled
        route = self.router.route
        # Registered before anything can fail, so whatever happens next they are settled or handed back.
        unsettled.update({id(envelope): (envelope, None) for envelope in envelopes})
        results = [parse(envelope.body) for envelope in envelopes]
        letters: list[tuple[Envelope, DeadLetter]] = []
        routed: list[tuple[Envelope, ChangeEvent, Any]] = []
        ignored: list[Envelope] = []
        for envelope, result in zip(envelopes, results, strict=True):
            if isinstance(result, InvalidMessage):
                if info:
                    line(audit.MESSAGE_RECEIVED, _where(envelope))
                log.warning(
                    audit.MESSAGE_INVALID,
                    reason=result.reason,
                    position=envelope.position,
                    **envelope.source_fields,
                )
                letters.append((envelope, self._letter(envelope, result.reason, None)))
                continue
            key = result.message_key
            unsettled[id(envelope)] = (envelope, key)
            if info:
                received = _where(envelope)
                received["message_key"] = key
                received["resource_type"] = result.resource_type
                received["resource_id"] = result.resource_id
                if result.version is not None:
                    received["version"] = result.version
                line(audit.MESSAGE_RECEIVED, received)
            decision = route(result)
            if isinstance(decision, Ignored):
                if info:
                    line(
                        audit.MESSAGE_IGNORED,
                        {
                            "message_key": key,
                            "reason": decision.reason,
                            "resource_type": result.resource_type,
                            "resource_id": result.resource_id,
                        },
                    )
                ignored.append(envelope)
                continue
            routed.append((envelope, result, decision))
        counts.received += len(envelopes)
        counts.invalid += len(letters)
        counts.ignored += len(ignored)
        if ignored:
            self._settle_many(ignored)
        if letters:
            await self._dead_letter(letters)
        if not routed:
            return
        counts.routed += len(routed)
        judgements = await self._with_store_retry(
            lambda: self.deduplicator.judge_many([(e, r.action is Action.DELETED) for _, e, r in routed]),
            "dedupe lookup",
        )
        skipped: list[Envelope] = []
        outbox_add = self.outbox.add
        is_pending = self.outbox.is_pending
        received_at = self._received
        for (envelope, event, decision), judgement in zip(routed, judgements, strict=True):
            key = event.message_key
            verdict = judgement.verdict
            if verdict is Verdict.NEW:
                received_at[id(envelope)] = (now, event.changed_at)
                duplicate_of_pending = info and is_pending(key)
                if outbox_add(decision, event, envelope, now):
                    counts.coalesced += 1
                    if info:
                        # The notification it merged into (scope, external id) is in batch.sent.
                        line(
                            audit.NOTIFICATION_COALESCED,
                            {"message_key": key, "duplicate": True}
                            if duplicate_of_pending
                            else {"message_key": key},
                        )
                if decision.fallback:
                    log.warning(
                        audit.CONFIG_WARNING,
                        message_key=key,
                        resource_type=event.resource_type,
                        reason="external id identifier missing; the resource id is used instead",
                        external_id=decision.external_id,
                    )
                continue
            if verdict is Verdict.DUPLICATE:
                if info:
                    line(audit.MESSAGE_DUPLICATE, _with_watermark(key, judgement.watermark))
                counts.duplicate += 1
            else:
                if info:
                    line(
                        audit.MESSAGE_STALE,
                        {
                            "message_key": key,
                            "version": event.version,
                            "watermark": judgement.watermark,
                            "resource_type": event.resource_type,
                            "resource_id": event.resource_id,
                        },
                    )
                counts.stale += 1
            skipped.append(envelope)
        if skipped:
            self._settle_many(skipped)
        self._changed.set()

    def _log_info(self, event: str, fields: dict[str, Any]) -> None:
        self.log.info(event, **fields)

    # ----------------------------------------------------------------------------------------- settling

    def _settle_many(self, envelopes: Iterable[Envelope], *, delivered: bool = False) -> None:
        """Ack every envelope of a batch not settled yet, in one pass; wake the intake once.

        ``delivered``: their notification was accepted just now, so each one's end-to-end latencies are
        observed in the same pass.
        """
        unsettled = self._unsettled
        received = self._received
        line = self._info_line if self._info else None
        if delivered:
            now, wall = self.clock(), self.wall_clock()
            delivery, change = self.delivery_latency.observe, self.change_latency.observe
        acked = 0
        for envelope in envelopes:
            settled = unsettled.pop(id(envelope), None)
            mark = received.pop(id(envelope), None)
            if delivered and mark is not None:
                delivery(max(now - mark[0], 0.0))
                changed = epoch_seconds(mark[1]) if mark[1] is not None else None
                if changed is not None:
                    # Clocks differ between commercetools and here: a change "from the future" counts as 0.
                    change(max(wall - changed, 0.0))
            if settled is None:
                continue
            envelope.ack()
            acked += 1
            if line is not None:
                # The place as message.received gave it: with copies of one key (a redelivery), it says
                # which copy this was.
                fields = _where(envelope)
                if settled[1] is not None:
                    fields["message_key"] = settled[1]
                line(audit.MESSAGE_ACKED, fields)
        if acked:
            self.counts.acked += acked
            self._room.set()

    def _letter(self, envelope: Envelope, reason: str, key: str | None) -> DeadLetter:
        return DeadLetter(
            reason=reason,
            body=envelope.body,
            source=self.source.name,
            position=envelope.position,
            time=datetime.now(UTC),
            message_key=key,
            source_fields=envelope.source_fields,
            key=envelope.key,
        )

    async def _dead_letter(self, letters: list[tuple[Envelope, DeadLetter]]) -> None:
        """Write dead letters (retrying until the sink takes them), then ack their envelopes."""
        await self._with_store_retry(
            lambda: self.dead_letters.write([letter for _, letter in letters]),
            "dead-letter write",
            event=audit.DEAD_LETTER_RETRYING,
        )
        for envelope, letter in letters:
            self.counts.dead_lettered += 1
            self.log.warning(
                audit.MESSAGE_DEAD_LETTERED,
                message_key=letter.message_key,
                reason=letter.reason,
                position=envelope.position,
            )
        self._settle_many([envelope for envelope, _ in letters])

    async def _with_store_retry(
        self, call: Callable[[], Awaitable[_T]], what: str, event: str = audit.STATE_RETRYING
    ) -> _T:
        attempt = 0
        while True:
            try:
                result = await call()
            except Exception as exc:
                attempt += 1
                self.health.state_problem = f"{what}: {type(exc).__name__}: {exc}"
                delay = backoff_delay(attempt, self.options.retry_base, self.options.store_retry_cap)
                self.log.warning(
                    event,
                    operation=what,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    error=f"{type(exc).__name__}: {exc}",
                )
                await asyncio.sleep(delay)
                continue
            if attempt:
                self.health.state_problem = ""
                self.log.info(audit.STATE_RECOVERED, operation=what, attempts=attempt)
            return result

    # ------------------------------------------------------------------------------------------ status

    @property
    def unsettled_count(self) -> int:
        """Envelopes received and not yet acked or handed back (the in-flight gauge)."""
        return len(self._unsettled)

    def problems(self) -> list[str]:
        """Return why this instance is not ready (empty when it is): sink, state or dead-letter store, shared
        throttle."""
        found = []
        if not self.health.sink_usable:
            found.append(f"sink: {self.health.sink_problem}")
        if self.health.state_problem:
            found.append(self.health.state_problem)
        if self.throttle.store_problem is not None:
            found.append(f"throttle store: {self.throttle.store_problem}")
        return found

    # ----------------------------------------------------------------------------------------- dispatch

    def _finished(self) -> bool:
        return self._intake_done and len(self.outbox) == 0 and not self._deliveries

    async def _dispatch(self, group: asyncio.TaskGroup) -> None:
        while not self._finished():
            wait = self._ready_in()
            if wait != 0.0:
                self._changed.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
                except TimeoutError:
                    pass
                continue
            await self._delivery_slots.acquire()
            taken = asyncio.Event()
            task = group.create_task(self._deliver_next(taken))
            self._deliveries.add(task)
            task.add_done_callback(self._delivery_done)
            # One delivery at a time waits for the throttle, so entries keep merging until it takes them.
            await taken.wait()

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._changed.set()

    def _ready_in(self) -> float | None:
        """Return 0.0 when a batch should leave now, else how long to wait at most (None: until woken)."""
        now = self.clock()
        next_due = self.outbox.release_due(now)
        since = self.outbox.oldest_ready_since()
        if not self._sink_ok.is_set():
            return None
        if since is None:
            return None if next_due is None else max(next_due - now, 0.001)
        age = now - since
        if should_send(
            ready=self.outbox.ready_count,
            oldest_age=age,
            backlogged=self._backlogged,
            intake_blocked=self._intake_blocked,
            flushing=self._flushing,
            pace_seconds=self._pace,
        ):
            return 0.0
        return max(self._pace - age, 0.001)

    async def _deliver_next(self, taken: asyncio.Event) -> None:
        try:
            async with self.throttle.batch_execution(self.holder):
                entries: list[Entry] = []
                async with self.throttle.request(self.holder):
                    # Taken at the last moment: everything that merged while we waited for the budget rides.
                    entries = await self._take_claimed(taken)
                    taken.set()
                    if not entries:
                        return
                    response, correlation_id = await self._send(entries, attempt=1)
                await self._settle_batch(entries, response, correlation_id, attempt=1)
        finally:
            taken.set()
            self._delivery_slots.release()
            self._changed.set()

    async def _send(self, entries: list[Entry], attempt: int) -> tuple[HookResponse, str]:
        correlation_id = str(uuid.uuid4())
        notifications = [entry.notification(self.options.debug) for entry in entries]
        response = await self.sink.send(notifications, correlation_id)
        self.batch_latency.observe(response.duration_ms / 1000)
        self.counts.requests += 1
        status_label = str(response.status) if response.status is not None else "error"
        status_label = "dry run" if response.dry_run else status_label
        self.counts.requests_by_status[status_label] = self.counts.requests_by_status.get(status_label, 0) + 1
        if self._info:
            self._info_line(
                audit.BATCH_SENT,
                {
                    "correlation_id": correlation_id,
                    "size": len(entries),
                    "status": "dry run" if response.dry_run else response.status,
                    "attempt": attempt,
                    "duration_ms": round(response.duration_ms, 1),
                    "message_keys": [key for entry in entries for key in entry.message_keys],
                    "notifications": _by_scope(notifications),
                    **({"detail": response.detail} if response.detail else {}),
                },
            )
        return response, correlation_id

    async def _settle_batch(
        self, entries: list[Entry], response: HookResponse, correlation_id: str, attempt: int
    ) -> None:
        """Act on a hook answer: settle, retry (with fresh requests), split or wait for a usable sink."""
        unusable_attempts = 0
        while True:
            outcome = classify(response.status)
            if outcome is Outcome.DELIVERED:
                if not self._sink_ok.is_set():
                    self._sink_ok.set()
                    self.health.sink_usable, self.health.sink_problem = True, ""
                    self.log.info(audit.SINK_RECOVERED, correlation_id=correlation_id)
                await self._delivered(entries)
                return
            if outcome is Outcome.REJECTED:
                await self._isolate_rejected(entries, response, correlation_id)
                return
            if outcome is Outcome.UNUSABLE:
                unusable_attempts += 1
                problem = f"hook answered {response.status}: {response.detail}".strip()
                self._sink_ok.clear()
                self.health.sink_usable, self.health.sink_problem = False, problem
                self.log.error(
                    audit.SINK_UNUSABLE,
                    correlation_id=correlation_id,
                    status=response.status,
                    detail=response.detail or None,
                )
                if self.options.stop_on_unusable_sink:
                    self._fatal = SinkUnusable(
                        f"the hook refused the request ({problem}); check IPAAS_HOOK_URL and "
                        "IPAAS_WEBHOOK_API_KEY"
                    )
                    self._abort.set()
                    return
                delay = backoff_delay(
                    unusable_attempts, self.options.unusable_retry_base, self.options.unusable_retry_cap
                )
            else:
                delay = (
                    # A far-future Retry-After date must not stall the service for days, and a tiny one must
                    # not allow a retry storm: never below the backoff's first step.
                    max(min(response.retry_after, self.options.retry_after_cap), self.options.retry_base)
                    if response.retry_after is not None and response.retry_after > 0
                    else backoff_delay(attempt, self.options.retry_base, self.options.retry_cap)
                )
                if response.status == 429:
                    # A 429 speaks for the whole subscription's budget: nobody sends until it has passed.
                    await self.throttle.pause(delay)
            self.counts.retries += 1
            self.log.warning(
                audit.BATCH_RETRYING,
                correlation_id=correlation_id,
                status=response.status,
                delay_s=round(delay, 3),
                attempt=attempt,
                size=len(entries),
                detail=response.detail or None,
            )
            await asyncio.sleep(delay)
            attempt += 1
            async with self.throttle.request(self.holder):
                response, correlation_id = await self._send(entries, attempt)

    async def _isolate_rejected(
        self, entries: list[Entry], response: HookResponse, correlation_id: str
    ) -> None:
        if len(entries) == 1:
            entry = entries[0]
            reason = (
                f"hook rejected notification {entry.notification(self.options.debug).scope} "
                f"{entry.external_id}: HTTP {response.status} {response.detail}".strip()
            )
            await self._dead_letter(
                [
                    (envelope, self._letter(envelope, reason, key))
                    for envelope, key in zip(entry.owed, entry.message_keys, strict=True)
                ]
            )
            # Rejected, so certainly not accepted: its attempt is withdrawn and holds nothing back.
            await self._release_claims(
                self._unclaim(entries), withdrawn={r: k for r, k in entry.ranks.items() if k != NO_RANK}
            )
            self.outbox.finish(entries)
            return
        middle = len(entries) // 2
        for half in (entries[:middle], entries[middle:]):
            async with self.throttle.request(self.holder):
                half_response, half_id = await self._send(half, attempt=1)
            await self._settle_batch(half, half_response, half_id, attempt=1)

    async def _delivered(self, entries: list[Entry]) -> None:
        # Only versionless changes need their keys remembered: the watermarks cover the others.
        keys = [
            key
            for entry in entries
            if entry.versionless
            for key, (_, rank, _) in zip(entry.message_keys, entry.changes, strict=True)
            if rank == NO_RANK
        ]
        ranks: dict[str, int] = {}
        for entry in entries:
            for resource, rank in entry.ranks.items():
                if rank > ranks.get(resource, NO_RANK):  # a versionless change raises no watermark
                    ranks[resource] = rank
        # The claims end in the same step as the watermarks rise, and stay renewed until then.
        ending = self._claims_ending(entries)
        await self._with_store_retry(
            lambda: self.deduplicator.record_delivered(keys, ranks, holder=self.holder, release=ending),
            "state write",
        )
        self._forget_claims(entries)
        self.counts.notifications_sent += len(entries)
        self._settle_many([envelope for entry in entries for envelope in entry.owed], delivered=True)
        self._settle_covered(self.outbox.finish(entries, delivered=True))

    # ------------------------------------------------------------------------------------------- claims

    async def _take_claimed(self, taken: asyncio.Event) -> list[Entry]:
        """Take the next batch and claim its resources, judging each entry again in the same step.

        Another process may hold an entity's resource (it is sending a notification of it): that entry is
        deferred and tried again shortly, un-acked. Changes that the delivered state now covers (delivered
        by a flight that landed since intake judged them, here or elsewhere) are settled as stale. An entry
        below an unconfirmed attempt (a process died after sending a newer notification of the resource and
        before recording it) waits for the change of that attempt, which was not acked and comes again, to
        merge into it. When nothing of a batch is left to send, the next ready entries are taken, while
        there are any. ``taken`` is set once the first entries are taken: the next batch need not wait.
        """
        while True:
            entries = self.outbox.take(self.options.batch_size)
            taken.set()
            if not entries:
                return []
            ranks: dict[str, int] = {}
            for entry in entries:
                for resource, rank in entry.ranks.items():
                    if rank > ranks.get(resource, NO_RANK - 1):
                        ranks[resource] = rank
            # A versioned change already delivered is covered by its watermark; only versionless ones
            # need their message keys read again.
            keys = [
                key
                for entry in entries
                if entry.versionless
                for key, (_, rank, _) in zip(entry.message_keys, entry.changes, strict=True)
                if rank == NO_RANK
            ]
            claim = await self._with_store_retry(
                functools.partial(
                    self.deduplicator.claim,
                    self.holder,
                    ranks,
                    keys,
                    self.options.claim_lease,
                    self.options.attempt_ttl,
                ),
                "claim",
            )
            sendable: list[Entry] = []
            refused: list[Entry] = []
            behind: list[Entry] = []
            emptied: list[Entry] = []
            for entry in entries:
                if claim.refused and not claim.refused.isdisjoint(entry.ranks):
                    refused.append(entry)
                    continue
                covered = self.outbox.settle_covered(entry, claim.view.watermarks, claim.view.delivered_keys)
                if covered:
                    self._settle_covered(covered)
                if not entry.owed:
                    emptied.append(entry)
                elif any(
                    rank != NO_RANK and claim.attempts.get(resource, NO_RANK) > rank
                    for resource, rank in entry.ranks.items()
                ):
                    behind.append(entry)
                else:
                    sendable.append(entry)
            claimed = set(ranks) - claim.refused
            for resource in {r for entry in sendable for r in entry.ranks}:
                self._claims[resource] = self._claims.get(resource, 0) + 1
            unused = claimed.difference(self._claims)
            if unused:
                await self._release_claims(unused)
            if emptied:
                self.outbox.finish(emptied)
            if refused:
                self._defer(refused, "claimed by another process", self.options.claim_retry)
            if behind:
                self._defer(
                    behind, "a newer notification was sent and not confirmed", self.options.attempt_retry
                )
            if sendable:
                return sendable

    def _defer(self, entries: list[Entry], reason: str, retry: float) -> None:
        self.counts.claim_waits += len(entries)
        if self._info:
            for entry in entries:
                self._info_line(
                    audit.NOTIFICATION_CLAIM_WAIT,
                    {
                        "scope": entry.notification(self.options.debug).scope,
                        "external_id": entry.external_id,
                        "reason": reason,
                    },
                )
        # Jittered, so replicas waiting on each other do not retry in lockstep.
        self.outbox.defer(entries, self.clock() + retry * (0.5 + random.random()))

    def _settle_covered(self, covered: list[Covered[Envelope]]) -> None:
        """Settle changes that a delivered notification already covered: they get no notification of their
        own (the order rule: nothing at or below a delivered rank is notified after it)."""
        for change in covered:
            if change.watermark is None:
                self.counts.duplicate += 1
                if self._info:
                    self._info_line(audit.MESSAGE_DUPLICATE, {"message_key": change.message_key})
            else:
                self.counts.stale += 1
                if self._info:
                    self._info_line(
                        audit.MESSAGE_STALE,
                        {
                            "message_key": change.message_key,
                            "watermark": rank_version(change.watermark),
                            "rank": change.watermark,
                            "resource": change.resource,
                            "reason": "covered by a delivered notification",
                        },
                    )
        if covered:
            self._settle_many([change.owed for change in covered])

    def _claims_ending(self, entries: list[Entry]) -> list[str]:
        """Return the resources whose claim ends when these entries land (no other entry in flight holds
        them)."""
        holding: dict[str, int] = {}
        for entry in entries:
            for resource in entry.ranks:
                holding[resource] = holding.get(resource, 0) + 1
        return [r for r, n in holding.items() if self._claims.get(r, 0) <= n]

    def _unclaim(self, entries: list[Entry]) -> list[str]:
        """Forget the claims these entries held; return the resources no entry in flight holds any more."""
        ended = self._claims_ending(entries)
        self._forget_claims(entries)
        return ended

    def _forget_claims(self, entries: list[Entry]) -> None:
        for entry in entries:
            for resource in entry.ranks:
                left = self._claims.get(resource, 0) - 1
                if left > 0:
                    self._claims[resource] = left
                else:
                    self._claims.pop(resource, None)

    async def _release_claims(
        self, resources: set[str] | list[str], withdrawn: dict[str, int] | None = None
    ) -> None:
        """End claims now; a failure is left to the leases' expiry (the claims are no longer renewed)."""
        if not resources and not withdrawn:
            return
        try:
            async with asyncio.timeout(self.options.claim_lease / 3):
                await self.deduplicator.store.release_claims(self.holder, resources, withdrawn)
        except Exception as exc:
            self.log.warning(
                audit.STATE_RETRYING,
                operation="claim release",
                attempt=1,
                delay_s=None,
                error=f"{type(exc).__name__}: {exc}",
            )

    async def _release_all_claims(self) -> None:
        held, self._claims = list(self._claims), {}
        await self._release_claims(held)

    async def _keep_claims(self) -> None:
        """Renew this process's claims every third of a lease while their notifications are in flight."""
        while True:
            await asyncio.sleep(self.options.claim_lease / 3)
            held = list(self._claims)
            if not held:
                continue
            try:
                lost = await self.deduplicator.store.extend_claims(
                    self.holder, held, self.options.claim_lease
                )
            except Exception as exc:
                self.log.warning(
                    audit.STATE_RETRYING,
                    operation="claim renewal",
                    attempt=1,
                    delay_s=round(self.options.claim_lease / 3, 3),
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            if lost:
                self.log.warning(audit.CLAIM_LOST, resources=sorted(lost)[:20], count=len(lost))
