"""End to end: ``ctsync replay`` / ``ctsync run`` as subprocesses against the local hook server."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests import REPO_ROOT
from tests.servers.hookserver import Fault, HookServer

pytestmark = pytest.mark.integration

ROOT = REPO_ROOT
SAMPLE = ROOT / "examples" / "commercetools-sample.jsonl"
CTSYNC = [sys.executable, "-m", "consumer.cli"]
CLIENT_SECRET = "ct-secret-Zq9vX2mK7pL4"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    workdir: Path

    @property
    def events(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def named(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.events if e["event"] == name]

    @property
    def dead_letters(self) -> list[dict[str, object]]:
        path = self.workdir / "dead.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def ctsync(tmp_path: Path) -> Callable[..., Result]:
    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        environ = {
            k: v for k, v in os.environ.items() if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_"))
        }
        environ.update(
            CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
            CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
            IPAAS_IGNORE_CLIENT_IDS="ipaas-sync-client",
            CTP_CLIENT_SECRET=CLIENT_SECRET,
        )
        environ.update(env or {})
        done = subprocess.run(
            [*CTSYNC, *args], env=environ, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
        )
        return Result(done.returncode, done.stdout, done.stderr, tmp_path)

    return run


def updates(count: int, entities: int, prefix: str = "p") -> list[bytes]:
    """Return ``count`` ResourceUpdated payloads spread round-robin over ``entities`` products."""
    lines = []
    for i in range(count):
        entity = i % entities
        version = i // entities + 2
        lines.append(
            orjson.dumps(
                {
                    "notificationType": "ResourceUpdated",
                    "projectKey": "acme",
                    "resource": {"typeId": "product", "id": f"{prefix}-{entity}"},
                    "version": version,
                    "oldVersion": version - 1,
                    "modifiedAt": "2026-01-01T00:00:00.000Z",
                }
            )
        )
    return lines


def write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def assert_no_secret(result: Result, *secrets: str) -> None:
    for secret in (CLIENT_SECRET, *secrets):
        assert secret not in result.stdout and secret not in result.stderr


def test_sample_replay_notifies_every_routed_entity_once(
    ctsync: Callable[..., Result], hook_server: HookServer
) -> None:
    result = ctsync("replay", str(SAMPLE), env=hook_server.env())
    assert result.code == 0, result.stderr
    notified = hook_server.notifications
    counts = Counter(external_id for _, external_id in notified)
    assert all(n == 1 for n in counts.values()), counts
    scopes = dict((external_id, scope) for scope, external_id in notified)
    # The burst of 8 updates to one product (lines 11-18) is one notification.
    burst = [e for e in result.named("notification.coalesced")]
    assert burst
    sample = []
    for line in SAMPLE.read_bytes().splitlines():
        try:
            sample.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    expected_families = {
        "product": "product",
        "category": "product/category",
        "customer": "customer",
        "customer-group": "customer/category",
        "business-unit": "customer/company",
        "order": "transaction",
        "inventory-entry": "product/inventory",
    }
    for payload in sample:
        data = payload.get("data", payload) if isinstance(payload, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("resource"), dict):
            continue
        resource = data["resource"]
        family = expected_families.get(resource.get("typeId"))
        creator = (data.get("createdBy") or {}).get("clientId")
        if family is None or creator == "ipaas-sync-client":
            continue
        assert resource["id"] in scopes, f"{resource['id']} was not notified"
        assert scopes[resource["id"]].startswith(family + "/")
    # Poison lines are dead-lettered with their reasons and original payloads; all 52 are acked.
    letters = result.dead_letters
    assert len(letters) == 3
    assert {str(letter["reason"]).split(":")[0].split(" '")[0] for letter in letters} == {
        "not valid JSON",
        "missing field",
        "unknown notificationType",
    }
    assert len(result.named("message.acked")) == 52
    assert "received 52 payloads" in result.stderr
    assert_no_secret(result, hook_server.api_key)
    # Replayed again with the same state: everything is a duplicate or stale, nothing is sent.
    before = hook_server.request_count
    again = ctsync("replay", str(SAMPLE), env=hook_server.env())
    assert again.code == 0, again.stderr
    assert hook_server.request_count == before
    assert len(again.named("message.duplicate")) + len(again.named("message.stale")) > 30


def test_burst_is_coalesced_and_limits_hold(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server_factory: Callable[..., HookServer]
) -> None:
    hooks = hook_server_factory(limit=4, window_seconds=0.5, max_concurrent=2)
    hooks.faults.always = Fault.delay(0.02)
    path = write(tmp_path / "burst.jsonl", updates(3000, 120))
    result = ctsync(
        "replay",
        str(path),
        env={**hooks.env(), "IPAAS_BATCH_SIZE": "10", "IPAAS_CONCURRENT_BATCH_EXECUTIONS": "3"},
    )
    assert result.code == 0, result.stderr
    counts = Counter(external_id for _, external_id in hooks.notifications)
    assert set(counts) == {f"p-{i}" for i in range(120)}
    assert hooks.max_in_window(0.5) <= 4
    assert hooks.peak_in_flight <= 2
    assert hooks.violations == 0
    # 3000 updates to 120 entities need far fewer than 3000 notifications.
    assert sum(counts.values()) < 600


def test_429_retry_after_is_obeyed_and_503_retried(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server: HookServer
) -> None:
    hook_server.faults.push(Fault.status(429, retry_after=1))
    hook_server.faults.push(Fault.status(503), times=2)
    path = write(tmp_path / "few.jsonl", updates(5, 5))
    result = ctsync("replay", str(path), env=hook_server.env())
    assert result.code == 0, result.stderr
    records = hook_server.requests
    assert [r.status for r in records] == [429, 503, 503, 200]
    assert records[1].arrival - records[0].finished >= 0.95
    assert sorted(e for _, e in hook_server.notifications) == [f"p-{i}" for i in range(5)]
    retrying = result.named("batch.retrying")
    assert [r["status"] for r in retrying] == [429, 503, 503]
    assert retrying[0]["delay_s"] == 1.0


def test_rejected_notification_is_dead_lettered_rest_delivered(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server: HookServer
) -> None:
    hook_server.reject("p-7")
    path = write(tmp_path / "some.jsonl", updates(20, 20))
    result = ctsync("replay", str(path), env=hook_server.env())
    assert result.code == 0, result.stderr
    delivered = {e for _, e in hook_server.notifications}
    assert delivered == {f"p-{i}" for i in range(20)} - {"p-7"}
    [letter] = result.dead_letters
    assert "p-7" in str(letter["reason"]) and "400" in str(letter["reason"])
    assert orjson.loads(str(letter["payload"]))["resource"]["id"] == "p-7"
    assert len(result.named("message.acked")) == 20


def test_unauthorized_stops_delivery_without_dead_letters(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server: HookServer
) -> None:
    path = write(tmp_path / "some.jsonl", updates(10, 10))
    wrong_key = "wrong-key-" + uuid.uuid4().hex
    result = ctsync("replay", str(path), env={**hook_server.env(), "IPAAS_WEBHOOK_API_KEY": wrong_key})
    assert result.code == 1
    assert hook_server.request_count == 1 and hook_server.statuses == [401]
    assert result.dead_letters == []
    assert result.named("message.acked") == []
    assert len(result.named("message.handed_back")) == 10
    assert "IPAAS_WEBHOOK_API_KEY" in result.stderr
    assert_no_secret(result, wrong_key, hook_server.api_key)


def test_run_with_a_file_source_delivers_and_stops(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server: HookServer
) -> None:
    path = write(tmp_path / "some.jsonl", updates(6, 3))
    result = ctsync("run", env={**hook_server.env(), "CTSYNC_SOURCE": f"file:{path}"})
    assert result.code == 0, result.stderr
    assert sorted(e for _, e in hook_server.notifications) == ["p-0", "p-1", "p-2"]
    assert result.named("service.started") and result.named("service.stopped")
    assert_no_secret(result, hook_server.api_key)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"IPAAS_THROTTLE_LIMIT": "abc", "IPAAS_CONCURRENT_CONNECTIONS": "11"},
            ["IPAAS_THROTTLE_LIMIT", "IPAAS_CONCURRENT_CONNECTIONS"],
        ),
        (
            {"IPAAS_HOOK_URL": "http://hooks.example.com/x", "IPAAS_WEBHOOK_API_KEY": "k3y-s3cret-value"},
            ["IPAAS_HOOK_URL"],
        ),
        ({"CTP_API_URL": "https://api.commercetools.com"}, ["CTP_API_URL"]),
        (
            {
                "CTP_API_URL": "https://api.europe-west1.gcp.commercetools.com",
                "CTP_AUTH_URL": "https://auth.us-central1.gcp.commercetools.com",
            },
            ["CTP_AUTH_URL"],
        ),
        ({"CTP_PROJECT_KEY": "acme", "CTP_SCOPES": "view_products:other"}, ["CTP_SCOPES"]),
    ],
)
def test_bad_configuration_exits_2(
    ctsync: Callable[..., Result], env: dict[str, str], expected: list[str]
) -> None:
    result = ctsync("replay", str(SAMPLE), env=env)
    assert result.code == 2, result.stderr
    lines = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert [line.split(":")[0] for line in lines] == expected
    assert_no_secret(result, "k3y-s3cret-value")


def test_run_without_source_exits_2(ctsync: Callable[..., Result]) -> None:
    result = ctsync("run")
    assert result.code == 2
    assert "CTSYNC_SOURCE" in result.stderr


def test_sigterm_drains_and_exits_0(tmp_path: Path, hook_server: HookServer) -> None:
    import signal

    path = write(tmp_path / "follow.jsonl", updates(4, 4))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CTSYNC_", "IPAAS_"))}
    environ.update(
        hook_server.env(),
        CTSYNC_SOURCE=f"file:{path}",
        CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        CTSYNC_HTTP_LISTEN="127.0.0.1:0",
    )
    proc = subprocess.Popen(
        [*CTSYNC, "run", "--follow"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        hook_server.wait_for_notifications(4, timeout=20)
        with path.open("ab") as file:  # appended lines are followed
            file.write(updates(1, 1, prefix="late")[0] + b"\n")
        hook_server.wait_for_notifications(5, timeout=20)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    events = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
    stopped = [e for e in events if e["event"] == "service.stopped"]
    assert stopped and stopped[0]["signal"] == "SIGTERM" and stopped[0]["acked"] == 5
