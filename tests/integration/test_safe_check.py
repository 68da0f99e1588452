"""``ctsync check`` names the fix: a wrong project key, scopes the service needs apart from operator-only
ones (the shipped examples pass), every check run despite a problem across settings, the dead-letter target
checked; a typo in an env file warned about with "did you mean"; ``subscription ensure`` reading the topic
from PUBSUB_SUBSCRIPTION."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import orjson
import pytest
from dotenv import dotenv_values

from tests import REPO_ROOT
from tests.integration.test_deploy import environment as pod_environment
from tests.integration.test_deploy import rendered
from tests.servers.ctmockserver import CtProxy, project_key
from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import CTSYNC, Kafka
from tests.servers.pstestserver import PubSubTestbed

pytestmark = pytest.mark.integration

ROOT = REPO_ROOT
PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")
SERVICE_SCOPES = ("view_products", "view_customers", "view_business_units", "view_orders")


def ctsync(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    environ.update(
        CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
    )
    environ.update(env)
    return subprocess.run(
        [*CTSYNC, *args], env=environ, capture_output=True, text=True, timeout=90, cwd=tmp_path
    )


def checks(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in orjson.loads(done.stdout)["checks"]}


def base_env(tmp_path: Path, hook: HookServer) -> dict[str, str]:
    payloads = tmp_path / "payloads.jsonl"
    payloads.write_text("")
    return {**hook.env(), "CTSYNC_SOURCE": f"file:{payloads}"}


def test_a_wrong_project_key_is_named(tmp_path: Path, ct_proxy: CtProxy, hook_server: HookServer) -> None:
    real = project_key()
    client_id, secret = ct_proxy.add_client([f"{s}:{real}" for s in SERVICE_SCOPES])
    env = {**base_env(tmp_path, hook_server), **ct_proxy.env("acme-typo", client_id, secret)}
    done = ctsync(tmp_path, env, "check", "--json")
    scopes = checks(done)["scopes"]
    assert scopes["status"] == "FAIL" and done.returncode == 2
    assert real in scopes["detail"] and "CTP_PROJECT_KEY" in scopes["detail"]
    assert scopes["fix"].startswith(f"set CTP_PROJECT_KEY={real}")


@pytest.mark.parametrize("shipped", ["configmap", "env-example"])
def test_the_shipped_settings_pass_the_scopes_checks(
    tmp_path: Path, ct_proxy: CtProxy, hook_server: HookServer, shipped: str
) -> None:
    if shipped == "configmap":
        values = pod_environment(rendered("kafka"))
    else:
        values = {k: v or "" for k, v in dotenv_values(ROOT / "examples" / ".env.example").items()}
    project = project_key()
    # The shipped scopes, for a project of the mock: the client holds exactly those.
    scopes = [scope.rsplit(":", 1)[0] + f":{project}" for scope in values["CTP_SCOPES"].split()]
    client_id, secret = ct_proxy.add_client(scopes)
    # Everything but the commercetools client, the hook and where things are kept, as shipped.
    env = {
        k: v for k, v in values.items() if k.startswith(("IPAAS_THROTTLE", "IPAAS_CONCURRENT", "IPAAS_BATCH"))
    }
    env.update(base_env(tmp_path, hook_server), **ct_proxy.env(project, client_id, secret, scopes=scopes))
    done = ctsync(tmp_path, env, "check", "--json")
    found = checks(done)
    assert found["scopes"]["status"] == "OK", found["scopes"]
    assert found["operator-scopes"]["status"] in ("OK", "NOTE")
    assert done.returncode == 0, done.stdout
    if shipped == "configmap":  # the service's own client does not hold manage_subscriptions
        assert found["operator-scopes"]["status"] == "NOTE"
        assert "manage_subscriptions" in found["operator-scopes"]["detail"]


def test_a_problem_across_settings_does_not_skip_the_other_checks(
    tmp_path: Path, ct_proxy: CtProxy, hook_server: HookServer
) -> None:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"{s}:{project}" for s in SERVICE_SCOPES])
    env = {**base_env(tmp_path, hook_server), **ct_proxy.env(project, client_id, secret)}
    del env["IPAAS_WEBHOOK_API_KEY"]
    done = ctsync(tmp_path, env, "check", "--json")
    found = checks(done)
    assert done.returncode == 2
    assert found["settings"]["status"] == "FAIL" and "IPAAS_WEBHOOK_API_KEY" in found["settings"]["detail"]
    for name in ("region", "token", "scopes", "project", "source", "state", "dead-letters"):
        assert found[name]["status"] == "OK", found[name]
    assert found["hook"]["status"] == "SKIP"


async def test_the_dead_letter_target_is_checked(
    tmp_path: Path, hook_server: HookServer, kafka: Kafka, pubsub_testbed: PubSubTestbed
) -> None:
    env = base_env(tmp_path, hook_server)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    topic = await kafka.create_topic(partitions=1)
    cases = {
        f"file:{tmp_path}/letters/dead.jsonl": "OK",
        f"file:{blocker}/dead.jsonl": "FAIL",
        f"kafka://{topic}": "OK",
        f"kafka://missing-{uuid.uuid4().hex[:8]}": "FAIL",
        f"pubsub://{pubsub_testbed.dead_letter_topic}": "OK",
        "pubsub://projects/ctsync-test/topics/missing": "FAIL",
    }
    for url, expected in cases.items():
        extra = {"CTSYNC_DEAD_LETTER_URL": url, "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap}
        extra["PUBSUB_EMULATOR_HOST"] = pubsub_testbed.admin.host
        done = ctsync(tmp_path, {**env, **extra}, "check", "--json")
        letters = checks(done)["dead-letters"]
        assert letters["status"] == expected, (url, letters)
        if expected == "FAIL":
            assert "CTSYNC_DEAD_LETTER_URL" in letters["fix"]


def test_a_typo_in_an_env_file_is_a_warning_with_did_you_mean(
    tmp_path: Path, hook_server: HookServer
) -> None:
    payloads = tmp_path / "in.jsonl"
    payloads.write_text("")
    env_file = tmp_path / "settings.env"
    lines = [f"{k}={v}" for k, v in hook_server.env().items()]
    env_file.write_text("\n".join([*lines, f"CTSYNC_SOURCE=file:{payloads}", "IPAAS_BATCH_SIZ=10", ""]))
    done = ctsync(tmp_path, {}, "run", "--env-file", str(env_file))
    assert done.returncode == 0, done.stderr
    events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    [warning] = [e for e in events if e["event"] == "config.warning"]
    assert warning["variable"] == "IPAAS_BATCH_SIZ" and warning["did_you_mean"] == "IPAAS_BATCH_SIZE"
    assert "did you mean IPAAS_BATCH_SIZE?" in warning["reason"]

    # The typo that used to turn a broker source into a silent dry run: a configuration error, with the hint.
    env_file.write_text(
        f"IPAAS_HOOKURL={hook_server.url}\nIPAAS_WEBHOOK_API_KEY=k\nCTSYNC_SOURCE=file:{payloads}\n"
    )
    typo = ctsync(tmp_path, {}, "run", "--env-file", str(env_file))
    assert typo.returncode == 2
    assert "IPAAS_HOOKURL: not a ctsync setting; did you mean IPAAS_HOOK_URL?" in typo.stderr


def test_subscription_ensure_reads_the_topic_from_the_subscription(
    tmp_path: Path, pubsub_testbed: PubSubTestbed
) -> None:
    env = {
        "CTSYNC_SOURCE": "pubsub",
        "PUBSUB_SUBSCRIPTION": pubsub_testbed.subscription,
        "PUBSUB_EMULATOR_HOST": pubsub_testbed.admin.host,
    }
    done = ctsync(tmp_path, env, "subscription", "ensure", "--dry-run")
    assert done.returncode == 0, done.stderr
    draft = orjson.loads(done.stdout)
    assert draft["destination"]["type"] == "GoogleCloudPubSub"
    assert draft["destination"]["topic"] == pubsub_testbed.topic.rsplit("/", 1)[1]
    missing = ctsync(
        tmp_path,
        {**env, "PUBSUB_SUBSCRIPTION": "projects/ctsync-test/subscriptions/nope"},
        "subscription",
        "ensure",
        "--dry-run",
    )
    assert (
        missing.returncode == 2 and "--pubsub-topic" in missing.stderr and "does not exist" in missing.stderr
    )
