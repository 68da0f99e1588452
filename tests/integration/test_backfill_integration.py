"""End to end: ``ctsync backfill`` / ``ctsync reconcile`` as subprocesses against commercetools-mock, holding
a few thousand resources created through its API, and the local iPaaS.com hook server counting what arrives.

ctsync reads through ``SortingFront`` (tests/servers/ctmockserver.py), which pages ``sort=id asc`` right
over any number of matches; the resources are created on the mock directly."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.servers.ctmockserver import CtMock, SortingFront
from tests.servers.hookserver import HookServer

pytestmark = pytest.mark.integration

CTSYNC = [sys.executable, "-m", "consumer.cli"]
COUNTS = {"product": 1000, "category": 400, "customer": 400, "order": 400}
SCOPE_MAP = """
[types.product]
external_id = "sku"
[types.category]
external_id = "key"
[types.customer]
external_id = "customerNumber"
[types.order]
external_id = "orderNumber"
"""
SCOPES = {
    "product": "product/created",
    "category": "product/category/created",
    "customer": "customer/created",
    "order": "transaction/created",
}
EXTERNAL_ID = {"product": "sku", "category": "key", "customer": "customerNumber", "order": "orderNumber"}


# ------------------------------------------------------------------------------------------- the data


@dataclass
class Project:
    """A commercetools-mock project and what was created in it, by type."""

    key: str
    url: str
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {
            "CTP_PROJECT_KEY": self.key,
            "CTP_CLIENT_ID": "backfill-tests",
            "CTP_CLIENT_SECRET": "backfill-secret-0123",
            "CTP_AUTH_URL": self.url,
            "CTP_API_URL": self.url,
        }

    def expected(self, types: tuple[str, ...] = tuple(COUNTS)) -> Counter[tuple[str, str]]:
        return Counter((SCOPES[t], external_id(t, r)) for t in types for r in self.resources.get(t, ()))


def external_id(type_id: str, resource: dict[str, Any]) -> str:
    if type_id == "product":
        return str(resource["masterData"]["staged"]["masterVariant"]["sku"])
    return str(resource[EXTERNAL_ID[type_id]])


def draft(type_id: str, n: int, product_type: str) -> tuple[str, dict[str, Any]]:
    tag = f"{n:05d}"
    if type_id == "product":
        return "products", {
            "productType": {"typeId": "product-type", "id": product_type},
            "name": {"en": f"Product {tag}"},
            "slug": {"en": f"product-{tag}"},
            "key": f"prod-{tag}",
            "masterVariant": {"sku": f"SKU-{tag}"},
        }
    if type_id == "category":
        return "categories", {
            "name": {"en": f"Category {tag}"},
            "slug": {"en": f"cat-{tag}"},
            "key": f"cat-{tag}",
        }
    if type_id == "customer":
        return "customers", {
            "email": f"c{tag}@example.com",
            "password": "x",
            "customerNumber": f"CN-{tag}",
            "key": f"cust-{tag}",
        }
    return "orders/import", {
        "orderNumber": f"ORD-{tag}",
        "totalPrice": {"currencyCode": "EUR", "centAmount": 1000 + n},
    }


class MockApi:
    """A small async client for creating and changing resources in a commercetools-mock project."""

    def __init__(self, url: str, project: str) -> None:
        self.project = project
        self.http = httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=16))
        self.headers: dict[str, str] = {}

    async def __aenter__(self) -> MockApi:
        answer = await self.http.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=("backfill-tests", "secret")
        )
        answer.raise_for_status()
        self.headers = {"Authorization": f"Bearer {answer.json()['access_token']}"}
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await self.http.post(f"/{self.project}/{path}", json=body, headers=self.headers)
        assert answer.status_code in (200, 201), answer.text[:500]
        data: dict[str, Any] = answer.json()
        return data.get("customer", data) if path == "customers" else data

    async def create(self, counts: dict[str, int], concurrency: int = 16) -> dict[str, list[dict[str, Any]]]:
        product_type = await self.post(
            "product-types", {"name": "backfill", "description": "backfill", "key": "bf"}
        )
        gate = asyncio.Semaphore(concurrency)
        jobs: list[tuple[str, int]] = []
        for n in range(max(counts.values())):
            jobs += [(type_id, n) for type_id, count in counts.items() if n < count]

        async def one(type_id: str, n: int) -> tuple[str, dict[str, Any]]:
            path, body = draft(type_id, n, product_type["id"])
            async with gate:
                return type_id, await self.post(path, body)

        created: dict[str, list[dict[str, Any]]] = {t: [] for t in counts}
        for type_id, resource in await asyncio.gather(*(one(t, n) for t, n in jobs)):
            created[type_id].append(resource)
        return created

    async def update(
        self, path: str, resource: dict[str, Any], actions: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return await self.post(
            f"{path}/{resource['id']}", {"version": resource["version"], "actions": actions}
        )


@pytest.fixture(scope="session")
def ct_data(ctmock: CtMock, ctmock_sorted: SortingFront) -> Project:
    """A project with 1000 products, 400 categories, 400 customers and 400 orders, created once."""
    project = Project("backfill-" + secrets.token_hex(4), ctmock_sorted.url)

    async def create() -> None:
        async with MockApi(ctmock.url, project.key) as api:
            project.resources = await api.create(COUNTS)

    asyncio.run(create())
    assert {t: len(r) for t, r in project.resources.items()} == COUNTS
    return project


# ------------------------------------------------------------------------------------- running ctsync


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


def environment(tmp_path: Path, *parts: dict[str, str]) -> dict[str, str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_"))
    }
    scope_map = tmp_path / "scope-map.toml"
    scope_map.write_text(SCOPE_MAP)
    environ.update(
        CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        IPAAS_SCOPE_MAP=str(scope_map),
    )
    for part in parts:
        environ.update(part)
    return environ


def hook_env(hooks: HookServer, limit: int, seconds: float, batch: int = 100) -> dict[str, str]:
    return {
        "IPAAS_HOOK_URL": hooks.url,
        "IPAAS_WEBHOOK_API_KEY": hooks.api_key,
        "IPAAS_THROTTLE_LIMIT": str(limit),
        "IPAAS_THROTTLE_SECONDS": f"{seconds:g}",
        "IPAAS_BATCH_SIZE": str(batch),
    }


def ctsync(tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 90) -> Run:
    done = subprocess.run(
        [*CTSYNC, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )
    return Run(done.returncode, done.stdout, done.stderr)


def accepted(hooks: HookServer) -> Counter[tuple[str, str]]:
    return Counter(n for record in hooks.requests if record.accepted for n in record.notifications)


# ------------------------------------------------------------------------------------------- the tests


def test_backfill_notifies_every_resource_exactly_once_with_scope_and_external_id(
    ct_data: Project, hook_server: HookServer, tmp_path: Path
) -> None:
    env = environment(tmp_path, ct_data.env(), hook_env(hook_server, limit=20, seconds=1.0))
    run = ctsync(tmp_path, env, "backfill")
    assert run.code == 0, run.stderr[-3000:]
    got = accepted(hook_server)
    assert got == ct_data.expected(), (len(got), sum(got.values()))
    # The default share (half of 20 per second) held, and full batches went out.
    assert hook_server.max_in_window(1.0) <= 10
    assert hook_server.request_count <= sum(COUNTS.values()) // 100 + 4
    received = run.named("message.received")
    assert received and all(e["position"].startswith("backfill:") for e in received)
    assert "swept 2200 resources" in run.stderr

    # The same command again: every type is complete, nothing is read or sent.
    requests = hook_server.request_count
    again = ctsync(tmp_path, env, "backfill")
    assert again.code == 0 and "already swept completely" in again.stderr
    # Restarted on purpose: everything is read again, and dedupe knows all of it was delivered.
    restarted = ctsync(tmp_path, env, "backfill", "--restart")
    assert restarted.code == 0, restarted.stderr[-3000:]
    assert hook_server.request_count == requests
    stopped = restarted.named("service.stopped")[-1]
    # Stale, every one: a versioned change is covered by its watermark, no key of it is kept.
    assert stopped["received"] == 2200 and stopped["stale"] == 2200 and stopped["notifications_sent"] == 0


def test_a_killed_backfill_resumes_without_resending_what_was_delivered(
    ct_data: Project, hook_server: HookServer, tmp_path: Path
) -> None:
    types = ("product", "category")
    total = COUNTS["product"] + COUNTS["category"]
    log_path = tmp_path / "first.log"
    slow = environment(tmp_path, ct_data.env(), hook_env(hook_server, limit=4, seconds=1.0, batch=50))
    with log_path.open("wb") as out:
        first = subprocess.Popen(
            [*CTSYNC, "backfill", "--type", ",".join(types)],
            env=slow,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while not (
            sum(accepted(hook_server).values()) >= 300 and b'"backfill.cursor_saved"' in log_path.read_bytes()
        ):
            assert first.poll() is None, "the backfill ended before it could be killed"
            assert time.monotonic() < deadline, "no cursor was saved in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    before = hook_server.requests
    delivered_before = accepted(hook_server)
    assert 300 <= sum(delivered_before.values()) < total

    fast = environment(tmp_path, ct_data.env(), hook_env(hook_server, limit=50, seconds=1.0))
    second = ctsync(tmp_path, fast, "backfill", "--type", ",".join(types), "--budget-share", "1")
    assert second.code == 0, second.stderr[-3000:]
    assert "resuming product after id" in second.stderr
    started = second.named("backfill.started")[0]
    assert "product" in started["resumed"]
    stopped = second.named("service.stopped")[-1]
    # The second run read only what lay past the saved cursor.
    assert stopped["received"] < total

    got = accepted(hook_server)
    assert set(got) == set(ct_data.expected(types))
    resent = {n for n, count in got.items() if count > 1}
    # Only what the kill cut short between the hook's answer and the state write may come again: the
    # batches still in flight at the kill (at most two at once with this budget).
    in_flight_at_kill = {n for record in before[-2:] for n in record.notifications}
    assert resent <= in_flight_at_kill, sorted(resent)[:5]


def test_reconcile_reports_subscription_health_and_honours_since(
    ctmock: CtMock, ctmock_sorted: SortingFront, hook_server: HookServer, tmp_path: Path
) -> None:
    project = Project("reconcile-" + secrets.token_hex(4), ctmock_sorted.url)

    async def prepare() -> tuple[datetime, list[tuple[str, str]]]:
        async with MockApi(ctmock.url, project.key) as api:
            created = await api.create({"product": 20, "category": 30})
            await api.post(
                "subscriptions",
                {
                    "key": "ipaas-sync",
                    "destination": {"type": "GoogleCloudPubSub", "projectId": "p", "topic": "t"},
                    "changes": [{"resourceTypeId": "product"}],
                },
            )
            await asyncio.sleep(0.05)
            since = datetime.now(UTC)
            await asyncio.sleep(0.05)
            changed = []
            for category in created["category"][:4]:
                await api.update("categories", category, [{"action": "changeName", "name": {"en": "new"}}])
                changed.append(("product/category/updated", category["key"]))
            for product in created["product"][:3]:
                await api.update("products", product, [{"action": "changeName", "name": {"en": "new"}}])
                changed.append(("product/updated", external_id("product", product)))
            return since, changed

    since, changed = asyncio.run(prepare())
    env = environment(tmp_path, project.env(), hook_env(hook_server, limit=20, seconds=1.0))
    run = ctsync(tmp_path, env, "reconcile", "--since", since.isoformat(), "--type", "product,category")
    assert run.code == 0, run.stderr[-3000:]
    assert "subscription ipaas-sync: destination GoogleCloudPubSub, status Healthy" in run.stderr
    assert accepted(hook_server) == Counter(changed)


def test_dry_run_prints_what_would_be_notified_and_sends_and_writes_nothing(
    ct_data: Project, hook_server: HookServer, tmp_path: Path
) -> None:
    env = environment(tmp_path, ct_data.env(), hook_env(hook_server, limit=20, seconds=1.0))
    run = ctsync(tmp_path, env, "backfill", "--type", "category", "--dry-run")
    assert run.code == 0, run.stderr[-3000:]
    printed = Counter(tuple(line.split("\t")) for line in run.stdout.splitlines())
    assert printed == ct_data.expected(("category",))
    assert hook_server.request_count == 0
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT count(*) FROM backfill_cursors").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM delivered_keys").fetchone() == (0,)


# ------------------------------------------------------------------------------- beside `ctsync run`


def live_payloads(path: Path, count: int) -> Counter[tuple[str, str]]:
    """Write ``count`` live ResourceUpdated payloads (products the sweep does not know); return their
    notifications."""
    lines = []
    for n in range(count):
        body = {
            "notificationType": "ResourceUpdated",
            "projectKey": "live",
            "resource": {"typeId": "product", "id": f"live-{n:05d}"},
            "resourceUserProvidedIdentifiers": {"sku": f"LIVE-{n:05d}"},
            "version": 2,
            "oldVersion": 1,
            "modifiedAt": "2026-01-01T00:00:00.000Z",
        }
        lines.append(orjson.dumps(body))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return Counter(("product/updated", f"LIVE-{n:05d}") for n in range(count))


def test_backfill_beside_ctsync_run_stays_inside_the_window_limit_and_its_share(
    ct_data: Project, hook_server: HookServer, tmp_path: Path, redis_url: str
) -> None:
    from adapters.redis.state import key_prefix

    limit, window, types = 6, 1.0, ("product", "category")
    live = live_payloads(tmp_path / "live.jsonl", 1500)
    shared = {"CTSYNC_STATE_URL": redis_url, **hook_env(hook_server, limit=limit, seconds=window)}
    run_env = environment(
        tmp_path,
        ct_data.env(),
        shared,
        {"CTSYNC_SOURCE": f"file:{tmp_path / 'live.jsonl'}", "IPAAS_BATCH_SIZE": "50"},
    )
    sweep_env = environment(tmp_path, ct_data.env(), shared)
    try:
        with (tmp_path / "run.log").open("wb") as run_log, (tmp_path / "sweep.log").open("wb") as sweep_log:
            service = subprocess.Popen([*CTSYNC, "run"], env=run_env, cwd=tmp_path, stdout=run_log)
            sweep = subprocess.Popen(
                [*CTSYNC, "backfill", "--type", ",".join(types)],
                env=sweep_env,
                cwd=tmp_path,
                stdout=sweep_log,
            )
            assert sweep.wait(90) == 0
            assert service.wait(90) == 0
    finally:
        for process in (service, sweep):
            if process.poll() is None:
                process.kill()
        import redis

        client = redis.Redis.from_url(redis_url)
        prefix = key_prefix(ct_data.key, hook_server.url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    got = accepted(hook_server)
    assert got == ct_data.expected(types) + live

    def from_sweep(record: Any) -> bool:
        return any(scope.endswith("/created") for scope, _ in record.notifications)

    sweep_arrivals = [r.arrival for r in hook_server.requests if from_sweep(r)]
    live_arrivals = [r.arrival for r in hook_server.requests if not from_sweep(r)]
    # They did run side by side...
    assert any(min(sweep_arrivals) < t < max(sweep_arrivals) for t in live_arrivals)
    # ...together within the whole limit, and the sweep within its half.
    assert hook_server.max_in_window(window) <= limit
    assert hook_server.max_in_window(window, where=from_sweep) <= limit // 2
