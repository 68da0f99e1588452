"""Google Cloud Pub/Sub: the clients and admin calls (``clients``), the streaming-pull source (``source``),
and dead letters out to a topic and back for a replay (``dead_letters``)."""

from adapters.pubsub.clients import (
    PubSubOptions,
    probe,
    publisher_client,
    subscriber_client,
    subscription_topic,
)
from adapters.pubsub.dead_letters import (
    DeadLetterPullSource,
    PubSubDeadLetterSink,
    open_dead_letter_sink,
    open_dead_letter_source,
    probe_topic,
)
from adapters.pubsub.source import HandOverScheduler, PubSubSource, envelope, flow_control, open_source

__all__ = [
    "DeadLetterPullSource",
    "HandOverScheduler",
    "PubSubDeadLetterSink",
    "PubSubOptions",
    "PubSubSource",
    "envelope",
    "flow_control",
    "open_dead_letter_sink",
    "open_dead_letter_source",
    "open_source",
    "probe",
    "probe_topic",
    "publisher_client",
    "subscriber_client",
    "subscription_topic",
]
