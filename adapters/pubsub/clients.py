"""Pub/Sub clients for Google Cloud (application default credentials) or an emulator, and the admin calls
that read a subscription (``check``, ``subscription ensure``). Every admin call gives up after
``ADMIN_TIMEOUT_SECONDS`` and names the variable to fix when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Final

import google.cloud.pubsub_v1 as pubsub_v1
import grpc
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.auth import exceptions as auth_exceptions
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

# Admin calls (open, probe) give up after this; the client's own default is 600 s, far too long for start-up.
ADMIN_TIMEOUT_SECONDS: Final = 10.0

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


def _emulator_channel(host: str) -> grpc.Channel:
    # The emulator speaks plaintext gRPC; the library only switches to it when the variable is in
    # os.environ, and PUBSUB_EMULATOR_HOST may come from --env-file instead.
    return grpc.insecure_channel(
        host, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )


def endpoint(options: PubSubOptions) -> str:
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


def close_client(client: pubsub_v1.SubscriberClient | pubsub_v1.PublisherClient) -> None:
    with contextlib.suppress(Exception):
        if isinstance(client, pubsub_v1.SubscriberClient):
            client.close()
        else:
            client.transport.close()


def explain(exc: Exception, variable: str, what: str, endpoint: str) -> OSError:
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


async def get_subscription(client: pubsub_v1.SubscriberClient, name: str) -> Any:
    return await asyncio.to_thread(
        client.get_subscription,
        request={"subscription": name},
        retry=_ADMIN_RETRY,
        timeout=ADMIN_TIMEOUT_SECONDS,
    )


async def probe(options: PubSubOptions) -> str:
    """Check that PUBSUB_SUBSCRIPTION exists and is reachable; return a one-line description.

    Raises LookupError when it does not exist, ConnectionError when Pub/Sub cannot be reached or refuses.
    """
    name = options.subscription
    if name is None:
        raise LookupError("PUBSUB_SUBSCRIPTION: not set (projects/<project>/subscriptions/<subscription>)")
    client = await asyncio.to_thread(subscriber_client, options)
    try:
        subscription = await get_subscription(client, name)
    except gexc.PermissionDenied as exc:
        raise ConnectionError(
            f"PUBSUB_SUBSCRIPTION: the credentials may not read {name} ({exc.message}); grant "
            "roles/pubsub.subscriber and roles/pubsub.viewer on it"
        ) from exc
    except Exception as exc:
        raise explain(exc, "PUBSUB_SUBSCRIPTION", f"subscription {name}", endpoint(options)) from exc
    finally:
        await asyncio.to_thread(close_client, client)
    parts = [f"topic {subscription.topic}", f"ack deadline {subscription.ack_deadline_seconds}s"]
    policy = subscription.dead_letter_policy
    if policy is not None and policy.dead_letter_topic:
        parts.append(
            f"dead-letter policy to {policy.dead_letter_topic} after {policy.max_delivery_attempts} attempts"
        )
    if subscription.push_config is not None and subscription.push_config.push_endpoint:
        parts.append(f"push to {subscription.push_config.push_endpoint} (use CTSYNC_SOURCE=push)")
    return f"subscription {name} at {endpoint(options)}: " + ", ".join(parts)


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
        subscription = await get_subscription(client, name)
    except Exception as exc:
        raise explain(exc, "PUBSUB_SUBSCRIPTION", f"subscription {name}", endpoint(options)) from exc
    finally:
        await asyncio.to_thread(close_client, client)
    topic: str = subscription.topic
    if not topic or topic == "_deleted-topic_":
        raise LookupError(f"PUBSUB_SUBSCRIPTION: {name} is attached to no topic (it was deleted)")
    return topic
