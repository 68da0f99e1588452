"""The commercetools Subscription ctsync needs: the draft, and the update actions that bring one up to date.

Pure functions; ``ctsync subscription ensure`` sends what they return through the commercetools client.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, Final, Literal

Format = Literal["Platform", "CloudEvents"]

DEFAULT_KEY: Final = "ctsync"
KEY_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{2,256}")
# A Pub/Sub topic path; the settings check CTSYNC_DEAD_LETTER_URL with it too.
PUBSUB_TOPIC: Final = re.compile(r"projects/([^/\s]+)/topics/([^/\s]+)")
# Resource types commercetools sends changes for but no messages (commercetools.md, section 5); asking
# for their messages would be refused.
NO_MESSAGES: Final = frozenset({"channel", "product-type", "tax-category", "shipping-method", "zone", "type"})
# Destination fields that hold credentials: masked when shown, and not compared (commercetools may not return
# them as they were sent).
SECRET_DESTINATION_FIELDS: Final = frozenset({"apiSecret", "accessSecret", "connectionString"})
MASK: Final = "********"


class SubscriptionError(ValueError):
    """The draft cannot be built, or the existing subscription cannot be updated into it."""


def pubsub_destination(topic_path: str) -> dict[str, Any]:
    """Return a GoogleCloudPubSub destination for ``projects/<project>/topics/<topic>``."""
    match = PUBSUB_TOPIC.fullmatch(topic_path.strip())
    if match is None:
        raise SubscriptionError(
            f"the Pub/Sub topic must be projects/<project>/topics/<topic> (got {topic_path!r})"
        )
    return {"type": "GoogleCloudPubSub", "projectId": match.group(1), "topic": match.group(2)}


def confluent_destination(
    bootstrap_server: str, topic: str, api_key: str, api_secret: str, key: str | None = None
) -> dict[str, Any]:
    """Return a ConfluentCloud destination; ``key`` is the fixed record key commercetools sets, if any."""
    destination: dict[str, Any] = {
        "type": "ConfluentCloud",
        "bootstrapServer": bootstrap_server,
        "apiKey": api_key,
        "apiSecret": api_secret,
        "acks": "all",
        "topic": topic,
    }
    if key:
        destination["key"] = key
    return destination


def format_spec(name: Format) -> dict[str, Any]:
    if name == "CloudEvents":
        return {"type": "CloudEvents", "cloudEventsVersion": "1.0"}
    return {"type": "Platform"}


def build_draft(
    resource_types: Collection[str],
    destination: Mapping[str, Any],
    *,
    key: str = DEFAULT_KEY,
    fmt: Format = "Platform",
) -> dict[str, Any]:
    """Return the SubscriptionDraft: every message type and every change of each routed resource type."""
    if not KEY_PATTERN.fullmatch(key):
        raise SubscriptionError(f"the subscription key must match [A-Za-z0-9_-]{{2,256}} (got {key!r})")
    if not resource_types:
        raise SubscriptionError("the scope map routes no resource type: nothing to subscribe to")
    types = sorted(resource_types)
    return {
        "key": key,
        "destination": dict(destination),
        "messages": [{"resourceTypeId": t, "types": []} for t in types if t not in NO_MESSAGES],
        "changes": [{"resourceTypeId": t} for t in types],
        "format": format_spec(fmt),
    }


def masked(value: Any) -> Any:
    """Return ``value`` (a draft, a subscription) with credential fields masked, for printing."""
    if isinstance(value, Mapping):
        return {k: (MASK if k in SECRET_DESTINATION_FIELDS and v else masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def _messages(value: Any) -> dict[str, frozenset[str]]:
    return {
        str(m.get("resourceTypeId")): frozenset(m.get("types") or ())
        for m in value or ()
        if isinstance(m, Mapping)
    }


def _changes(value: Any) -> frozenset[str]:
    return frozenset(str(c.get("resourceTypeId")) for c in value or () if isinstance(c, Mapping))


def _comparable(destination: Any) -> dict[str, Any]:
    if not isinstance(destination, Mapping):
        return {}
    return {k: v for k, v in destination.items() if k not in SECRET_DESTINATION_FIELDS}


def _format(value: Any) -> dict[str, Any]:
    spec = dict(value) if isinstance(value, Mapping) else {"type": "Platform"}
    return spec


def update_actions(existing: Mapping[str, Any], draft: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return the update actions that turn ``existing`` into ``draft``; empty when nothing differs.

    The format cannot be changed by an update action: a different format raises SubscriptionError.
    Credentials in the destination are not compared (see SECRET_DESTINATION_FIELDS).
    """
    if _format(existing.get("format")) != _format(draft.get("format")):
        have = _format(existing.get("format")).get("type")
        want = _format(draft.get("format")).get("type")
        raise SubscriptionError(
            f"subscription {existing.get('key')!r} uses the {have} format, not {want}; commercetools cannot "
            "change a subscription's format: delete it first, or use another --key"
        )
    actions: list[dict[str, Any]] = []
    if _comparable(existing.get("destination")) != _comparable(draft["destination"]):
        actions.append({"action": "changeDestination", "destination": dict(draft["destination"])})
    if _messages(existing.get("messages")) != _messages(draft.get("messages")):
        actions.append({"action": "setMessages", "messages": list(draft.get("messages") or [])})
    if _changes(existing.get("changes")) != _changes(draft.get("changes")):
        actions.append({"action": "setChanges", "changes": list(draft.get("changes") or [])})
    return actions


HEALTHY: Final = "Healthy"
_STATUS_HINTS: Final[Mapping[str, str]] = {
    "ConfigurationError": "commercetools cannot deliver to the destination; check its permissions (Pub/Sub: "
    "grant pubsub.topics.publish to subscriptions@commercetools-platform.iam.gserviceaccount.com)",
    "ConfigurationErrorDeliveryStopped": "deliveries stopped after configuration errors; notifications are "
    "being dropped: fix the destination's permissions, then update the subscription",
    "TemporaryError": "the destination is failing for now; commercetools retries",
    "ManuallySuspended": "the subscription was suspended by commercetools support; notifications are dropped",
}


def status_hint(status: str | None) -> str:
    """Return what a subscription health status means for an operator ('' when healthy)."""
    if status in (None, HEALTHY):
        return ""
    return _STATUS_HINTS.get(str(status), "an unknown status")


def is_broken(status: str | None) -> bool:
    """Whether notifications are not being delivered and will not be without a fix."""
    return status in ("ConfigurationError", "ConfigurationErrorDeliveryStopped", "ManuallySuspended")
