"""A dry run: read and judge as the service would, log what it would send, and change nothing anywhere.

On a broker or push source a dry run must leave the stream as it found it: nothing is acked (no Kafka
commit, no Pub/Sub ack, no 2xx to a push) and no delivered key or watermark is written, so the real service
started later still sees every change. ``HandingBackSource`` turns each ack into a hold that becomes a nack
(hand back) when the source closes; ``ReadOnlyStateStore`` reads the real state, so the dry run shows what
would really be skipped, and records nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from consumer.ports import Claim, Envelope, Fetched, HookResponse, Source, StateStore, StateView
from consumer.routing import Notification


class DryRunSink:
    """Send nothing: pass each batch to ``log`` and answer as if iPaaS.com had accepted it."""

    def __init__(self, log: Callable[..., None]) -> None:
        self._log = log

    async def send(self, notifications: Sequence[Notification], correlation_id: str) -> HookResponse:
        self._log(notifications=[n.as_json() for n in notifications], correlation_id=correlation_id)
        return HookResponse(status=200, detail="dry run", dry_run=True)

    async def close(self) -> None:
        return None


class HandingBackSource:
    """Wrap a broker or push source so nothing it yields is ever acked: an ack only holds the envelope,
    and every held envelope is handed back (nacked) when the source closes.

    Held envelopes stay leased / uncommitted, so the source's own bound (Kafka pauses its partitions,
    Pub/Sub flow control stops leasing at ``CTSYNC_MAX_IN_FLIGHT``) keeps a long dry run from re-reading
    the same messages in a loop.
    """

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = inner.name
        self._held: list[Envelope] = []

    async def fetch(self, max_count: int) -> Fetched:
        fetched = await self.inner.fetch(max_count)
        return Fetched(
            [self._holding(envelope) for envelope in fetched.envelopes],
            more_ready=fetched.more_ready,
            exhausted=fetched.exhausted,
        )

    def _holding(self, envelope: Envelope) -> Envelope:
        return Envelope(
            body=envelope.body,
            position=envelope.position,
            ack=lambda: self._held.append(envelope),
            nack=envelope.nack,
            source_fields=envelope.source_fields,
            key=envelope.key,
        )

    async def close(self) -> None:
        held, self._held = self._held, []
        for envelope in held:
            envelope.nack()
        await self.inner.close()


class ReadOnlyStateStore:
    """The real state for lookups; writes are dropped."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner

    async def lookup(self, message_keys: Collection[str], resource_keys: Collection[str]) -> StateView:
        return await self.inner.lookup(message_keys, resource_keys)

    async def record_delivered(
        self,
        message_keys: Collection[str],
        watermarks: Mapping[str, int],
        ttl_seconds: float,
        *,
        holder: str = "",
        release: Collection[str] = (),
    ) -> None:
        return None

    async def claim(
        self,
        holder: str,
        ranks: Mapping[str, int],
        message_keys: Collection[str],
        lease_seconds: float,
        attempt_seconds: float,
    ) -> Claim:
        # A dry run writes no state and sends nothing, so it claims nothing and waits for nobody.
        return Claim(frozenset(), await self.inner.lookup(message_keys, ranks))

    async def release_claims(
        self, holder: str, resource_keys: Collection[str], withdrawn: Mapping[str, int] | None = None
    ) -> None:
        return None

    async def extend_claims(
        self, holder: str, resource_keys: Collection[str], lease_seconds: float
    ) -> frozenset[str]:
        return frozenset()

    async def close(self) -> None:
        await self.inner.close()
