"""The commercetools client against commercetools-mock (behind the test proxy, see ctmockserver.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from adapters.commercetools import AuthenticationError, CommercetoolsClient, CommercetoolsError
from tests.servers.ctmockserver import CtProxy, project_key

pytestmark = pytest.mark.integration

SCOPES = ["view_products", "view_categories", "manage_subscriptions", "view_project_settings"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def no_sleep(seconds: float) -> None:
    return None


def make_client(proxy: CtProxy, project: str, **options: Any) -> tuple[CommercetoolsClient, str]:
    client_id, secret = proxy.add_client([f"{s}:{project}" for s in SCOPES])
    client = CommercetoolsClient(
        project_key=project,
        api_url=proxy.url,
        auth_url=proxy.url,
        client_id=client_id,
        client_secret=secret,
        **{"sleep": no_sleep, **options},
    )
    return client, secret


async def test_token_is_fetched_once_and_cached(ct_proxy: CtProxy) -> None:
    project = project_key()
    client, _ = make_client(ct_proxy, project)
    async with client:
        assert (await client.get_project())["key"] == project
        await client.get_project()
        assert set(await client.granted_scopes()) == {f"{s}:{project}" for s in SCOPES}
    assert ct_proxy.token_requests == 1


async def test_concurrent_callers_share_one_refresh(ct_proxy: CtProxy) -> None:
    clock = FakeClock()
    client, _ = make_client(ct_proxy, project_key(), clock=clock)
    async with client:
        await asyncio.gather(*(client.get_project() for _ in range(20)))
        assert ct_proxy.token_requests == 1
        # Past half its life the token is refreshed, once, however many callers ask at the same time.
        clock.now += 172800 * 0.5 + 1
        await asyncio.gather(*(client.get_project() for _ in range(20)))
        assert ct_proxy.token_requests == 2
        clock.now += 60
        await client.get_project()
        assert ct_proxy.token_requests == 2


async def test_token_endpoint_outage_is_retried_and_a_valid_token_keeps_serving(ct_proxy: CtProxy) -> None:
    clock = FakeClock()
    client, _ = make_client(ct_proxy, project_key(), clock=clock, attempts=2)
    async with client:
        ct_proxy.token_faults.push(503)
        await client.get_project()
        assert ct_proxy.token_requests == 2
        # Due for refresh but the auth server is down: the token has not expired, so it still serves.
        clock.now += 172800 * 0.75
        ct_proxy.token_faults.push(503, times=2)
        await client.get_project()
        assert ct_proxy.token_requests == 4
        # Once it has expired, the outage surfaces.
        clock.now += 172800 * 0.5
        ct_proxy.token_faults.push(503, times=2)
        with pytest.raises(AuthenticationError) as caught:
            await client.get_project()
    assert caught.value.status == 503


async def test_short_lived_token_is_refreshed_before_it_expires(
    ct_proxy_factory: Callable[..., CtProxy],
) -> None:
    proxy = ct_proxy_factory(token_lifetime=1.0)
    client, _ = make_client(proxy, project_key())
    async with client:
        for _ in range(4):
            await client.get_project()
            await asyncio.sleep(0.35)
    # Refreshed at half-life: no request ever met an expired token.
    assert proxy.token_requests >= 2
    assert all(seen.status == 200 for seen in proxy.api_requests())


async def test_invalid_credentials_raise_invalid_client_without_the_secret(ct_proxy: CtProxy) -> None:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"view_products:{project}"])
    wrong = secret + "x"
    client = CommercetoolsClient(
        project_key=project,
        api_url=ct_proxy.url,
        auth_url=ct_proxy.url,
        client_id=client_id,
        client_secret=wrong,
    )
    async with client:
        with pytest.raises(AuthenticationError) as caught:
            await client.get_project()
    assert caught.value.status == 401 and "invalid_client" in caught.value.codes
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)
    assert ct_proxy.api_requests() == []


async def test_unknown_scope_is_invalid_scope(ct_proxy: CtProxy) -> None:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"view_products:{project}"])
    client = CommercetoolsClient(
        project_key=project,
        api_url=ct_proxy.url,
        auth_url=ct_proxy.url,
        client_id=client_id,
        client_secret=secret,
        scopes=[f"view_orders:{project}"],
    )
    async with client:
        with pytest.raises(AuthenticationError) as caught:
            await client.granted_scopes()
    assert caught.value.status == 400 and caught.value.codes[0] == "invalid_scope"


async def test_revoked_token_mid_stream_refreshes_once_and_retries(ct_proxy: CtProxy) -> None:
    project = project_key()
    client, _ = make_client(ct_proxy, project)
    async with client:
        for i in range(7):
            await client.request(
                "POST", "/categories", body={"name": {"en": f"c{i}"}, "slug": {"en": f"c{i}"}}
            )
        pages: list[list[dict[str, Any]]] = []
        async for page in client.query_pages("categories", limit=3):
            pages.append(page)
            if len(pages) == 1:
                ct_proxy.revoke_tokens()
    ids = [resource["id"] for page in pages for resource in page]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert ids == sorted(ids) and len(set(ids)) == 7
    assert ct_proxy.token_requests == 2
    assert [s.status for s in ct_proxy.api_requests()].count(401) == 1


async def test_query_pages_with_where(ct_proxy: CtProxy) -> None:
    client, _ = make_client(ct_proxy, project_key())
    async with client:
        for key in ("a1", "a2", "b1"):
            await client.request(
                "POST", "/categories", body={"key": key, "name": {"en": key}, "slug": {"en": key}}
            )
        found = [
            r["key"] async for page in client.query_pages("categories", where='key != "b1"') for r in page
        ]
    assert sorted(found) == ["a1", "a2"]


async def test_502_and_503_are_retried_then_surface_with_codes(ct_proxy: CtProxy) -> None:
    client, _ = make_client(ct_proxy, project_key(), attempts=3)
    async with client:
        ct_proxy.faults.push(502)
        ct_proxy.faults.push(503)
        assert (await client.get_project())["version"] >= 1
        ct_proxy.faults.push(503, times=3)
        with pytest.raises(CommercetoolsError) as caught:
            await client.get_project()
    assert caught.value.status == 503 and caught.value.codes == ("OverCapacity",)
    assert caught.value.correlation_id and caught.value.correlation_id.startswith("ctsync-")


async def test_subscription_create_read_update_and_not_found(ct_proxy: CtProxy) -> None:
    client, _ = make_client(ct_proxy, project_key())
    draft = {
        "key": "ctsync-test",
        "destination": {"type": "GoogleCloudPubSub", "projectId": "gcp", "topic": "ct"},
        "changes": [{"resourceTypeId": "product"}],
    }
    async with client:
        assert await client.get_subscription("ctsync-test") is None
        created = await client.create_subscription(draft)
        fetched = await client.get_subscription("ctsync-test")
        assert fetched is not None and fetched["id"] == created["id"]
        updated = await client.update_subscription(
            "ctsync-test",
            created["version"],
            [{"action": "setChanges", "changes": [{"resourceTypeId": "order"}]}],
        )
        assert updated["changes"] == [{"resourceTypeId": "order"}]
        with pytest.raises(CommercetoolsError) as caught:
            await client.update_subscription(
                "ctsync-test", created["version"], [{"action": "setChanges", "changes": []}]
            )
    assert caught.value.status == 409 and "ConcurrentModification" in caught.value.codes


async def test_insufficient_scope_is_403_with_its_code(ct_proxy: CtProxy) -> None:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"view_products:{project}"])
    client = CommercetoolsClient(
        project_key=project,
        api_url=ct_proxy.url,
        auth_url=ct_proxy.url,
        client_id=client_id,
        client_secret=secret,
    )
    async with client:
        with pytest.raises(CommercetoolsError) as caught:
            await client.get_project()
    assert caught.value.status == 403 and caught.value.codes == ("insufficient_scope",)
    assert f"/{project}" in str(caught.value) and "insufficient_scope" in str(caught.value)


async def test_revoked_token_with_concurrent_callers_refreshes_once(ct_proxy: CtProxy) -> None:
    client, _ = make_client(ct_proxy, project_key())
    async with client:
        await client.get_project()
        ct_proxy.revoke_tokens()
        await asyncio.gather(*(client.get_project() for _ in range(10)))
    assert ct_proxy.token_requests == 2


async def test_connection_failure_of_a_read_is_retried_then_reported() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/oauth/token":
            return httpx.Response(200, content=orjson.dumps({"access_token": "t", "expires_in": 3600}))
        raise httpx.ConnectError("refused")

    client = CommercetoolsClient(
        project_key="p",
        api_url="https://api.example.test",
        auth_url="https://auth.example.test",
        client_id="id",
        client_secret="very-secret-value",
        attempts=3,
        transport=httpx.MockTransport(handler),
        sleep=no_sleep,
    )
    async with client:
        with pytest.raises(CommercetoolsError) as caught:
            await client.get_project()
    assert caught.value.status is None and calls.count("/p") == 3
    assert "very-secret-value" not in str(caught.value)
