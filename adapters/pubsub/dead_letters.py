"""Pub/Sub dead letters: a sink that publishes each one's original bytes to a topic (the record's
attributes are ``consumer.dead_letters``'), and a finite source over a subscription of that topic for
``ctsync dead-letters replay``, which hands back what it did not replay when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from adapters.pubsub.clients import (
    _ADMIN_RETRY,
    ADMIN_TIMEOUT_SECONDS,
    PubSubOptions,
    close_client,
    endpoint,
    explain,
    get_subscription,
    publisher_client,
    subscriber_client,
)
from consumer import dead_letters
from consumer.ports import DeadLetter, DeadLetterSink, Envelope, Fetched

PUBLISH_TIMEOUT_SECONDS: Final = 60.0


class PubSubDeadLetterSink:
    """Publish each dead letter's original bytes to a topic, with the reason and origin as attributes."""

    def __init__(
        self, client: pubsub_v1.PublisherClient, topic: str, timeout: float = PUBLISH_TIMEOUT_SECONDS
    ) -> None:
        self.client = client
        self.topic = topic
        self.timeout = timeout

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        published = [
            asyncio.wrap_future(
                self.client.publish(self.topic, letter.body, **dead_letters.pubsub_attributes(letter))
            )
            for letter in letters
        ]
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.gather(*published)
        except BaseException:
            for future in published:
                future.cancel()
            raise

    async def close(self) -> None:
        # stop() publishes what is still batched and waits for it; bounded by the client's publish timeout.
        await asyncio.to_thread(_stop_publisher, self.client)


def _stop_publisher(client: pubsub_v1.PublisherClient) -> None:
    with contextlib.suppress(Exception):
        client.stop()
    close_client(client)


async def open_dead_letter_sink(options: PubSubOptions, topic: str) -> DeadLetterSink:
    """Check that the dead-letter topic exists and return a sink publishing to it."""
    client = await asyncio.to_thread(publisher_client, options)
    try:
        await asyncio.to_thread(
            client.get_topic, request={"topic": topic}, retry=_ADMIN_RETRY, timeout=ADMIN_TIMEOUT_SECONDS
        )
    except gexc.PermissionDenied:
        # roles/pubsub.publisher may publish without reading the topic; a real problem shows on publish.
        pass
    except Exception as exc:
        await asyncio.to_thread(close_client, client)
        raise explain(exc, "CTSYNC_DEAD_LETTER_URL", f"topic {topic}", endpoint(options)) from exc
    return PubSubDeadLetterSink(client, topic)


async def probe_topic(options: PubSubOptions, topic: str) -> str:
    """Check that dead-letter ``topic`` exists and, where the server can say, that we may publish to it."""
    client = await asyncio.to_thread(publisher_client, options)
    try:
        try:
            await asyncio.to_thread(
                client.get_topic, request={"topic": topic}, retry=_ADMIN_RETRY, timeout=ADMIN_TIMEOUT_SECONDS
            )
        except gexc.PermissionDenied:
            pass  # roles/pubsub.publisher may publish without reading the topic: the permission test says
        except Exception as exc:
            raise explain(exc, "CTSYNC_DEAD_LETTER_URL", f"topic {topic}", endpoint(options)) from exc
        try:
            answer = await asyncio.to_thread(
                client.test_iam_permissions,
                request={"resource": topic, "permissions": ["pubsub.topics.publish"]},
                timeout=ADMIN_TIMEOUT_SECONDS,
            )
        except (gexc.MethodNotImplemented, gexc.NotFound):
            return f"Pub/Sub topic {topic} exists (this server cannot tell whether we may publish)"
        if "pubsub.topics.publish" not in answer.permissions:
            raise ConnectionError(
                f"CTSYNC_DEAD_LETTER_URL: the credentials may not publish to {topic}; grant "
                "roles/pubsub.publisher on it"
            )
        return f"Pub/Sub topic {topic} exists and we may publish to it"
    finally:
        await asyncio.to_thread(close_client, client)


# ------------------------------------------------------------------------------ dead-letter replay source


class DeadLetterPullSource:
    """A finite source over what waits on a subscription of the dead-letter topic.

    Synchronous pulls; acks are recorded by the envelopes and sent by a flusher task, which also extends
    the leases of every message still held. A replay is bounded by a snapshot: a message published at or
    after ``snapshot`` (letters written while the replay runs) is not read, and a nacked one (filtered out,
    or handed back) is held rather than redelivered at once; both are handed back when the source closes,
    so nothing is read twice and pulls run dry. Exhausted once pulls yield nothing for ``idle_seconds``.
    """

    name = "pubsub"

    def __init__(
        self,
        client: pubsub_v1.SubscriberClient,
        subscription: str,
        *,
        idle_seconds: float = 3.0,
        batch: int = 500,
        lease_seconds: int = 60,
        snapshot: datetime | None = None,
    ) -> None:
        self.client = client
        self.subscription = subscription
        self.snapshot = snapshot
        # The topic the subscription is attached to, when its metadata could be read.
        self.topic: str | None = None
        self.idle_seconds = idle_seconds
        self.batch = batch
        self.lease_seconds = lease_seconds
        self._acks: list[str] = []
        self._nacks: list[str] = []
        self._held: dict[str, float] = {}
        self._last_seen = time.monotonic()
        self._flusher: asyncio.Task[None] | None = None

    def _settle(self, ack_id: str, ok: bool) -> Callable[[], None]:
        def settle() -> None:
            # A nack keeps the lease until close: redelivered now, it would be read again and again.
            if ok and self._held.pop(ack_id, None) is not None:
                self._acks.append(ack_id)

        return settle

    def _after_snapshot(self, message: Any) -> bool:
        published = getattr(message, "publish_time", None)
        if self.snapshot is None or not isinstance(published, datetime):
            return False
        if published.tzinfo is None:
            published = published.replace(tzinfo=UTC)
        return published >= self.snapshot

    async def fetch(self, max_count: int) -> Fetched:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="ctsync-dead-letter-acks")
        response = await asyncio.to_thread(
            self.client.pull,
            request={
                "subscription": self.subscription,
                "max_messages": min(max_count, self.batch),
                "return_immediately": True,
            },
            retry=_ADMIN_RETRY,
            timeout=ADMIN_TIMEOUT_SECONDS,
        )
        now = time.monotonic()
        envelopes = []
        for received in response.received_messages:
            message = received.message
            attributes: Mapping[str, str] = message.attributes
            self._held[received.ack_id] = now
            if self._after_snapshot(message):
                continue
            envelopes.append(
                Envelope(
                    body=message.data,
                    position=message.message_id,
                    ack=self._settle(received.ack_id, True),
                    nack=self._settle(received.ack_id, False),
                    source_fields={
                        "message_id": message.message_id,
                        **dead_letters.replay_fields(dead_letters.from_pubsub_attributes(attributes)),
                    },
                )
            )
        if envelopes:
            self._last_seen = now
            return Fetched(envelopes, more_ready=True)
        if now - self._last_seen >= self.idle_seconds:
            return Fetched((), exhausted=True)
        if response.received_messages:
            return Fetched((), more_ready=True)
        await asyncio.sleep(0.5)
        return Fetched(())

    async def _flush_forever(self) -> None:
        last_extension = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            await self._flush()
            if time.monotonic() - last_extension > self.lease_seconds / 3 and self._held:
                last_extension = time.monotonic()
                await self._modify(list(self._held), self.lease_seconds)

    async def _modify(self, ack_ids: list[str], seconds: int) -> None:
        for start in range(0, len(ack_ids), 1000):
            await asyncio.to_thread(
                self.client.modify_ack_deadline,
                request={
                    "subscription": self.subscription,
                    "ack_ids": ack_ids[start : start + 1000],
                    "ack_deadline_seconds": seconds,
                },
                retry=_ADMIN_RETRY,
                timeout=ADMIN_TIMEOUT_SECONDS,
            )

    async def _flush(self) -> None:
        acks, self._acks = self._acks, []
        nacks, self._nacks = self._nacks, []
        for start in range(0, len(acks), 1000):
            await asyncio.to_thread(
                self.client.acknowledge,
                request={"subscription": self.subscription, "ack_ids": acks[start : start + 1000]},
                retry=_ADMIN_RETRY,
                timeout=ADMIN_TIMEOUT_SECONDS,
            )
        if nacks:
            await self._modify(nacks, 0)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        try:
            self._nacks.extend(self._held)
            self._held.clear()
            await self._flush()
        finally:
            await asyncio.to_thread(close_client, self.client)


async def open_dead_letter_source(
    options: PubSubOptions, name: str, snapshot: datetime | None = None
) -> DeadLetterPullSource:
    """Open a finite source over the dead letters waiting on subscription ``name`` (for
    ``ctsync dead-letters replay``), up to those published before ``snapshot``; each envelope's body is
    the original payload."""
    client = await asyncio.to_thread(subscriber_client, options)
    topic: str | None = None
    try:
        topic = (await get_subscription(client, name)).topic or None
    except gexc.PermissionDenied:
        pass
    except Exception as exc:
        await asyncio.to_thread(close_client, client)
        raise explain(exc, "dead-letter subscription", f"subscription {name}", endpoint(options)) from exc
    source = DeadLetterPullSource(client, name, snapshot=snapshot)
    source.topic = topic
    return source
