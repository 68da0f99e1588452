"""Google Cloud Pub/Sub: a streaming-pull source, a dead-letter publisher, a reachability probe, and a finite
source over a dead-letter subscription (``ctsync dead-letters replay``).

The client library calls back on its own threads. The only work done there is handing the message over: an
append to a deque and, unless one is already queued, a ``call_soon_threadsafe`` wake-up of the event loop;
parsing, acks and audit all happen on the loop. Because the hand-over is that small, it runs on the client's
stream thread itself (``HandOverScheduler``) instead of hopping through the client's default pool of ten
callback threads, which cost more per message than the hand-over and contend with the loop for the GIL.
Memory is bounded by the client's flow control, which agrees with ``CTSYNC_MAX_IN_FLIGHT``: the client leases
at most that many messages and extends their leases while they wait behind the throttle.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import google.cloud.pubsub_v1 as pubsub_v1
import grpc
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.auth import exceptions as auth_exceptions
from google.cloud.pubsub_v1.subscriber.scheduler import Scheduler
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from consumer import dead_letters
from consumer.ports import DeadLetter, DeadLetterSink, Envelope, Fetched, Source

# The pipeline may hold a message for as long as the hook is throttled or down; past this the client stops
# extending the lease and Pub/Sub redelivers it, which the outbox merges into the entry already pending.
MAX_LEASE_SECONDS: Final = 2 * 60 * 60
# Flow control by bytes as well as by count, so a backlog of unusually large payloads cannot exhaust memory;
# never below one maximum-size Pub/Sub message (10 MB), or such a message could never be leased.
BYTES_PER_MESSAGE_BUDGET: Final = 64 * 1024
MIN_MAX_BYTES: Final = 16 * 1024 * 1024
MAX_MAX_BYTES: Final = 512 * 1024 * 1024
# Admin calls (open, probe) give up after this; the client's own default is 600 s, far too long for start-up.
ADMIN_TIMEOUT_SECONDS: Final = 10.0
PUBLISH_TIMEOUT_SECONDS: Final = 60.0
CLOSE_TIMEOUT_SECONDS: Final = 10.0

_TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.Aborted)
_ADMIN_RETRY: Final = Retry(
    initial=0.2,
    maximum=2.0,
    multiplier=2.0,
    timeout=ADMIN_TIMEOUT_SECONDS,
    predicate=if_exception_type(*_TRANSIENT),
)


@dataclass(frozen=True, slots=True)
class PubSubOptions:
    """Where Pub/Sub is (Google Cloud, or an emulator's host:port), the subscription to stream from, and
    how many messages may be leased at once."""

    subscription: str | None = None
    emulator_host: str | None = None
    max_in_flight: int = 10_000


class PulledMessage(Protocol):
    """What the source reads of a delivered ``google.cloud.pubsub_v1.subscriber.message.Message``."""

    @property
    def data(self) -> bytes: ...

    @property
    def message_id(self) -> str: ...

    @property
    def delivery_attempt(self) -> int | None: ...

    def ack(self) -> None: ...

    def nack(self) -> None: ...


# ------------------------------------------------------------------------------------------------ clients


def _emulator_channel(host: str) -> grpc.Channel:
    # The emulator speaks plaintext gRPC; the library only switches to it when the variable is in
    # os.environ, and PUBSUB_EMULATOR_HOST may come from --env-file instead.
    return grpc.insecure_channel(
        host, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )


def _endpoint(options: PubSubOptions) -> str:
    return options.emulator_host or "pubsub.googleapis.com"


def subscriber_client(options: PubSubOptions) -> pubsub_v1.SubscriberClient:
    """Return a subscriber client for Google Cloud (application default credentials) or the emulator."""
    try:
        if options.emulator_host:
            channel = _emulator_channel(options.emulator_host)
            return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
        return pubsub_v1.SubscriberClient()
    except auth_exceptions.DefaultCredentialsError as exc:
        raise ConnectionError(_no_credentials("PUBSUB_SUBSCRIPTION")) from exc


def publisher_client(options: PubSubOptions) -> pubsub_v1.PublisherClient:
    """Return a publisher client for Google Cloud (application default credentials) or the emulator."""
    try:
        if options.emulator_host:
            channel = _emulator_channel(options.emulator_host)
            return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=channel))
        return pubsub_v1.PublisherClient()
    except auth_exceptions.DefaultCredentialsError as exc:
        raise ConnectionError(_no_credentials("CTSYNC_DEAD_LETTER_URL")) from exc


def _no_credentials(variable: str) -> str:
    return (
        f"{variable}: no Google credentials found; set GOOGLE_APPLICATION_CREDENTIALS, use workload "
        "identity, or set PUBSUB_EMULATOR_HOST for an emulator"
    )


def _close_client(client: pubsub_v1.SubscriberClient | pubsub_v1.PublisherClient) -> None:
    with contextlib.suppress(Exception):
        if isinstance(client, pubsub_v1.SubscriberClient):
            client.close()
        else:
            client.transport.close()


def _explain(exc: Exception, variable: str, what: str, endpoint: str) -> OSError:
    """Turn a client error into an operator's one-liner naming the variable; NotFound -> LookupError-ish."""
    detail = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, gexc.NotFound):
        return _NotFound(f"{variable}: {what} does not exist ({detail})")
    if isinstance(exc, gexc.PermissionDenied | gexc.Unauthenticated):
        return ConnectionError(f"{variable}: the credentials may not use {what} ({detail})")
    if isinstance(exc, (gexc.RetryError, *_TRANSIENT)):
        return ConnectionError(f"{variable}: cannot reach Pub/Sub at {endpoint} for {what} ({detail})")
    return ConnectionError(f"{variable}: {what}: {type(exc).__name__}: {detail}")


class _NotFound(ConnectionError, LookupError):
    """A subscription or topic that does not exist: a ConnectionError to ``run``, a LookupError to
    ``check``."""


# ------------------------------------------------------------------------------------------------ source


def flow_control(max_in_flight: int) -> pubsub_v1.types.FlowControl:
    """Return flow control that leases no more than the pipeline may hold, in count and in bytes."""
    max_bytes = min(max(max_in_flight * BYTES_PER_MESSAGE_BUDGET, MIN_MAX_BYTES), MAX_MAX_BYTES)
    return pubsub_v1.types.FlowControl(
        max_messages=max_in_flight, max_bytes=max_bytes, max_lease_duration=MAX_LEASE_SECONDS
    )


def envelope(message: PulledMessage) -> Envelope:
    """Return the pipeline's envelope for a delivered message; ack and nack go straight to the client."""
    fields: dict[str, object] = {
        "message_id": message.message_id,
        "delivery_attempt": message.delivery_attempt,
    }
    published = getattr(message, "publish_time", None)
    if published is not None:
        fields["publish_time"] = published.isoformat()
    return Envelope(
        body=message.data,
        position=message.message_id,
        ack=message.ack,
        nack=message.nack,
        source_fields=fields,
    )


class HandOverScheduler(Scheduler):  # type: ignore[misc]
    """Run each callback at once on the client's thread that received the message.

    Only for callbacks that never block: ``PubSubSource.on_message`` appends to a deque. The queue is the
    one the client's dispatcher reads acks and nacks from, as with the default scheduler.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    @property
    def queue(self) -> queue.Queue[Any]:
        return self._queue

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callback(*args, **kwargs)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Any]:
        # Nothing is ever queued here, so no message waits undispatched.
        return []


class PubSubSource:
    """Streaming pull on one subscription; ``on_message`` is the client's callback.

    Messages wait in a deque until ``fetch`` takes them on the event loop. It needs no bound of its own: the
    client's flow control stops handing over messages once ``CTSYNC_MAX_IN_FLIGHT`` are leased and not yet
    acked or nacked.
    """

    name = "pubsub"

    def __init__(self, subscription: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.subscription = subscription
        self._loop = loop or asyncio.get_running_loop()
        # Appended by client threads, emptied by the loop: deque appends and pops are atomic.
        self._ready: deque[PulledMessage] = deque()
        self._wake_pending = False
        self._arrived = asyncio.Event()
        self._client: pubsub_v1.SubscriberClient | None = None
        self._future: Any = None
        self._failure: BaseException | None = None
        self._closed = False

    def start(self, client: pubsub_v1.SubscriberClient, control: pubsub_v1.types.FlowControl) -> None:
        """Open the streaming pull; the client then calls ``on_message`` from its threads."""
        self._client = client
        self._future = client.subscribe(
            self.subscription, self.on_message, flow_control=control, scheduler=HandOverScheduler()
        )
        self._future.add_done_callback(self._on_stream_done)

    def on_message(self, message: PulledMessage) -> None:
        """Hand a message over to the event loop (runs on a client thread, so it must never block)."""
        if self._closed:
            message.nack()
            return
        self._ready.append(message)
        # One wake-up per burst, not per message: under load a wake-up is already queued on the loop, and
        # a self-pipe write per message would cost more than the rest of the hand-over.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:
                # The loop is closed: the service stopped, so give what waits back at once.
                self._nack_waiting()

    def _wake(self) -> None:
        self._wake_pending = False
        self._arrived.set()

    def _nack_waiting(self) -> None:
        while self._ready:
            with contextlib.suppress(IndexError):
                self._ready.popleft().nack()

    def _on_stream_done(self, future: Any) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stream_done, future)

    def _stream_done(self, future: Any) -> None:
        if self._closed or future.cancelled():
            return
        try:
            future.result(timeout=0)
        except BaseException as exc:
            self._failure = exc
        else:
            self._failure = ConnectionError("the streaming pull ended")
        self._arrived.set()

    def problem(self) -> str | None:
        """Why the source is not ready (for /readyz): the streaming pull stopped for good."""
        if self._failure is None:
            return None
        return str(_explain_stream(self._failure, self.subscription))

    async def fetch(self, max_count: int) -> Fetched:
        ready = self._ready
        # Cleared before looking: a message appended after the look has a wake-up queued behind us.
        self._arrived.clear()
        if not ready:
            if self._failure is not None:
                raise _explain_stream(self._failure, self.subscription)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._arrived.wait()
        envelopes: list[Envelope] = []
        while ready and len(envelopes) < max_count:
            envelopes.append(envelope(ready.popleft()))
        return Fetched(envelopes, more_ready=bool(ready))

    async def close(self) -> None:
        """Stop pulling; what was handed over but not fetched is nacked, the rest the pipeline handed back."""
        if self._closed:
            return
        self._closed = True
        self._nack_waiting()
        future, client = self._future, self._client
        if future is not None:
            await asyncio.to_thread(_stop_streaming, future)
        # Messages handed over while the stream shut down.
        self._nack_waiting()
        if client is not None:
            await asyncio.to_thread(_close_client, client)


def _stop_streaming(future: Any) -> None:
    future.cancel()
    # Bounded: the shutdown sends pending acks and nacks first; a dead server must not hold the stop.
    with contextlib.suppress(Exception):
        future.result(timeout=CLOSE_TIMEOUT_SECONDS)


def _explain_stream(exc: BaseException, subscription: str) -> ConnectionError:
    detail = getattr(exc, "message", None) or str(exc)
    return ConnectionError(
        f"PUBSUB_SUBSCRIPTION: the streaming pull on {subscription} stopped: {type(exc).__name__}: {detail}"
    )


async def _get_subscription(client: pubsub_v1.SubscriberClient, name: str) -> Any:
    return await asyncio.to_thread(
        client.get_subscription,
        request={"subscription": name},
        retry=_ADMIN_RETRY,
        timeout=ADMIN_TIMEOUT_SECONDS,
    )


async def open_source(options: PubSubOptions) -> Source:
    """Check that PUBSUB_SUBSCRIPTION exists and start streaming pull on it."""
    name = options.subscription
    if name is None:
        raise ConnectionError("PUBSUB_SUBSCRIPTION: required when CTSYNC_SOURCE=pubsub")
    client = await asyncio.to_thread(subscriber_client, options)
    try:
        try:
            await _get_subscription(client, name)
        except gexc.PermissionDenied:
            # roles/pubsub.subscriber may consume without reading the subscription's metadata; the
            # streaming pull reports a real permission problem through fetch.
            pass
        except Exception as exc:
            raise _explain(exc, "PUBSUB_SUBSCRIPTION", f"subscription {name}", _endpoint(options)) from exc
        source = PubSubSource(name)
        source.start(client, flow_control(options.max_in_flight))
    except BaseException:
        await asyncio.to_thread(_close_client, client)
        raise
    return source


async def probe(options: PubSubOptions) -> str:
    """Check that PUBSUB_SUBSCRIPTION exists and is reachable; return a one-line description.

    Raises LookupError when it does not exist, ConnectionError when Pub/Sub cannot be reached or refuses.
    """
    name = options.subscription
    if name is None:
        raise LookupError("PUBSUB_SUBSCRIPTION: not set (projects/<project>/subscriptions/<subscription>)")
    client = await asyncio.to_thread(subscriber_client, options)
    try:
        subscription = await _get_subscription(client, name)
    except gexc.PermissionDenied as exc:
        raise ConnectionError(
            f"PUBSUB_SUBSCRIPTION: the credentials may not read {name} ({exc.message}); grant "
            "roles/pubsub.subscriber and roles/pubsub.viewer on it"
        ) from exc
    except Exception as exc:
        raise _explain(exc, "PUBSUB_SUBSCRIPTION", f"subscription {name}", _endpoint(options)) from exc
    finally:
        await asyncio.to_thread(_close_client, client)
    parts = [f"topic {subscription.topic}", f"ack deadline {subscription.ack_deadline_seconds}s"]
    policy = subscription.dead_letter_policy
    if policy is not None and policy.dead_letter_topic:
        parts.append(
            f"dead-letter policy to {policy.dead_letter_topic} after {policy.max_delivery_attempts} attempts"
        )
    if subscription.push_config is not None and subscription.push_config.push_endpoint:
        parts.append(f"push to {subscription.push_config.push_endpoint} (use CTSYNC_SOURCE=push)")
    return f"subscription {name} at {_endpoint(options)}: " + ", ".join(parts)


async def subscription_topic(options: PubSubOptions) -> str:
    """Return the topic PUBSUB_SUBSCRIPTION is attached to (for ``subscription ensure``).

    Raises LookupError when the subscription does not exist, ConnectionError when Pub/Sub cannot be
    reached or refuses.
    """
    name = options.subscription
    if name is None:
        raise LookupError("PUBSUB_SUBSCRIPTION: not set (projects/<project>/subscriptions/<subscription>)")
    client = await asyncio.to_thread(subscriber_client, options)
    try:
        subscription = await _get_subscription(client, name)
    except Exception as exc:
        raise _explain(exc, "PUBSUB_SUBSCRIPTION", f"subscription {name}", _endpoint(options)) from exc
    finally:
        await asyncio.to_thread(_close_client, client)
    topic: str = subscription.topic
    if not topic or topic == "_deleted-topic_":
        raise LookupError(f"PUBSUB_SUBSCRIPTION: {name} is attached to no topic (it was deleted)")
    return topic


# ------------------------------------------------------------------------------------------ dead letters


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
    _close_client(client)


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
        await asyncio.to_thread(_close_client, client)
        raise _explain(exc, "CTSYNC_DEAD_LETTER_URL", f"topic {topic}", _endpoint(options)) from exc
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
            raise _explain(exc, "CTSYNC_DEAD_LETTER_URL", f"topic {topic}", _endpoint(options)) from exc
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
        await asyncio.to_thread(_close_client, client)


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
            await asyncio.to_thread(_close_client, self.client)


async def open_dead_letter_source(
    options: PubSubOptions, name: str, snapshot: datetime | None = None
) -> DeadLetterPullSource:
    """Open a finite source over the dead letters waiting on subscription ``name`` (for
    ``ctsync dead-letters replay``), up to those published before ``snapshot``; each envelope's body is
    the original payload."""
    client = await asyncio.to_thread(subscriber_client, options)
    topic: str | None = None
    try:
        topic = (await _get_subscription(client, name)).topic or None
    except gexc.PermissionDenied:
        pass
    except Exception as exc:
        await asyncio.to_thread(_close_client, client)
        raise _explain(exc, "dead-letter subscription", f"subscription {name}", _endpoint(options)) from exc
    source = DeadLetterPullSource(client, name, snapshot=snapshot)
    source.topic = topic
    return source
