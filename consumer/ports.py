"""The ports of the core: what a source, a sink, a state store, a throttle store and a dead-letter sink offer.

Adapters implement these protocols; the core depends on nothing else of theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from consumer.routing import Notification


def _nothing() -> None:
    return None


@dataclass(slots=True, eq=False)
class Envelope:
    """One delivery from a source.

    ``ack`` settles it for good (Kafka: the offset may be committed; Pub/Sub: ack); ``nack`` hands it back
    for redelivery. Both are plain callables that must not block: a source records the settlement and does
    its I/O elsewhere. ``source_fields`` are the source's own audit fields (topic, partition, offset, Pub/Sub
    message id, delivery attempt...). ``key`` is the record key where the source has one (Kafka), kept so a
    dead letter can carry it.
    """

    body: bytes
    position: str
    ack: Callable[[], None] = _nothing
    nack: Callable[[], None] = _nothing
    source_fields: Mapping[str, object] = field(default_factory=dict)
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Fetched:
    """What one ``Source.fetch`` returned.

    ``more_ready`` says the source already holds more envelopes (a backlog is being read), which lets the
    outbox hold partial batches back to merge more; ``exhausted`` says a finite source reached its end.
    """

    envelopes: Sequence[Envelope]
    more_ready: bool = False
    exhausted: bool = False


class Source(Protocol):
    """Where envelopes come from: a Kafka consumer, a Pub/Sub subscription, a push endpoint, a file."""

    name: str

    async def fetch(self, max_count: int) -> Fetched:
        """Return up to ``max_count`` envelopes; wait at most about a second when none are ready."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HookResponse:
    """What one hook request came to. ``status`` is None when no response arrived (timeout, connection).

    ``detail`` is a short operator-facing description (a transport error or a body snippet); it never holds a
    secret. ``retry_after`` is the server's ``Retry-After`` in seconds from now, when it sent one.
    """

    status: int | None
    duration_ms: float = 0.0
    retry_after: float | None = None
    detail: str = ""
    # A dry run's answer: nothing was sent, so the log says "dry run" rather than the 200 it stands for.
    dry_run: bool = False


class Sink(Protocol):
    """Where notifications go: the iPaaS.com hook API, or the dry-run log."""

    async def send(self, notifications: Sequence[Notification], correlation_id: str) -> HookResponse: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A payload that could not be delivered, with why and where it came from."""

    reason: str
    body: bytes
    source: str
    position: str
    time: datetime
    message_key: str | None = None
    source_fields: Mapping[str, object] = field(default_factory=dict)
    key: bytes | None = None


class DeadLetterSink(Protocol):
    """Where dead letters are kept: a JSONL file, a Kafka topic, a Pub/Sub topic.

    ``write`` returns only once every letter is durably written; it raises otherwise.
    """

    async def write(self, letters: Sequence[DeadLetter]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StateView:
    """The delivered state of a set of keys: which message keys were delivered, and resource watermarks."""

    delivered_keys: frozenset[str]
    watermarks: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Claim:
    """What claiming resources came to, read in the same atomic step as the claim: which ones another holder
    holds (``refused``); the delivered state of the keys and resources; and ``attempts``, the ranks of
    notifications that were sent but never confirmed delivered (their holder died between the hook's answer
    and recording it) where they stand above the watermark."""

    refused: frozenset[str]
    view: StateView
    attempts: Mapping[str, int] = field(default_factory=dict)


class StateStore(Protocol):
    """Delivered message keys and per-resource version watermarks, remembered for a TTL, and claims.

    A claim is a lease on a resource held by one ``holder`` (a process) while a notification of it is being
    sent: two holders never send the same resource at once, so what one delivered is always judged by the
    other before it sends. A claim ends when its holder releases it or when its lease expires (a holder that
    died); a live holder extends its claims well within the lease.
    """

    async def lookup(self, message_keys: Collection[str], resource_keys: Collection[str]) -> StateView:
        """Return, in one round trip, which keys were delivered and the watermarks of the resources."""
        ...

    async def record_delivered(
        self,
        message_keys: Collection[str],
        watermarks: Mapping[str, int],
        ttl_seconds: float,
        *,
        holder: str = "",
        release: Collection[str] = (),
    ) -> None:
        """Remember delivered keys and raise watermarks (never lower them), and end ``holder``'s claims on the
        ``release`` resources, in one round trip."""
        ...

    async def claim(
        self,
        holder: str,
        ranks: Mapping[str, int],
        message_keys: Collection[str],
        lease_seconds: float,
        attempt_seconds: float,
    ) -> Claim:
        """Claim every resource of ``ranks`` that no other holder holds and read the delivered state,
        atomically, in one round trip. Claiming a resource the holder already holds renews it.

        ``ranks`` maps each resource to the highest rank about to be sent (-1: none). For each claimed
        resource whose rank stands above its watermark the store remembers that rank as an attempt for
        ``attempt_seconds``, until a delivery at or above it is recorded: if the holder dies after the hook
        accepted and before the delivery was recorded, the next holder learns that a notification of that
        rank may have been accepted.
        """
        ...

    async def release_claims(
        self, holder: str, resource_keys: Collection[str], withdrawn: Mapping[str, int] | None = None
    ) -> None:
        """End ``holder``'s claims on these resources (a claim of another holder is left alone).

        ``withdrawn``: attempts that certainly were not accepted (the hook rejected them), forgotten when
        they still stand at those ranks.
        """
        ...

    async def extend_claims(
        self, holder: str, resource_keys: Collection[str], lease_seconds: float
    ) -> frozenset[str]:
        """Renew ``holder``'s claims (taking back any that expired and nobody took); return the resources
        another holder took meanwhile."""
        ...

    async def close(self) -> None: ...


class Slot(StrEnum):
    BATCH = "batch"
    REQUEST = "request"


class ThrottleStore(Protocol):
    """The subscription's throttle budget: a moving window of requests and two concurrency limits.

    A ``REQUEST`` slot holds one connection and one place in the moving window; the place stays counted for
    the window's length after the request ends. A ``BATCH`` slot is one concurrent batch execution.
    ``holder`` names the lease so a shared store can expire the slots of a holder that died.
    """

    async def try_acquire(self, slot: Slot, holder: str) -> float:
        """Take a slot and return 0.0, or return how many seconds to wait before trying again."""
        ...

    async def release(self, slot: Slot, holder: str) -> None: ...

    async def pause(self, seconds: float) -> None:
        """Let no request start for ``seconds`` (the whole budget answered 429 with ``Retry-After``)."""
        ...

    async def close(self) -> None: ...


class CursorStore(Protocol):
    """Where sweep cursors are kept between runs: one string value per name."""

    async def get(self, name: str) -> str | None: ...

    async def put(self, name: str, value: str) -> None: ...

    async def delete(self, name: str) -> None: ...

    async def close(self) -> None: ...
