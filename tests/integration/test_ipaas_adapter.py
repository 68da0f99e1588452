"""The hook client against the real test hook server over loopback, and Retry-After parsing."""

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
import pytest_asyncio

from adapters.ipaas import DETAIL_LIMIT, HttpHookSink, parse_retry_after
from consumer import audit
from consumer.dry_run import DryRunSink
from consumer.ports import HookResponse, Sink
from consumer.routing import Notification
from tests.servers.hookserver import (
    Fault,
    HookServer,
    hook_server_factory_fixture,  # noqa: F401
    hook_server_fixture,  # noqa: F401
)

Factory = Callable[..., HookServer]
BATCH = [Notification("product/updated", "p-1"), Notification("customer/created", "c-1")]


@pytest_asyncio.fixture(loop_scope="function")  # the tests' loop: the pool's connections belong to it
async def sink(hook_server: HookServer) -> AsyncIterator[HttpHookSink]:
    s = HttpHookSink(hook_server.url, hook_server.api_key, timeout=2.0)
    yield s
    await s.close()


def secret_free(server: HookServer, sink: HttpHookSink, *responses: HookResponse) -> bool:
    texts = [repr(sink), str(sink), *(r.detail for r in responses), *(repr(r) for r in responses)]
    return not any(server.api_key in text for text in texts)


async def test_request_shape_and_headers(hook_server: HookServer, sink: HttpHookSink) -> None:
    cid = str(uuid.uuid4())
    response = await sink.send(BATCH, cid)
    assert response.status == 200 and response.detail == "" and response.retry_after is None
    assert response.duration_ms > 0
    [record] = hook_server.requests
    request = record.request
    assert request.method == "POST" and request.path == "/hooks/ctsync"
    assert request.header("authorization") == f"Bearer {hook_server.api_key}"
    assert request.header("content-type") == "application/json"
    assert request.header("x-correlation-id") == cid
    assert (request.header("user-agent") or "").startswith("ctsync/")
    assert orjson.loads(request.body) == {
        "notifications": [
            {"scope": "product/updated", "external_id": "p-1"},
            {"scope": "customer/created", "external_id": "c-1"},
        ]
    }
    assert hook_server.notifications == [("product/updated", "p-1"), ("customer/created", "c-1")]


async def test_each_call_sends_the_callers_correlation_id(
    hook_server: HookServer, sink: HttpHookSink
) -> None:
    cids = [str(uuid.uuid4()) for _ in range(3)]
    for cid in cids:
        assert (await sink.send(BATCH[:1], cid)).status == 200
    assert hook_server.correlation_ids == cids
    assert hook_server.peak_connections == 1  # keep-alive


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_success_statuses_are_reported(hook_server_factory: Factory, status: int) -> None:
    server = hook_server_factory(status=status)
    sink = HttpHookSink(server.url, server.api_key, timeout=2.0)
    try:
        response = await sink.send(BATCH, "cid")
    finally:
        await sink.close()
    assert response.status == status and response.detail == ""


async def test_429_with_retry_after_seconds(hook_server: HookServer, sink: HttpHookSink) -> None:
    hook_server.faults.push(Fault.status(429, retry_after=7))
    response = await sink.send(BATCH, "cid")
    assert response.status == 429 and response.retry_after == 7.0
    assert "injected fault" in response.detail


async def test_429_with_retry_after_http_date(hook_server: HookServer, sink: HttpHookSink) -> None:
    hook_server.faults.push(Fault.status(429, retry_after=5, http_date=True))
    response = await sink.send(BATCH, "cid")
    assert response.status == 429
    assert response.retry_after is not None and 4.0 <= response.retry_after <= 6.0


async def test_429_with_a_past_date_or_garbage(hook_server: HookServer, sink: HttpHookSink) -> None:
    hook_server.faults.push(
        Fault.status(429, retry_after=datetime(2000, 1, 1, tzinfo=UTC)),
        Fault.status(429, retry_after="soon"),
        Fault.status(429),
    )
    # A past date says nothing about how long to wait: the pipeline's backoff decides, never "now".
    assert [(await sink.send(BATCH, "c")).retry_after for _ in range(3)] == [None, None, None]


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_reported(hook_server: HookServer, sink: HttpHookSink, status: int) -> None:
    hook_server.faults.push(Fault.status(status, body=f"upstream said {status}\n  try later"))
    response = await sink.send(BATCH, "cid")
    assert response.status == status and response.detail == f"upstream said {status} try later"
    assert hook_server.notifications == []


async def test_error_detail_is_a_short_snippet(hook_server: HookServer, sink: HttpHookSink) -> None:
    hook_server.faults.push(Fault.status(500, body="x" * 10_000), Fault.status(503, body=""))
    long = await sink.send(BATCH, "cid")
    assert long.status == 500 and len(long.detail) <= DETAIL_LIMIT and long.detail.startswith("xxx")
    empty = await sink.send(BATCH, "cid")
    assert empty.status == 503 and empty.detail == "Service Unavailable"
    assert (await sink.send(BATCH, "cid")).status == 200  # the pool survived the unread body


async def test_rejected_notification_is_reported_with_its_id(
    hook_server: HookServer, sink: HttpHookSink
) -> None:
    hook_server.reject("c-1", status=422)
    response = await sink.send(BATCH, "cid")
    assert response.status == 422 and "c-1" in response.detail


async def test_slow_response_is_a_timeout(hook_server: HookServer) -> None:
    hook_server.faults.push(Fault.delay(1.0))
    sink = HttpHookSink(hook_server.url, hook_server.api_key, timeout=0.2)
    try:
        response = await sink.send(BATCH, "cid")
    finally:
        await sink.close()
    assert response.status is None and response.detail.startswith("timeout:")
    assert 150 <= response.duration_ms < 900


async def test_dropped_connection_is_reported(hook_server: HookServer, sink: HttpHookSink) -> None:
    hook_server.faults.push(Fault.drop())
    response = await sink.send(BATCH, "cid")
    assert response.status is None
    assert response.detail.startswith(("protocol:", "connection:")), response.detail
    assert (await sink.send(BATCH, "cid")).status == 200


async def test_refused_connection_is_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = HttpHookSink(f"http://127.0.0.1:{port}/hooks", "k3y-value", timeout=2.0)
    try:
        response = await sink.send(BATCH, "cid")
    finally:
        await sink.close()
    assert response.status is None and response.detail.startswith("connection: ConnectError")
    assert "k3y-value" not in response.detail


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_are_reported(hook_server: HookServer, sink: HttpHookSink, status: int) -> None:
    hook_server.faults.push(Fault.status(status))
    assert (await sink.send(BATCH, "cid")).status == status


async def test_wrong_key_is_a_401_and_no_key_leaks(hook_server: HookServer) -> None:
    sink = HttpHookSink(hook_server.url, "wrong-" + hook_server.api_key, timeout=2.0)
    try:
        response = await sink.send(BATCH, "cid")
    finally:
        await sink.close()
    assert response.status == 401
    assert "wrong-" not in response.detail and "wrong-" not in repr(sink)


async def test_the_key_never_appears_in_details_or_reprs(hook_server: HookServer, sink: HttpHookSink) -> None:
    # A server that echoes the Authorization header back in its error body.
    echo = f'{{"error": "bad token", "authorization": "Bearer {hook_server.api_key}"}}'
    hook_server.faults.push(
        Fault.status(400, body=echo), Fault.status(503, retry_after=1), Fault.drop(), Fault.delay(5)
    )
    responses = [await sink.send(BATCH, "cid") for _ in range(3)]
    quick = HttpHookSink(hook_server.url, hook_server.api_key, timeout=0.1)
    try:
        responses.append(await quick.send(BATCH, "cid"))
    finally:
        await quick.close()
    assert audit.REDACTED in responses[0].detail
    assert secret_free(hook_server, sink, *responses) and secret_free(hook_server, quick)
    assert hook_server.api_key not in repr(vars(sink)) and hook_server.api_key not in repr(
        sink._client.headers
    )


async def test_max_connections_bounds_requests_in_flight(hook_server: HookServer) -> None:
    hook_server.faults.always = Fault.delay(0.1)
    sink = HttpHookSink(hook_server.url, hook_server.api_key, timeout=3.0, max_connections=2)
    try:
        responses = await asyncio.gather(*(sink.send(BATCH, f"c{i}") for i in range(6)))
    finally:
        await sink.close()
    assert [r.status for r in responses] == [200] * 6
    assert hook_server.peak_in_flight == 2 and hook_server.peak_connections == 2


async def test_a_custom_transport_replaces_the_network() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202)

    sink = HttpHookSink("https://hooks.example/h", "key", transport=httpx.MockTransport(answer))
    response = await sink.send(BATCH[:1], "cid")
    await sink.close()
    assert response.status == 202 and seen[0].headers["authorization"] == "Bearer key"
    assert seen[0].content == b'{"notifications":[{"scope":"product/updated","external_id":"p-1"}]}'


async def test_mock_transport_errors_become_status_none() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    sink = HttpHookSink("https://hooks.example/h", "key", transport=httpx.MockTransport(fail))
    response = await sink.send(BATCH, "cid")
    await sink.close()
    assert response == HookResponse(None, response.duration_ms, None, "timeout: ReadTimeout")


async def test_empty_batches_and_bad_settings_are_refused() -> None:
    sink = HttpHookSink("http://127.0.0.1:9/h", "key")
    with pytest.raises(ValueError):
        await sink.send([], "cid")
    await sink.close()
    for url in ("ftp://x/h", "/relative"):
        with pytest.raises(ValueError):
            HttpHookSink(url, "key")


async def test_both_sinks_implement_the_port() -> None:
    sinks: list[Sink] = [DryRunSink(lambda **fields: None), HttpHookSink("http://127.0.0.1:9/h", "key")]
    for s in sinks:
        await s.close()


async def test_dry_run_logs_and_answers_200() -> None:
    logged: list[dict[str, object]] = []
    sink = DryRunSink(lambda **fields: logged.append(fields))
    response = await sink.send(BATCH, "cid-9")
    assert response == HookResponse(status=200, detail="dry run", dry_run=True)
    assert logged == [
        {
            "notifications": [
                {"scope": "product/updated", "external_id": "p-1"},
                {"scope": "customer/created", "external_id": "c-1"},
            ],
            "correlation_id": "cid-9",
        }
    ]


# parse_retry_after

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", None),
        ("5", 5.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-3", None),
        ("-1", None),
        ("0.0", None),
        ("soon", None),
        ("5s", None),
        ("inf", None),
        ("nan", None),
        ("1e3", None),
        ("Sun, 01 Mar 2026 12:00:30 GMT", 30.0),
        ("Sun, 01 Mar 2026 11:59:00 GMT", None),
        ("Sun, 01 Mar 2026 12:01:00 +0100", None),
        ("Sun, 01 Mar 2026 14:00:10 +0200", 10.0),
        ("Sun, 01 Mar 2026 12:00:05 -0000", 5.0),
        ("Sunday, 01-Mar-26 12:00:20 GMT", 20.0),
        ("Sun Mar  1 12:00:40 2026", 40.0),
        ("Xyz, 99 Foo 2026 99:99:99 GMT", None),
        ("Sun, 01 Mar 99999 12:00:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_defaults_to_now_and_accepts_a_naive_now() -> None:
    header = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = parse_retry_after(header)
    assert seconds is not None and 28 <= seconds <= 30
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:30 GMT", NOW.replace(tzinfo=None)) == 30.0
