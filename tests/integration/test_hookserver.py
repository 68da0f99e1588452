"""The test hook server itself: contract checks, measurements, enforcement and faults, over real HTTP."""

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.ipaas import parse_retry_after
from tests.servers.hookserver import (
    Fault,
    HookServer,
    hook_server_factory_fixture,  # noqa: F401
    hook_server_fixture,  # noqa: F401
    max_in_window,
    parse_notifications,
)

Factory = Callable[..., HookServer]
BODY = {"notifications": [{"scope": "product/updated", "external_id": "p-1"}]}


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=5.0) as c:
        yield c


def post(
    client: httpx.Client,
    server: HookServer,
    body: object = BODY,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST like a well-behaved sender, with ``headers`` overriding (a None value removes one)."""
    sent = {
        "Authorization": f"Bearer {server.api_key if key is None else key}",
        "Content-Type": "application/json",
        "x-correlation-id": str(uuid.uuid4()),
    }
    sent.update(headers or {})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(server.url, content=content, headers={k: v for k, v in sent.items() if v})


def notes(*external_ids: str) -> dict[str, list[dict[str, str]]]:
    return {"notifications": [{"scope": "product/updated", "external_id": i} for i in external_ids]}


# the contract


def test_accepts_a_valid_request_and_records_it(hook_server: HookServer, client: httpx.Client) -> None:
    body = {
        "notifications": [
            {"scope": "product/updated", "external_id": "p-1"},
            {"scope": "customer/created", "external_id": "c-1"},
        ]
    }
    response = post(client, hook_server, body, headers={"x-correlation-id": "cid-1", "X-Extra": "yes"})
    assert response.status_code == 200 and response.json() == {"accepted": 2}
    assert hook_server.notifications == [("product/updated", "p-1"), ("customer/created", "c-1")]
    [record] = hook_server.requests
    assert record.status == 200 and record.reason == "accepted" and record.count == 2
    assert record.correlation_id == "cid-1" and record.request.path == "/hooks/ctsync"
    assert record.request.header("x-extra") == "yes"
    assert ("Authorization", f"Bearer {hook_server.api_key}") in record.headers
    assert record.request.body == json.dumps(body).encode()
    assert record.arrival <= record.finished and hook_server.arrivals == [record.arrival]
    assert hook_server.correlation_ids == ["cid-1"] and hook_server.statuses == [200]


def test_any_path_is_accepted_and_recorded(hook_server: HookServer, client: httpx.Client) -> None:
    url = hook_server.url.replace("/hooks/ctsync", "/other/path?x=1")
    response = client.post(
        url,
        content=json.dumps(BODY),
        headers={
            "Authorization": f"Bearer {hook_server.api_key}",
            "Content-Type": "application/json; charset=utf-8",
            "x-correlation-id": "c",
        },
    )
    assert response.status_code == 200
    assert hook_server.requests[0].request.path == "/other/path?x=1"


@pytest.mark.parametrize("status", [200, 202, 204])
def test_success_status_is_configurable(
    hook_server_factory: Factory, client: httpx.Client, status: int
) -> None:
    server = hook_server_factory(status=status)
    response = post(client, server)
    assert response.status_code == status
    assert (response.content == b"") if status == 204 else response.json() == {"accepted": 1}
    assert server.notifications == [("product/updated", "p-1")]


def test_bearer_key_is_checked(hook_server_factory: Factory, client: httpx.Client) -> None:
    server = hook_server_factory(api_key="s3cret")
    assert server.api_key == "s3cret"
    assert post(client, server, key="wrong").status_code == 401
    missing = post(client, server, headers={"Authorization": ""})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert "error" in missing.json()
    assert post(client, server, headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert post(client, server, headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert server.notifications == [("product/updated", "p-1")]
    assert server.statuses == [401, 401, 401, 200]


def test_the_default_key_is_random(hook_server_factory: Factory) -> None:
    assert hook_server_factory().api_key != hook_server_factory().api_key


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        (BODY, {"Content-Type": "text/plain"}, 415, "Content-Type"),
        (BODY, {"Content-Type": ""}, 415, "Content-Type"),
        (b"{not json", {}, 400, "not JSON"),
        ([1, 2], {}, 400, "JSON object"),
        ({}, {}, 400, "notifications must be an array"),
        ({"notifications": {}}, {}, 400, "notifications must be an array"),
        ({"notifications": []}, {}, 400, "empty"),
        ({"notifications": ["x"]}, {}, 400, "notifications[0] must be an object"),
        ({"notifications": [{"external_id": "a"}]}, {}, 400, "notifications[0].scope"),
        ({"notifications": [{"scope": "product/updated", "external_id": 7}]}, {}, 400, "external_id"),
        ({"notifications": [{"scope": "", "external_id": "a"}]}, {}, 400, "scope"),
        (notes("a") | {"extra": 1}, {}, 400, "unknown top-level"),
        ({"notifications": [{"scope": "s/u", "external_id": "a", "id": 1}]}, {}, 400, "unknown field"),
        (BODY, {"x-correlation-id": ""}, 400, "x-correlation-id"),
    ],
)
def test_malformed_requests_get_a_json_error(
    hook_server: HookServer,
    client: httpx.Client,
    body: object,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    response = post(client, hook_server, body, headers=headers)
    assert response.status_code == status
    assert error in response.json()["error"]
    assert hook_server.notifications == []


def test_correlation_id_can_be_optional(hook_server_factory: Factory, client: httpx.Client) -> None:
    server = hook_server_factory(require_correlation_id=False)
    assert post(client, server, headers={"x-correlation-id": ""}).status_code == 200
    assert server.correlation_ids == [None]


def test_other_methods_get_405(hook_server: HookServer, client: httpx.Client) -> None:
    response = client.get(hook_server.url)
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert client.put(hook_server.url, content=b"{}").status_code == 405
    assert hook_server.statuses == [405, 405]


def test_chunked_bodies_are_read(hook_server: HookServer, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"notifications": [{"scope": "product/updated", '
        yield b'"external_id": "p-9"}]}'

    response = client.post(
        hook_server.url,
        content=chunks(),
        headers={
            "Authorization": f"Bearer {hook_server.api_key}",
            "Content-Type": "application/json",
            "x-correlation-id": "c",
        },
    )
    assert response.status_code == 200
    assert hook_server.requests[0].request.header("transfer-encoding") == "chunked"
    assert hook_server.notifications == [("product/updated", "p-9")]


def test_keep_alive_reuses_one_connection(hook_server: HookServer, client: httpx.Client) -> None:
    for _ in range(5):
        assert post(client, hook_server).status_code == 200
    assert hook_server.peak_connections == 1 and hook_server.request_count == 5


def test_parse_notifications_keeps_the_well_formed_ones() -> None:
    found, problem = parse_notifications(
        b'{"notifications": [{"scope": "a/b", "external_id": "1"}, {"scope": 3},'
        b' {"scope": "c/d", "external_id": "2"}]}'
    )
    assert (
        found == (("a/b", "1"), ("c/d", "2"))
        and problem == "notifications[1].scope must be a non-empty string"
    )


# measurements


def test_max_in_window_on_synthetic_sequences() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([5.0], 1.0) == 1
    assert max_in_window([0.0, 0.1, 0.2], 1.0) == 3
    # Exactly one window apart is not in the same window.
    assert max_in_window([0.0, 1.0, 2.0, 3.0], 1.0) == 1
    assert max_in_window([0.0, 0.5, 1.0, 1.5], 1.0) == 2
    assert max_in_window([0.0, 0.99, 1.0, 1.98, 2.5], 1.0) == 3
    # A burst straddling a fixed-window boundary: 2 per fixed second, 4 in a moving one.
    assert max_in_window([0.1, 0.8, 0.9, 1.1, 1.2, 2.5], 1.0) == 4
    assert max_in_window([3.0, 0.0, 2.9, 0.1], 1.0) == 2
    assert max_in_window([0.0, 59.9, 60.0, 60.1], 60.0) == 3
    with pytest.raises(ValueError):
        max_in_window([1.0], 0)


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=40), st.floats(0.01, 50))
def test_max_in_window_matches_brute_force(times: list[float], seconds: float) -> None:
    brute = max((sum(1 for u in times if t <= u < t + seconds) for t in times), default=0)
    assert max_in_window(times, seconds) == brute


def test_max_in_window_counts_real_arrivals(hook_server: HookServer, client: httpx.Client) -> None:
    for _ in range(4):
        post(client, hook_server)
    assert hook_server.max_in_window(60) == 4
    assert hook_server.max_in_window(60, where=lambda r: r.status == 200) == 4
    assert hook_server.max_in_window(1e-9) == 1
    assert hook_server.max_in_window(60, where=lambda r: r.status == 500) == 0


def test_peak_in_flight_with_concurrent_slow_requests(hook_server: HookServer) -> None:
    hook_server.faults.always = Fault.delay(0.3)

    def one(_: int) -> int:
        with httpx.Client(trust_env=False, timeout=5.0) as c:
            return post(c, hook_server).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [200] * 4
    assert hook_server.peak_in_flight == 4 and hook_server.in_flight == 0
    assert hook_server.peak_connections == 4
    hook_server.faults.always = None
    with httpx.Client(trust_env=False) as c:
        for _ in range(3):
            post(c, hook_server)
    assert hook_server.peak_in_flight == 4
    hook_server.reset()
    assert hook_server.peak_in_flight == 0 and hook_server.requests == [] and hook_server.request_count == 0


def test_sequential_requests_never_overlap(hook_server: HookServer, client: httpx.Client) -> None:
    """A client that sends its next request as soon as it has an answer is measured at 1 in flight."""
    for _ in range(30):
        post(client, hook_server)
    assert hook_server.peak_in_flight == 1


# enforcement


def test_window_limit_is_enforced(hook_server_factory: Factory, client: httpx.Client) -> None:
    server = hook_server_factory(limit=2, window_seconds=0.3, retry_after_on_429=True)
    statuses = [post(client, server).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert server.window_violations == 1 and server.violations == 1
    last = server.requests[-1]
    assert last.reason == "throttled: window" and ("Retry-After", "1") in last.response_headers
    # Requests answered 429 do not use the window up, so it frees once the admitted ones are old enough.
    server.wait_for(lambda: post(client, server).status_code == 200, timeout=3, what="the window to free")
    assert server.max_in_window(0.3, where=lambda r: r.accepted) <= 2


def test_concurrency_limit_is_enforced(hook_server_factory: Factory) -> None:
    server = hook_server_factory(max_concurrent=2)
    server.faults.always = Fault.delay(0.3)

    def one(_: int) -> int:
        with httpx.Client(trust_env=False, timeout=5.0) as c:
            return post(c, server).status_code

    with ThreadPoolExecutor(3) as pool:
        statuses = sorted(pool.map(one, range(3)))
    assert statuses == [200, 200, 429]
    assert server.concurrency_violations == 1 and server.window_violations == 0


def test_env_names_the_server_and_its_limits(hook_server_factory: Factory) -> None:
    server = hook_server_factory(limit=5, window_seconds=1.5, max_concurrent=2)
    assert server.env() == {
        "IPAAS_HOOK_URL": server.url,
        "IPAAS_WEBHOOK_API_KEY": server.api_key,
        "IPAAS_THROTTLE_LIMIT": "5",
        "IPAAS_THROTTLE_SECONDS": "1.5",
        "IPAAS_CONCURRENT_CONNECTIONS": "2",
    }
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/hooks/ctsync")


# faults


def test_429_with_retry_after_seconds(hook_server: HookServer, client: httpx.Client) -> None:
    hook_server.faults.push(Fault.status(429, retry_after=2))
    response = post(client, hook_server)
    assert response.status_code == 429 and response.headers["Retry-After"] == "2"
    assert hook_server.notifications == [] and hook_server.requests[0].reason == "fault"
    assert post(client, hook_server).status_code == 200


def test_429_with_retry_after_http_date(hook_server: HookServer, client: httpx.Client) -> None:
    hook_server.faults.push(Fault.status(429, retry_after=3, http_date=True))
    hook_server.faults.push(Fault.status(429, retry_after=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)))
    header = post(client, hook_server).headers["Retry-After"]
    assert header.endswith(" GMT")
    seconds = parse_retry_after(header)
    assert seconds is not None and 2 <= seconds <= 4
    assert post(client, hook_server).headers["Retry-After"] == "Wed, 02 Jan 2030 03:04:05 GMT"


def test_429_without_retry_after(hook_server: HookServer, client: httpx.Client) -> None:
    hook_server.faults.push(Fault.status(429))
    response = post(client, hook_server)
    assert response.status_code == 429 and "Retry-After" not in response.headers


@pytest.mark.parametrize("status", [500, 502, 503, 401, 403])
def test_status_faults(hook_server: HookServer, client: httpx.Client, status: int) -> None:
    hook_server.faults.push(Fault.status(status))
    response = post(client, hook_server)
    assert response.status_code == status and response.json() == {"error": "injected fault", "status": status}
    assert hook_server.notifications == []


def test_a_fault_can_carry_its_own_body_and_headers(hook_server: HookServer, client: httpx.Client) -> None:
    hook_server.faults.push(Fault.status(502, body="<html>Bad gateway</html>", headers=[("X-Why", "lb")]))
    response = post(client, hook_server)
    assert response.text == "<html>Bad gateway</html>" and response.headers["X-Why"] == "lb"
    assert response.headers["Content-Type"].startswith("text/plain")


def test_delay_slows_the_answer(hook_server: HookServer, client: httpx.Client) -> None:
    hook_server.faults.push(Fault.delay(0.3))
    started = time.monotonic()
    assert post(client, hook_server).status_code == 200
    assert time.monotonic() - started >= 0.3
    record = hook_server.requests[0]
    assert record.finished - record.arrival >= 0.3 and record.accepted
    hook_server.faults.push(Fault.delay(0.05, then=Fault.status(503)))
    assert post(client, hook_server).status_code == 503


def test_a_slow_answer_times_the_client_out(hook_server: HookServer) -> None:
    hook_server.faults.push(Fault.delay(0.3))
    with httpx.Client(trust_env=False, timeout=0.1) as c, pytest.raises(httpx.ReadTimeout):
        post(c, hook_server)
    # The server still accepts it, like a real one would: the sender cannot know.
    hook_server.wait_for_notifications(1, timeout=3)


def test_drop_closes_without_an_answer(hook_server: HookServer, client: httpx.Client) -> None:
    hook_server.faults.push(Fault.drop())
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, hook_server)
    [record] = hook_server.wait_for_requests(1)
    assert record.status is None and record.reason == "fault: dropped" and record.count == 1
    assert hook_server.notifications == []
    assert post(client, hook_server).status_code == 200


@pytest.mark.parametrize("status", [400, 422])
def test_rejected_external_ids(hook_server_factory: Factory, client: httpx.Client, status: int) -> None:
    server = hook_server_factory(reject_status=status)
    server.reject_external_ids = {"bad-1", "bad-2"}
    response = post(client, server, notes("ok-1", "bad-2", "ok-2"))
    assert response.status_code == status
    assert response.json()["rejected"] == [{"scope": "product/updated", "external_id": "bad-2"}]
    assert "bad-2" in response.json()["error"]
    assert post(client, server, notes("ok-1", "ok-2")).status_code == 200
    assert server.notifications == [("product/updated", "ok-1"), ("product/updated", "ok-2")]
    server.reject("ok-1", status=400)
    assert post(client, server, notes("ok-1")).status_code == 400
    assert server.reject_external_ids == {"bad-1", "bad-2", "ok-1"}


def test_scripted_faults_come_in_order_then_rules_then_always(
    hook_server: HookServer, client: httpx.Client
) -> None:
    faults = hook_server.faults
    faults.push(Fault.status(503), times=2)
    faults.push(Fault.status(502), Fault.status(500))
    faults.when(lambda r: "p-7" in r.external_ids, Fault.status(422), times=1)
    faults.always = Fault.status(429)
    assert faults.pending == 4
    seen = [post(client, hook_server, notes("p-7")).status_code for _ in range(7)]
    assert seen == [503, 503, 502, 500, 422, 429, 429]
    faults.always = None
    assert post(client, hook_server).status_code == 200
    faults.when(lambda r: r.index % 2 == 0, Fault.status(500))
    assert [post(client, hook_server).status_code for _ in range(4)] == [500, 200, 500, 200]
    faults.clear()
    assert post(client, hook_server).status_code == 200 and faults.pending == 0


def test_faults_win_over_validation(hook_server: HookServer, client: httpx.Client) -> None:
    hook_server.faults.push(Fault.status(503))
    assert post(client, hook_server, key="wrong").status_code == 503
    assert post(client, hook_server, key="wrong").status_code == 401


# waiting and lifecycle


def test_wait_for_times_out_with_a_summary(hook_server: HookServer) -> None:
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"2 accepted notifications; server saw 0 requests"):
        hook_server.wait_for_notifications(2, timeout=0.1)
    assert time.monotonic() - started < 1


def test_wait_for_wakes_on_a_request(hook_server: HookServer, client: httpx.Client) -> None:
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(hook_server.wait_for_notifications, 1, 3.0)
        post(client, hook_server)
        assert pending.result(timeout=3) == [("product/updated", "p-1")]


async def test_wait_for_async_does_not_block_the_loop(hook_server: HookServer) -> None:
    async with httpx.AsyncClient(trust_env=False) as c:
        request = c.post(
            hook_server.url,
            json=BODY,
            headers={"Authorization": f"Bearer {hook_server.api_key}", "x-correlation-id": "c"},
        )
        response, notifications = await asyncio.gather(
            request, hook_server.wait_for_async(lambda: hook_server.notifications, timeout=3)
        )
    assert response.status_code == 200 and notifications == [("product/updated", "p-1")]


def test_stop_cuts_slow_answers_short_and_frees_the_port() -> None:
    server = HookServer().start()
    server.faults.always = Fault.delay(30)
    with ThreadPoolExecutor(1) as pool, httpx.Client(trust_env=False, timeout=10) as c:
        pending = pool.submit(post, c, server)
        server.wait_for(lambda: server.in_flight == 1, timeout=3)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
        with contextlib.suppress(httpx.TransportError):
            pending.result(timeout=5)
    with pytest.raises(httpx.ConnectError), httpx.Client(trust_env=False) as c:
        post(c, server)


def test_context_manager() -> None:
    with HookServer(api_key="k", status=202) as server, httpx.Client(trust_env=False) as c:
        assert post(c, server).status_code == 202
    assert "1 requests" in repr(server)
