"""Decide what iPaaS.com is told about a ChangeEvent: a Route (scope family, action, external id) or why not.

The built-in scope map follows iPaaS.com's data types; ``IPAAS_SCOPE_MAP`` (a TOML or YAML file) overrides
families, external-id choices and actions per message type. The file's shape::

    [types.product]              # a commercetools resource typeId
    family = "product"           # iPaaS.com scope family; the scope is "<family>/<action>"
    external_id = "key"          # id (default), key, sku, orderNumber, customerNumber or externalId

    [types.cart]
    enabled = false              # do not notify this type (also removes a built-in one)

    [messages]
    ProductUnpublished = "deleted"   # created, updated, deleted, or "ignore"
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from consumer.messages import ChangeEvent, NotificationType


class Action(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Notification:
    """What iPaaS.com is told: ``{"scope": ..., "external_id": ...}``."""

    scope: str
    external_id: str

    def as_json(self) -> dict[str, str]:
        return {"scope": self.scope, "external_id": self.external_id}


EXTERNAL_ID_CHOICES = ("id", "key", "sku", "orderNumber", "customerNumber", "externalId")

DEFAULT_FAMILIES: Mapping[str, str] = {
    "product": "product",
    "category": "product/category",
    "customer": "customer",
    "customer-group": "customer/category",
    "business-unit": "customer/company",
    "order": "transaction",
    "inventory-entry": "product/inventory",
}


@dataclass(frozen=True, slots=True)
class TypeRoute:
    family: str
    external_id: str = "id"


@dataclass(frozen=True, slots=True)
class ScopeMap:
    """Which resource types are notified, under which family and external id, and message-type actions.

    ``message_actions`` maps a message type to an Action, or to None when that message type is ignored.
    """

    types: Mapping[str, TypeRoute] = field(
        default_factory=lambda: {t: TypeRoute(f) for t, f in DEFAULT_FAMILIES.items()}
    )
    message_actions: Mapping[str, Action | None] = field(default_factory=dict)


class ScopeMapError(ValueError):
    """The scope-map file is unreadable or wrong; each problem names where in the file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_scope_map(path: str | Path) -> ScopeMap:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) scope map over the built-in defaults."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScopeMapError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data: Any = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # both parsers raise their own error types; the message is what matters
        raise ScopeMapError([f"{path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"]) from None
    return scope_map_from_dict(data)


def scope_map_from_dict(data: Any) -> ScopeMap:
    """Build a ScopeMap from parsed file contents, reporting every problem at once."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ScopeMapError(["the scope map must be a table/mapping at the top level"])
    for key in data:
        if key not in ("types", "messages", "replace_defaults"):
            problems.append(f"unknown top-level key {key!r} (expected types, messages, replace_defaults)")
    replace = data.get("replace_defaults", False)
    if not isinstance(replace, bool):
        problems.append("replace_defaults must be true or false")
        replace = False
    types: dict[str, TypeRoute] = {} if replace else dict(ScopeMap().types)
    raw_types = data.get("types", {})
    if not isinstance(raw_types, dict):
        problems.append("types must be a table of resource types")
        raw_types = {}
    for type_id, spec in raw_types.items():
        where = f"types.{type_id}"
        if not isinstance(spec, dict):
            problems.append(f"{where} must be a table")
            continue
        for key in spec:
            if key not in ("family", "external_id", "enabled"):
                problems.append(f"{where}: unknown key {key!r} (expected family, external_id, enabled)")
        enabled = spec.get("enabled", True)
        if not isinstance(enabled, bool):
            problems.append(f"{where}.enabled must be true or false")
            continue
        if not enabled:
            types.pop(type_id, None)
            continue
        current = types.get(type_id)
        family = spec.get("family", current.family if current else None)
        if not isinstance(family, str) or not family.strip("/"):
            problems.append(f"{where}.family must be a non-empty string such as 'product/category'")
            continue
        external_id = spec.get("external_id", current.external_id if current else "id")
        if external_id not in EXTERNAL_ID_CHOICES:
            problems.append(f"{where}.external_id must be one of {', '.join(EXTERNAL_ID_CHOICES)}")
            continue
        types[type_id] = TypeRoute(family.strip("/"), external_id)
    actions: dict[str, Action | None] = {}
    raw_messages = data.get("messages", {})
    if not isinstance(raw_messages, dict):
        problems.append("messages must be a table of message type = action")
        raw_messages = {}
    for message_type, action in raw_messages.items():
        if action == "ignore":
            actions[message_type] = None
        elif isinstance(action, str) and action in Action.__members__.values():
            actions[message_type] = Action(action)
        else:
            problems.append(f"messages.{message_type} must be created, updated, deleted or ignore")
    if problems:
        raise ScopeMapError(problems)
    return ScopeMap(types=types, message_actions=actions)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a change goes; ``fallback`` is True when the chosen identifier was missing (id used)."""

    family: str
    action: Action
    external_id: str
    fallback: bool = False

    def scope(self, debug: bool) -> str:
        scope = f"{self.family}/{self.action.value}"
        return f"{scope}/debug" if debug else scope

    def notification(self, debug: bool) -> Notification:
        return Notification(self.scope(debug), self.external_id)


@dataclass(frozen=True, slots=True)
class Ignored:
    reason: str


_ACTION_OF_KIND = {
    NotificationType.RESOURCE_CREATED: Action.CREATED,
    NotificationType.RESOURCE_UPDATED: Action.UPDATED,
    NotificationType.RESOURCE_DELETED: Action.DELETED,
}


def _pascal(type_id: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in type_id.split("-"))


class Router:
    """Route ChangeEvents with a scope map; pure and synchronous."""

    def __init__(self, scope_map: ScopeMap | None = None, ignore_client_ids: Collection[str] = ()) -> None:
        self.scope_map = scope_map or ScopeMap()
        self.ignore_client_ids = frozenset(ignore_client_ids)
        # Per-type message names are computed once: "inventory-entry" -> InventoryEntryCreated/Deleted.
        self._created = {t: _pascal(t) + "Created" for t in self.scope_map.types}
        self._deleted = {t: _pascal(t) + "Deleted" for t in self.scope_map.types}

    def action(self, event: ChangeEvent) -> Action | None:
        """Return the action a routed event means, or None when its message type is ignored."""
        by_kind = _ACTION_OF_KIND.get(event.kind)
        if by_kind is not None:
            return by_kind
        message_type = event.message_type or ""
        if message_type in self.scope_map.message_actions:
            return self.scope_map.message_actions[message_type]
        if message_type == self._created.get(event.resource_type) or message_type == "OrderImported":
            return Action.CREATED
        if message_type == self._deleted.get(event.resource_type):
            return Action.DELETED
        return Action.UPDATED

    def route(self, event: ChangeEvent) -> Route | Ignored:
        """Return where the event goes, or why it is not notified."""
        if event.resource_type == "subscription":
            return Ignored("subscription test notification")
        if event.kind is NotificationType.EVENT:
            return Ignored(f"beta Event notification {event.message_type!r} is not supported")
        if event.created_by_client_id is not None and event.created_by_client_id in self.ignore_client_ids:
            return Ignored("echo: changed by an ignored API client (IPAAS_IGNORE_CLIENT_IDS)")
        type_route = self.scope_map.types.get(event.resource_type)
        if type_route is None:
            return Ignored(f"unrouted resource type {event.resource_type!r}")
        action = self.action(event)
        if action is None:
            return Ignored(f"message type {event.message_type!r} is ignored by the scope map")
        if type_route.external_id == "id":
            return Route(type_route.family, action, event.resource_id)
        chosen = event.identifiers.get(type_route.external_id)
        if chosen:
            return Route(type_route.family, action, chosen)
        return Route(type_route.family, action, event.resource_id, fallback=True)
