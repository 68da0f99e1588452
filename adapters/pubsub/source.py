"""Google Cloud Pub/Sub streaming pull: the client library calls back on its own threads, and the only work
done there is handing the message over: an append to a deque and, unless one is already queued, a
``call_soon_threadsafe`` wake-up of the event loop; parsing, acks and audit all happen on the loop.

Because the hand-over is that small, it runs on the client's stream thread itself (``HandOverScheduler``)
instead of hopping through the client's default pool of ten callback threads, which cost more per message
than the hand-over and contend with the loop for the GIL. Memory is bounded by the client's flow control,
which agrees with ``CTSYNC_MAX_IN_FLIGHT``: the client leases at most that many messages and extends their
leases while they wait behind the throttle.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc
from google.cloud.pubsub_v1.subscriber.scheduler import Scheduler

from adapters.pubsub.clients import (
    PubSubOptions,
    close_client,
    endpoint,
    explain,
    get_subscription,
    subscriber_client,
)
from consumer.ports import Envelope, Fetched, Source

# The pipeline may hold a message for as long as the hook is throttled or down; past this the client stops
# extending the lease and Pub/Sub redelivers it, which the outbox merges into the entry already pending.
MAX_LEASE_SECONDS: Final = 2 * 60 * 60
# Flow control by bytes as well as by count, so a backlog of unusually large payloads cannot exhaust memory;
# never below one maximum-size Pub/Sub message (10 MB), or such a message could never be leased.
BYTES_PER_MESSAGE_BUDGET: Final = 64 * 1024
MIN_MAX_BYTES: Final = 16 * 1024 * 1024
MAX_MAX_BYTES: Final = 512 * 1024 * 1024
CLOSE_TIMEOUT_SECONDS: Final = 10.0


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
            await asyncio.to_thread(close_client, client)


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


async def open_source(options: PubSubOptions) -> Source:
    """Check that PUBSUB_SUBSCRIPTION exists and start streaming pull on it."""
    name = options.subscription
    if name is None:
        raise ConnectionError("PUBSUB_SUBSCRIPTION: required when CTSYNC_SOURCE=pubsub")
    client = await asyncio.to_thread(subscriber_client, options)
    try:
        try:
            await get_subscription(client, name)
        except gexc.PermissionDenied:
            # roles/pubsub.subscriber may consume without reading the subscription's metadata; the
            # streaming pull reports a real permission problem through fetch.
            pass
        except Exception as exc:
            raise explain(exc, "PUBSUB_SUBSCRIPTION", f"subscription {name}", endpoint(options)) from exc
        source = PubSubSource(name)
        source.start(client, flow_control(options.max_in_flight))
    except BaseException:
        await asyncio.to_thread(close_client, client)
        raise
    return source
