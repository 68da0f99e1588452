"""``ctsync check`` as a subprocess against commercetools-mock (behind the test proxy) and the hook server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.cli import checks
from consumer.cli.checks import Status
from tests.servers.ctmockserver import CtProxy, project_key
from tests.servers.hookserver import HookServer

pytestmark = pytest.mark.integration

CTSYNC = [sys.executable, "-m", "consumer.cli"]
PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")
ALL_NEEDED = [
    "view_products",
    "view_categories",
    "view_customers",
    "view_customer_groups",
    "view_business_units",
    "view_orders",
    "manage_subscriptions",
]


@dataclass
class Checked:
    code: int
    stdout: str
    stderr: str

    def line(self, name: str) -> str:
        [found] = [line for line in self.stdout.splitlines() if line.split()[1:2] == [name]]
        return found

    def fix(self, name: str) -> str:
        lines = self.stdout.splitlines()
        index = lines.index(self.line(name))
        return lines[index + 1].strip() if index + 1 < len(lines) else ""


@pytest.fixture
def run_check(tmp_path: Path) -> Callable[..., Checked]:
    def run(env: dict[str, str], *args: str) -> Checked:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
        environ.update(CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db", **env)
        done = subprocess.run(
            [*CTSYNC, "check", *args], env=environ, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        return Checked(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def payloads(tmp_path: Path) -> Path:
    path = tmp_path / "payloads.jsonl"
    path.write_text("")
    return path


def good_env(ct_proxy: CtProxy, hook_server: HookServer, payloads: Path) -> tuple[dict[str, str], str]:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"{s}:{project}" for s in ALL_NEEDED])
    env = {
        **ct_proxy.env(project, client_id, secret),
        **hook_server.env(),
        "CTSYNC_SOURCE": f"file:{payloads}",
    }
    return env, secret


def test_everything_passes(
    run_check: Callable[..., Checked], ct_proxy: CtProxy, hook_server: HookServer, payloads: Path
) -> None:
    env, secret = good_env(ct_proxy, hook_server, payloads)
    result = run_check(env)
    assert result.code == 0, result.stdout + result.stderr
    for name in ("settings", "region", "token", "scopes", "project", "hook", "source"):
        assert result.line(name).startswith("OK"), result.stdout
    assert result.stdout.splitlines()[-1] == "all checks passed"
    # Without view_project_settings (ctsync does not need it) the project is shown to answer another way.
    assert "subscriptions are readable" in result.line("project")
    # The hook was tested with one empty batch: nothing was queued in "iPaaS.com".
    assert hook_server.request_count == 1 and hook_server.notifications == []
    assert secret not in result.stdout + result.stderr
    assert hook_server.api_key not in result.stdout + result.stderr


def test_non_regional_api_url(
    run_check: Callable[..., Checked], hook_server: HookServer, payloads: Path
) -> None:
    env = {
        "CTP_PROJECT_KEY": "acme",
        "CTP_CLIENT_ID": "id",
        "CTP_CLIENT_SECRET": "secret-value-123",
        "CTP_API_URL": "https://api.commercetools.com",
        "CTP_AUTH_URL": "https://auth.europe-west1.gcp.commercetools.com",
        **hook_server.env(),
        "CTSYNC_SOURCE": f"file:{payloads}",
    }
    result = run_check(env)
    assert result.code == 2
    assert result.line("settings").startswith("FAIL") and "CTP_API_URL" in result.line("settings")
    assert result.line("region").startswith("FAIL")
    assert "not a regional URL" in result.line("region")
    assert "https://api.europe-west1.gcp.commercetools.com" in result.line("region")
    # Nothing is sent to commercetools with URLs known to be wrong.
    assert result.line("token").startswith("SKIP")
    assert result.line("hook").startswith("OK") and result.line("source").startswith("OK")
    assert "secret-value-123" not in result.stdout + result.stderr


def test_region_pair_mismatch(run_check: Callable[..., Checked], payloads: Path) -> None:
    env = {
        "CTP_PROJECT_KEY": "acme",
        "CTP_CLIENT_ID": "id",
        "CTP_CLIENT_SECRET": "secret-value-123",
        "CTP_API_URL": "https://api.europe-west1.gcp.commercetools.com",
        "CTP_AUTH_URL": "https://auth.us-central1.gcp.commercetools.com",
        "CTSYNC_SOURCE": f"file:{payloads}",
    }
    result = run_check(env, "--json")
    assert result.code == 2
    report = orjson.loads(result.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert by_name["region"]["status"] == "FAIL"
    assert (
        "europe-west1.gcp" in by_name["region"]["detail"] and "us-central1.gcp" in by_name["region"]["detail"]
    )
    assert by_name["region"]["fix"].startswith("use https://auth.europe-west1.gcp.commercetools.com")
    assert by_name["token"]["status"] == "SKIP"
    assert by_name["hook"]["status"] == "FAIL" and "dry-run" in by_name["hook"]["detail"]


def test_bad_credentials(
    run_check: Callable[..., Checked], ct_proxy: CtProxy, hook_server: HookServer, payloads: Path
) -> None:
    env, secret = good_env(ct_proxy, hook_server, payloads)
    env["CTP_CLIENT_SECRET"] = secret[:-3] + "xyz"
    result = run_check(env)
    assert result.code == 1
    assert result.line("token").startswith("FAIL") and "invalid_client" in result.line("token")
    assert result.fix("token") == (
        "fix: check CTP_CLIENT_ID / CTP_CLIENT_SECRET from Merchant Center > Settings > Developer settings > "
        "API clients"
    )
    assert result.line("scopes").startswith("SKIP") and result.line("project").startswith("SKIP")
    assert env["CTP_CLIENT_SECRET"] not in result.stdout + result.stderr


def test_missing_scopes_are_named(
    run_check: Callable[..., Checked], ct_proxy: CtProxy, hook_server: HookServer, payloads: Path
) -> None:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"view_products:{project}", f"view_categories:{project}"])
    env = {
        **ct_proxy.env(project, client_id, secret),
        **hook_server.env(),
        "CTSYNC_SOURCE": f"file:{payloads}",
    }
    result = run_check(env)
    assert result.code == 1
    line = result.line("scopes")
    assert line.startswith("FAIL")
    for scope in ("view_orders", "view_customers", "view_business_units"):
        assert f"{scope}:{project}" in line
    assert f"view_products:{project}" not in line
    # Only `subscription ensure` needs manage_subscriptions: named apart, and it fails nothing (issue 14).
    assert f"manage_subscriptions:{project}" not in line
    operator = result.line("operator-scopes")
    assert operator.startswith("NOTE") and f"manage_subscriptions:{project}" in operator
    assert result.line("token").startswith("OK") and result.line("project").startswith("OK")


def test_scopes_asked_for_but_not_held(
    run_check: Callable[..., Checked], ct_proxy: CtProxy, hook_server: HookServer, payloads: Path
) -> None:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"view_products:{project}"])
    env = {
        **ct_proxy.env(
            project, client_id, secret, scopes=[f"view_products:{project}", f"view_orders:{project}"]
        ),
        **hook_server.env(),
        "CTSYNC_SOURCE": f"file:{payloads}",
    }
    result = run_check(env)
    assert result.line("token").startswith("FAIL") and "view_orders" in result.line("token")
    assert "CTP_SCOPES" in result.fix("token")


def test_hook_key_and_source_failures(
    run_check: Callable[..., Checked], ct_proxy: CtProxy, hook_server: HookServer, tmp_path: Path
) -> None:
    env, _ = good_env(ct_proxy, hook_server, tmp_path / "missing.jsonl")
    env["IPAAS_WEBHOOK_API_KEY"] = "wrong-key-0123456789"
    result = run_check(env, "--json")
    assert result.code == 1
    by_name = {c["name"]: c for c in orjson.loads(result.stdout)["checks"]}
    assert by_name["hook"]["status"] == "FAIL" and "401" in by_name["hook"]["detail"]
    assert "IPAAS_WEBHOOK_API_KEY" in by_name["hook"]["fix"]
    assert by_name["source"]["status"] == "FAIL" and "missing.jsonl" in by_name["source"]["detail"]
    assert "wrong-key-0123456789" not in result.stdout + result.stderr


def test_push_listen_in_use(
    run_check: Callable[..., Checked], ct_proxy: CtProxy, hook_server: HookServer, payloads: Path
) -> None:
    env, _ = good_env(ct_proxy, hook_server, payloads)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env.update(CTSYNC_SOURCE="push", PUSH_LISTEN=f"127.0.0.1:{port}", CTSYNC_HTTP_LISTEN="127.0.0.1:0")
        env.update(
            PUSH_AUDIENCE="https://ctsync.example/push", PUSH_SERVICE_ACCOUNT="push@p.iam.gserviceaccount.com"
        )
        result = run_check(env)
    assert result.line("source").startswith("FAIL") and str(port) in result.line("source")


# --- the pure parts ---


@pytest.mark.parametrize(
    ("api", "auth", "status"),
    [
        (
            "https://api.europe-west1.gcp.commercetools.com",
            "https://auth.europe-west1.gcp.commercetools.com",
            "OK",
        ),
        ("https://api.commercetools.com", "https://auth.commercetools.com", "FAIL"),
        (
            "https://api.us-east-2.aws.commercetools.com",
            "https://auth.eu-central-1.aws.commercetools.com",
            "FAIL",
        ),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080", "OK"),
        (None, "https://auth.europe-west1.gcp.commercetools.com", "FAIL"),
    ],
)
def test_region_result(api: str | None, auth: str, status: str) -> None:
    assert checks.region_result(api, auth).status.value == status


def test_manage_project_covers_every_need() -> None:
    needs = checks.scope_needs(["product", "order"])
    assert checks.missing_scopes(["manage_project:acme"], needs, "acme") == []
    missing = checks.missing_scopes(["manage_orders:acme", "view_products:other"], needs, "acme")
    assert [need.scope("acme") for need in missing] == ["view_products:acme", "manage_subscriptions:acme"]
    # A store-scoped grant does not cover the whole project.
    assert checks.missing_scopes(
        ["view_orders:acme:store-1"], checks.scope_needs(["order"], subscriptions=False), "acme"
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Status.OK),
        (204, Status.OK),
        (400, Status.OK),
        (401, Status.FAIL),
        (404, Status.FAIL),
        (None, Status.FAIL),
    ],
)
def test_hook_result(status: int | None, expected: Status) -> None:
    assert checks.hook_result(status, "detail").status is expected


def test_exit_code_and_rendering() -> None:
    results: list[Any] = [checks.ok("a", "fine"), checks.fail("b", "broken", "do this")]
    assert checks.exit_code(results) == 1
    assert checks.exit_code([*results, checks.fail("c", "bad", "fix", config=True)]) == 2
    assert checks.exit_code(results[:1]) == 0
    text = checks.render_text(results)
    assert text[1].startswith("FAIL  b  broken") and text[2].strip() == "fix: do this"
    assert text[-1] == "not ready: b"


async def test_state_check_reports_redis_and_sqlite(redis_url: str, tmp_path: Path) -> None:
    from consumer.cli.checks import Status, _state_check
    from consumer.config import load_settings

    answering = load_settings(environ={"CTSYNC_STATE_URL": redis_url}, for_command="check")
    assert (await _state_check(answering)).status is Status.OK
    dead_port = load_settings(environ={"CTSYNC_STATE_URL": "redis://127.0.0.1:1/0"}, for_command="check")
    result = await _state_check(dead_port)
    assert result.status is Status.FAIL and "CTSYNC_STATE_URL" in result.fix
    sqlite = load_settings(environ={"CTSYNC_STATE_URL": f"sqlite:///{tmp_path}/s.db"}, for_command="check")
    assert (await _state_check(sqlite)).status is Status.OK
