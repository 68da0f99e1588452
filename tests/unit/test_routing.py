from pathlib import Path

import pytest

from consumer.messages import ChangeEvent, NotificationType
from consumer.routing import (
    Action,
    Ignored,
    Route,
    Router,
    ScopeMapError,
    load_scope_map,
    scope_map_from_dict,
)

M = NotificationType.MESSAGE


def event(
    resource_type: str = "product", kind: NotificationType = M, message_type: str | None = None, **kw: object
) -> ChangeEvent:
    return ChangeEvent(
        kind=kind,
        resource_type=resource_type,
        resource_id="rid-1",
        version=3,
        message_type=message_type,
        message_id="mid" if kind is M else None,
        **kw,
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("resource_type", "family"),
    [
        ("product", "product"),
        ("category", "product/category"),
        ("customer", "customer"),
        ("customer-group", "customer/category"),
        ("business-unit", "customer/company"),
        ("order", "transaction"),
        ("inventory-entry", "product/inventory"),
    ],
)
def test_default_families(resource_type: str, family: str) -> None:
    route = Router().route(event(resource_type, NotificationType.RESOURCE_UPDATED))
    assert route == Route(family, Action.UPDATED, "rid-1")
    assert route.notification(debug=False).scope == f"{family}/updated"


@pytest.mark.parametrize(
    ("kind", "action"),
    [
        (NotificationType.RESOURCE_CREATED, Action.CREATED),
        (NotificationType.RESOURCE_UPDATED, Action.UPDATED),
        (NotificationType.RESOURCE_DELETED, Action.DELETED),
    ],
)
def test_change_actions(kind: NotificationType, action: Action) -> None:
    route = Router().route(event(kind=kind))
    assert isinstance(route, Route) and route.action is action


@pytest.mark.parametrize(
    ("resource_type", "message_type", "action"),
    [
        ("product", "ProductCreated", Action.CREATED),
        ("product", "ProductDeleted", Action.DELETED),
        ("product", "ProductVariantDeleted", Action.UPDATED),
        ("product", "ProductPublished", Action.UPDATED),
        ("product", "ProductUnpublished", Action.UPDATED),
        ("order", "OrderCreated", Action.CREATED),
        ("order", "OrderImported", Action.CREATED),
        ("order", "OrderStateChanged", Action.UPDATED),
        ("order", "OrderDeleted", Action.DELETED),
        ("inventory-entry", "InventoryEntryCreated", Action.CREATED),
        ("inventory-entry", "InventoryEntryDeleted", Action.DELETED),
        ("inventory-entry", "InventoryEntryQuantitySet", Action.UPDATED),
        ("business-unit", "BusinessUnitCreated", Action.CREATED),
        ("customer", "CustomerGroupSet", Action.UPDATED),
        # Exactly <Resource>Created: another resource's creation message is an update of this one.
        ("order", "ProductCreated", Action.UPDATED),
    ],
)
def test_message_actions(resource_type: str, message_type: str, action: Action) -> None:
    route = Router().route(event(resource_type, message_type=message_type))
    assert isinstance(route, Route) and route.action is action


def test_ignored_reasons() -> None:
    router = Router(ignore_client_ids={"ipaas-client"})
    assert router.route(event("subscription", NotificationType.RESOURCE_CREATED)) == Ignored(
        "subscription test notification"
    )
    beta = router.route(event(kind=NotificationType.EVENT, message_type="ImportContainerCreated"))
    assert isinstance(beta, Ignored) and "beta Event" in beta.reason
    echo = router.route(event(message_type="ProductPublished", created_by_client_id="ipaas-client"))
    assert isinstance(echo, Ignored) and "echo" in echo.reason
    assert isinstance(
        router.route(event(message_type="ProductPublished", created_by_client_id="other")), Route
    )
    unrouted = router.route(event("payment", NotificationType.RESOURCE_UPDATED))
    assert unrouted == Ignored("unrouted resource type 'payment'")


def test_debug_scope() -> None:
    route = Router().route(event(kind=NotificationType.RESOURCE_DELETED))
    assert isinstance(route, Route)
    assert route.notification(debug=True).as_json() == {
        "scope": "product/deleted/debug",
        "external_id": "rid-1",
    }


def test_scope_map_overrides(tmp_path: Path) -> None:
    path = tmp_path / "map.toml"
    path.write_text(
        """
[types.product]
external_id = "key"
[types.order]
family = "transaction"
external_id = "orderNumber"
[types.payment]
family = "transaction/payment"
[types.category]
enabled = false
[messages]
ProductUnpublished = "deleted"
ProductPriceChanged = "ignore"
"""
    )
    router = Router(load_scope_map(path))
    keyed = router.route(event(message_type="ProductPublished", identifiers={"key": "shoe-1"}))
    assert keyed == Route("product", Action.UPDATED, "shoe-1")
    fallback = router.route(event(message_type="ProductPublished"))
    assert fallback == Route("product", Action.UPDATED, "rid-1", fallback=True)
    order = router.route(event("order", message_type="OrderCreated", identifiers={"orderNumber": "ORD-1"}))
    assert order == Route("transaction", Action.CREATED, "ORD-1")
    assert router.route(event("payment", NotificationType.RESOURCE_CREATED)) == Route(
        "transaction/payment", Action.CREATED, "rid-1"
    )
    assert isinstance(router.route(event("category", NotificationType.RESOURCE_CREATED)), Ignored)
    unpublished = router.route(event(message_type="ProductUnpublished"))
    assert isinstance(unpublished, Route) and unpublished.action is Action.DELETED
    price = router.route(event(message_type="ProductPriceChanged"))
    assert isinstance(price, Ignored) and "ProductPriceChanged" in price.reason
    # Untouched defaults stay.
    assert router.route(event("customer", NotificationType.RESOURCE_UPDATED)) == Route(
        "customer", Action.UPDATED, "rid-1"
    )


def test_scope_map_yaml(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("replace_defaults: true\ntypes:\n  order:\n    family: transaction\n")
    router = Router(load_scope_map(path))
    assert isinstance(router.route(event("product", NotificationType.RESOURCE_UPDATED)), Ignored)
    assert isinstance(router.route(event("order", NotificationType.RESOURCE_UPDATED)), Route)


def test_scope_map_problems_all_reported() -> None:
    with pytest.raises(ScopeMapError) as caught:
        scope_map_from_dict(
            {
                "types": {"product": {"external_id": "slug"}, "order": {"family": ""}, "x": {"colour": 1}},
                "messages": {"ProductPublished": "published"},
                "extra": 1,
            }
        )
    text = str(caught.value)
    assert len(caught.value.problems) == 6, text
    assert "types.product.external_id" in text and "types.order.family" in text
    assert "messages.ProductPublished" in text and "'extra'" in text and "'colour'" in text


def test_scope_map_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ScopeMapError, match="cannot read"):
        load_scope_map(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[types\n")
    with pytest.raises(ScopeMapError, match="not valid toml"):
        load_scope_map(bad)
