"""Turn the bytes of one commercetools Subscription delivery into a ChangeEvent or a precise parse error.

Both wire formats are read: Platform (the default, ``notificationType`` at the top) and structured-mode
CloudEvents (``specversion`` at the top, the Platform payload in ``data`` or ``data_base64``).

Checking rules, so that reasons stay predictable for whoever reads a dead letter:

- a JSON ``null`` counts as an absent field;
- fields that identify the event (ids, type names, versions, ``projectKey``, the identifiers object) must
  have the right type, or the payload is invalid;
- attribution (``createdBy`` / ``lastModifiedBy``) is read when well formed and otherwise ignored: it only
  serves echo suppression, and a malformed one should err towards notifying, not towards dropping;
- nothing else is looked at, so fields commercetools adds later never make a payload invalid.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

import msgspec
import orjson


class NotificationType(StrEnum):
    MESSAGE = "Message"
    RESOURCE_CREATED = "ResourceCreated"
    RESOURCE_UPDATED = "ResourceUpdated"
    RESOURCE_DELETED = "ResourceDeleted"
    EVENT = "Event"


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One notification from commercetools, whatever its wire format.

    ``version`` is the resource's version the notification speaks of: ``resourceVersion`` for messages,
    ``version`` for change notifications, None when the payload carries none (beta events).
    ``message_type`` is the message's ``type`` (or ``payloadNotIncluded.payloadType``); None for changes.
    ``identifiers`` holds the string-valued ``resourceUserProvidedIdentifiers`` (key, externalId,
    orderNumber, customerNumber, sku); ``slug`` and ``containerAndKey`` are not strings and are left out.
    """

    kind: NotificationType
    resource_type: str
    resource_id: str
    version: int | None = None
    message_type: str | None = None
    message_id: str | None = None
    identifiers: Mapping[str, str] = field(default_factory=dict)
    created_by_client_id: str | None = None
    project_key: str | None = None
    sequence_number: int | None = None
    cloud_events: bool = False
    payload_not_included: bool = False
    # When commercetools made the change, as the payload says it (``createdAt`` of a message, ``modifiedAt``
    # of a change notification, also inside a CloudEvent's data); None when absent or not a string. Only
    # measured (ctsync_change_latency_seconds), never judged: a payload is not invalid for it.
    changed_at: str | None = field(default=None, compare=False)
    # Derived once here: the pipeline reads both keys several times per payload on its hot path.
    message_key: str = field(init=False, repr=False, compare=False)
    """The dedupe key: the message id, or type+id+notificationType+version for changes."""
    resource_key: str = field(init=False, repr=False, compare=False)
    """The key of the resource whose delivered version is watermarked."""

    def __post_init__(self) -> None:
        resource_key = f"{self.resource_type}:{self.resource_id}"
        object.__setattr__(self, "resource_key", resource_key)
        object.__setattr__(
            self,
            "message_key",
            self.message_id
            if self.message_id is not None
            else f"{resource_key}:{self.kind.value}:{self.version}",
        )


# The fast path builds events through the slots directly: a frozen dataclass's __init__ pays an
# object.__setattr__ per field, which was a third of the cost of parsing a notification.
_EVENT_SLOTS = (
    "kind",
    "resource_type",
    "resource_id",
    "version",
    "message_type",
    "message_id",
    "identifiers",
    "created_by_client_id",
    "project_key",
    "sequence_number",
    "cloud_events",
    "payload_not_included",
    "changed_at",
    "message_key",
    "resource_key",
)
if ChangeEvent.__slots__ != _EVENT_SLOTS:
    raise RuntimeError("ChangeEvent's fields changed: update _EVENT_SLOTS and _new_event")
(
    _set_kind,
    _set_resource_type,
    _set_resource_id,
    _set_version,
    _set_message_type,
    _set_message_id,
    _set_identifiers,
    _set_created_by_client_id,
    _set_project_key,
    _set_sequence_number,
    _set_cloud_events,
    _set_payload_not_included,
    _set_changed_at,
    _set_message_key,
    _set_resource_key,
) = (getattr(ChangeEvent, name).__set__ for name in _EVENT_SLOTS)


def _new_event(
    kind: NotificationType,
    resource_type: str,
    resource_id: str,
    version: int,
    message_type: str | None,
    message_id: str | None,
    identifiers: Mapping[str, str],
    created_by_client_id: str | None,
    project_key: str | None,
    sequence_number: int | None,
    payload_not_included: bool,
    changed_at: str | None,
) -> ChangeEvent:
    """Build what ``ChangeEvent(...)`` would, keys included, for a Platform event (never CloudEvents)."""
    event: ChangeEvent = object.__new__(ChangeEvent)
    resource_key = f"{resource_type}:{resource_id}"
    _set_kind(event, kind)
    _set_resource_type(event, resource_type)
    _set_resource_id(event, resource_id)
    _set_version(event, version)
    _set_message_type(event, message_type)
    _set_message_id(event, message_id)
    _set_identifiers(event, identifiers)
    _set_created_by_client_id(event, created_by_client_id)
    _set_project_key(event, project_key)
    _set_sequence_number(event, sequence_number)
    _set_cloud_events(event, False)
    _set_payload_not_included(event, payload_not_included)
    _set_changed_at(event, changed_at if type(changed_at) is str else None)
    _set_message_key(
        event, message_id if message_id is not None else f"{resource_key}:{kind.value}:{version}"
    )
    _set_resource_key(event, resource_key)
    return event


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A payload that is not a commercetools notification; ``reason`` says precisely why."""

    reason: str


# JavaScript's largest safe integer: commercetools' versions fit easily, and the dedupe watermark
# (version * 2 + 1) still fits the signed 64-bit integers that SQLite and Redis store.
MAX_VERSION = 2**53 - 1

IDENTIFIER_FIELDS = frozenset(("key", "externalId", "orderNumber", "customerNumber", "sku"))

_BOM = b"\xef\xbb\xbf"
_CLOUD_EVENTS_TYPE_PREFIX = "com.commercetools."
_MAX_QUOTED = 60
_MAX_DECODER_MESSAGE = 120


class _Invalid(Exception):
    """Raised inside the parser to abandon a payload; ``parse`` turns it into an InvalidMessage."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse(body: bytes) -> ChangeEvent | InvalidMessage:
    """Parse one delivery; never raises.

    Well-formed Platform messages and change notifications take a fast path; everything else, and anything
    the fast path finds unusual, goes through the checking parser, which alone words the reasons.
    """
    try:
        document = orjson.loads(body)
    except Exception:
        return _parse_slow(body)
    if type(document) is dict and "specversion" not in document:
        try:
            event = _parse_fast(document)
        except Exception:
            # Whatever surprised the fast path (a wrong type, a null, a value out of range...) is for the
            # checking parser to judge and to word.
            event = None
        if event is not None:
            return event
    return _from_document(document)


def _parse_slow(body: bytes) -> ChangeEvent | InvalidMessage:
    """The checking parser on its own: the reference the fast path must agree with."""
    try:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            # Rare, so the tolerated variations (BOM, odd whitespace) and the diagnosis cost nothing here.
            document = _load_untidy(body)
    except _Invalid as invalid:
        return InvalidMessage(invalid.reason)
    except Exception as exc:
        return InvalidMessage(f"unexpected parser error ({type(exc).__name__})")
    return _from_document(document)


def _from_document(document: Any) -> ChangeEvent | InvalidMessage:
    try:
        if type(document) is not dict:
            raise _Invalid(f"payload is not a JSON object (got {_describe(document)})")
        if "specversion" in document:
            return _from_cloud_event(document)
        return _from_platform(document, False)
    except _Invalid as invalid:
        return InvalidMessage(invalid.reason)
    except Exception as exc:
        # The pipeline relies on parse never raising: a bug here must dead-letter one payload, not stop
        # the service. The tests assert this reason never shows up.
        return InvalidMessage(f"unexpected parser error ({type(exc).__name__})")


def _load_untidy(body: bytes) -> Any:
    """Load a body orjson refused as is: strip a BOM and surrounding whitespace, or say why it is not JSON."""
    raw = bytes(body).strip()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :].lstrip()
    if not raw:
        raise _Invalid("empty payload")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("not UTF-8") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = str(exc)
        if len(message) > _MAX_DECODER_MESSAGE:
            message = message[: _MAX_DECODER_MESSAGE - 1] + "…"
        raise _Invalid(f"not valid JSON: {message}") from None
    except Exception as exc:
        raise _Invalid(f"not valid JSON ({type(exc).__name__})") from None


# ----------------------------------------------------------------------------------------- reasons


def _describe(value: object) -> str:
    """Name what was found instead of the expected value, without ever echoing a string's content."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "boolean"
    kind = type(value)
    if kind is int or kind is float:
        return repr(value)
    if kind is str:
        return "string" if value else "empty string"
    if kind is dict:
        return "object"
    if kind is list:
        return "array"
    return kind.__name__


def _quote(text: str) -> str:
    if len(text) > _MAX_QUOTED:
        text = text[:_MAX_QUOTED] + "…"
    return repr(text)


def _wrong(name: str, expected: str, value: object) -> _Invalid:
    if value is None:
        return _Invalid(f"missing field '{name}'")
    return _Invalid(f"field '{name}' must be {expected} (got {_describe(value)})")


# -------------------------------------------------------------------------------------- field readers


def _required_str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if type(value) is str and value:
        return value
    raise _wrong(name, "a non-empty string", value)


def _version(obj: dict[str, Any], name: str, required: bool) -> int | None:
    value = obj.get(name)
    if type(value) is int and 0 <= value <= MAX_VERSION:
        return value
    if value is None and not required:
        return None
    if type(value) is int and value > MAX_VERSION:
        raise _Invalid(f"field '{name}' is out of range (got {value}, at most {MAX_VERSION})")
    raise _wrong(name, "a non-negative integer", value)


def _resource(obj: dict[str, Any]) -> tuple[str, str]:
    resource = obj.get("resource")
    if type(resource) is not dict:
        raise _wrong("resource", "an object", resource)
    type_id = resource.get("typeId")
    resource_id = resource.get("id")
    if type(type_id) is not str or not type_id:
        raise _wrong("resource.typeId", "a non-empty string", type_id)
    if type(resource_id) is not str or not resource_id:
        raise _wrong("resource.id", "a non-empty string", resource_id)
    return type_id, resource_id


def _project_key(obj: dict[str, Any]) -> str | None:
    value = obj.get("projectKey")
    if value is None or type(value) is str:
        return value
    raise _wrong("projectKey", "a string", value)


def _identifiers(obj: dict[str, Any]) -> dict[str, str]:
    raw = obj.get("resourceUserProvidedIdentifiers")
    if raw is None:
        return {}
    if type(raw) is not dict:
        raise _wrong("resourceUserProvidedIdentifiers", "an object", raw)
    return {k: v for k, v in raw.items() if k in IDENTIFIER_FIELDS and type(v) is str and v}


def _client_id(obj: dict[str, Any]) -> str | None:
    for name in ("createdBy", "lastModifiedBy"):
        who = obj.get(name)
        if type(who) is dict:
            client_id = who.get("clientId")
            if type(client_id) is str and client_id:
                return client_id
    return None


# ------------------------------------------------------------------------------------ Platform format


def _from_platform(obj: dict[str, Any], cloud_events: bool) -> ChangeEvent:
    kind = obj.get("notificationType")
    build = _BUILDERS.get(kind) if type(kind) is str else None
    if build is not None:
        return build(obj, cloud_events)
    if type(kind) is str:
        raise _Invalid(f"unknown notificationType {_quote(kind)}")
    raise _wrong("notificationType", "a string", kind)


def _message(obj: dict[str, Any], cloud_events: bool) -> ChangeEvent:
    message_id = obj.get("id")
    if message_id is None:
        raise _Invalid("Message without 'id'")
    if type(message_id) is not str or not message_id:
        raise _wrong("id", "a non-empty string", message_id)
    resource_type, resource_id = _resource(obj)
    payload_not_included = obj.get("payloadNotIncluded")
    if payload_not_included is not None and type(payload_not_included) is not dict:
        raise _wrong("payloadNotIncluded", "an object", payload_not_included)
    message_type = obj.get("type")
    if message_type is None and payload_not_included is not None:
        message_type = payload_not_included.get("payloadType")
        if message_type is not None and (type(message_type) is not str or not message_type):
            raise _wrong("payloadNotIncluded.payloadType", "a non-empty string", message_type)
    if message_type is None:
        raise _Invalid("Message without 'type' or 'payloadNotIncluded.payloadType'")
    if type(message_type) is not str or not message_type:
        raise _wrong("type", "a non-empty string", message_type)
    return ChangeEvent(
        NotificationType.MESSAGE,
        resource_type,
        resource_id,
        _version(obj, "resourceVersion", True),
        message_type,
        message_id,
        _identifiers(obj),
        _client_id(obj),
        _project_key(obj),
        _version(obj, "sequenceNumber", False),
        cloud_events,
        payload_not_included is not None,
        _text(obj.get("createdAt")),
    )


def _change(kind: NotificationType) -> Callable[[dict[str, Any], bool], ChangeEvent]:
    def build(obj: dict[str, Any], cloud_events: bool) -> ChangeEvent:
        resource_type, resource_id = _resource(obj)
        return ChangeEvent(
            kind,
            resource_type,
            resource_id,
            _version(obj, "version", True),
            None,
            None,
            _identifiers(obj),
            _client_id(obj),
            _project_key(obj),
            None,
            cloud_events,
            False,
            _text(obj.get("modifiedAt")),
        )

    return build


def _event(obj: dict[str, Any], cloud_events: bool) -> ChangeEvent:
    if obj.get("id") is None:
        raise _Invalid("Event without 'id'")
    if obj.get("type") is None:
        raise _Invalid("Event without 'type'")
    event_id = _required_str(obj, "id")
    event_type = _required_str(obj, "type")
    resource_type = obj.get("resourceType")
    data = obj.get("data")
    resource_id = data.get("id") if type(data) is dict else None
    return ChangeEvent(
        NotificationType.EVENT,
        resource_type if type(resource_type) is str else "",
        resource_id if type(resource_id) is str else "",
        None,
        event_type,
        event_id,
        _identifiers(obj),
        None,
        _project_key(obj),
        None,
        cloud_events,
        False,
        _text(obj.get("createdAt")),
    )


def _text(value: object) -> str | None:
    return value if type(value) is str else None


_BUILDERS: Mapping[str, Callable[[dict[str, Any], bool], ChangeEvent]] = {
    NotificationType.MESSAGE.value: _message,
    NotificationType.RESOURCE_CREATED.value: _change(NotificationType.RESOURCE_CREATED),
    NotificationType.RESOURCE_UPDATED.value: _change(NotificationType.RESOURCE_UPDATED),
    NotificationType.RESOURCE_DELETED.value: _change(NotificationType.RESOURCE_DELETED),
    NotificationType.EVENT.value: _event,
}


# ------------------------------------------------------------------------------ Platform fast path
#
# The common deliveries, checked by msgspec in one C pass over the document orjson already loaded. Decoding
# the bytes with a typed msgspec Decoder would spare building the whole dict, but when it skips an unknown
# field it checks neither the UTF-8 nor the range of numbers there ({"x": 1e400} or an invalid byte would
# pass), so it would accept bodies that orjson, and so the checking parser, refuse; and loading with orjson
# keeps its reading of duplicate keys and of integers beyond 64 bits (floats). These Structs accept a
# subset of what the checking parser accepts, with the same values; anything else raises and goes the slow
# way.

_Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_VERSION)]
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _Resource(msgspec.Struct, gc=False):
    typeId: _NonEmpty
    id: _NonEmpty


class _MessageFields(msgspec.Struct, gc=False):
    id: _NonEmpty
    resource: _Resource
    resourceVersion: _Version
    type: _NonEmpty | None = None
    payloadNotIncluded: dict[str, Any] | None = None
    sequenceNumber: _Version | None = None
    projectKey: str | None = None


class _ChangeFields(msgspec.Struct, gc=False):
    resource: _Resource
    version: _Version
    projectKey: str | None = None


_FAST_CHANGE_KINDS: Mapping[str, NotificationType] = {
    kind.value: kind
    for kind in (
        NotificationType.RESOURCE_CREATED,
        NotificationType.RESOURCE_UPDATED,
        NotificationType.RESOURCE_DELETED,
    )
}


def _parse_fast(obj: dict[str, Any]) -> ChangeEvent | None:
    """The event for a well-formed Platform message or change notification; None, or a raise, otherwise.

    Identifiers and attribution go through the checking parser's own readers, which are cheap and whose
    leniency is the subtle part.
    """
    kind = obj.get("notificationType")
    if type(kind) is not str:
        return None
    if kind == "Message":
        message = msgspec.convert(obj, _MessageFields)
        message_type = message.type
        not_included = message.payloadNotIncluded
        if message_type is None:
            if not_included is None:
                return None
            message_type = not_included.get("payloadType")
            if type(message_type) is not str or not message_type:
                return None
        resource = message.resource
        return _new_event(
            NotificationType.MESSAGE,
            resource.typeId,
            resource.id,
            message.resourceVersion,
            message_type,
            message.id,
            _identifiers(obj),
            _client_id(obj),
            message.projectKey,
            message.sequenceNumber,
            not_included is not None,
            obj.get("createdAt"),
        )
    change_kind = _FAST_CHANGE_KINDS.get(kind)
    if change_kind is None:
        return None
    change = msgspec.convert(obj, _ChangeFields)
    resource = change.resource
    return _new_event(
        change_kind,
        resource.typeId,
        resource.id,
        change.version,
        None,
        None,
        _identifiers(obj),
        _client_id(obj),
        change.projectKey,
        None,
        False,
        obj.get("modifiedAt"),
    )


# ------------------------------------------------------------------------------------ CloudEvents format


def _from_cloud_event(obj: dict[str, Any]) -> ChangeEvent:
    spec = obj.get("specversion")
    if spec != "1.0":
        if type(spec) is str:
            raise _Invalid(f"unsupported CloudEvents specversion {_quote(spec)} (expected '1.0')")
        raise _Invalid(f"field 'specversion' must be the string '1.0' (got {_describe(spec)})")
    ce_type = obj.get("type")
    if ce_type is None:
        raise _Invalid("CloudEvents without 'type'")
    if type(ce_type) is not str:
        raise _wrong("type", "a string", ce_type)
    if not ce_type.startswith(_CLOUD_EVENTS_TYPE_PREFIX):
        raise _Invalid(
            f"CloudEvents type {_quote(ce_type)} is not a commercetools type "
            f"(expected '{_CLOUD_EVENTS_TYPE_PREFIX}...')"
        )
    data = obj.get("data")
    if data is None:
        encoded = obj.get("data_base64")
        if encoded is None:
            raise _Invalid("CloudEvents without 'data' or 'data_base64'")
        data = _decode_data_base64(encoded)
    elif type(data) is not dict:
        raise _wrong("data", "an object", data)
    try:
        return _from_platform(data, True)
    except _Invalid as invalid:
        raise _Invalid(f"CloudEvents data: {invalid.reason}") from None


def _decode_data_base64(encoded: object) -> dict[str, Any]:
    if type(encoded) is not str:
        raise _wrong("data_base64", "a base64 string", encoded)
    try:
        raw = binascii.a2b_base64(encoded, strict_mode=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise _Invalid("field 'data_base64' is not valid base64") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            data = _load_untidy(raw)
        except _Invalid as invalid:
            raise _Invalid(f"field 'data_base64': {invalid.reason}") from None
    if type(data) is not dict:
        raise _Invalid(f"field 'data_base64' must hold a JSON object (got {_describe(data)})")
    return data
