"""``ctsync subscription ensure``: the pure draft and diff; create-then-noop-then-update against the mock."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from consumer import subscription as sub
from consumer.routing import DEFAULT_FAMILIES
from tests.servers.ctmockserver import CtProxy, project_key

CTSYNC = [sys.executable, "-m", "consumer.cli"]
PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")
TOPIC = "projects/gcp-acme/topics/commercetools"


def test_draft_has_messages_and_changes_for_every_routed_type() -> None:
    draft = sub.build_draft(["product", "order", "channel"], sub.pubsub_destination(TOPIC), key="ctsync")
    assert draft["destination"] == {
        "type": "GoogleCloudPubSub",
        "projectId": "gcp-acme",
        "topic": "commercetools",
    }
    assert draft["changes"] == [{"resourceTypeId": t} for t in ("channel", "order", "product")]
    # Channels have no messages in commercetools.
    assert draft["messages"] == [{"resourceTypeId": t, "types": []} for t in ("order", "product")]
    assert draft["format"] == {"type": "Platform"}
    assert sub.build_draft(["product"], {}, fmt="CloudEvents")["format"] == {
        "type": "CloudEvents",
        "cloudEventsVersion": "1.0",
    }


@pytest.mark.parametrize("bad", ["topics/x", "projects/p/subscriptions/s", "projects//topics/t"])
def test_bad_pubsub_topic(bad: str) -> None:
    with pytest.raises(sub.SubscriptionError):
        sub.pubsub_destination(bad)


def test_bad_key_and_empty_types() -> None:
    with pytest.raises(sub.SubscriptionError):
        sub.build_draft(["product"], {}, key="has space")
    with pytest.raises(sub.SubscriptionError):
        sub.build_draft([], {})


def test_update_actions() -> None:
    draft = sub.build_draft(["product", "order"], sub.pubsub_destination(TOPIC))
    existing = {**draft, "version": 3, "status": "Healthy", "messages": list(reversed(draft["messages"]))}
    assert sub.update_actions(existing, draft) == []
    moved = sub.build_draft(["product", "order"], sub.pubsub_destination("projects/gcp-acme/topics/other"))
    assert [a["action"] for a in sub.update_actions(existing, moved)] == ["changeDestination"]
    fewer = sub.build_draft(["product"], sub.pubsub_destination(TOPIC))
    assert [a["action"] for a in sub.update_actions(existing, fewer)] == ["setMessages", "setChanges"]
    with pytest.raises(sub.SubscriptionError, match="format"):
        sub.update_actions(
            existing, sub.build_draft(["product", "order"], draft["destination"], fmt="CloudEvents")
        )


def test_confluent_secret_is_masked_and_not_compared() -> None:
    destination = sub.confluent_destination(
        "pkc-1.europe-west1.gcp.confluent.cloud:9092", "ct", "KEY", "s3cr3t"
    )
    draft = sub.build_draft(["product"], destination)
    assert sub.masked(draft)["destination"]["apiSecret"] == sub.MASK
    assert "s3cr3t" not in orjson.dumps(sub.masked(draft)).decode()
    returned = {**draft, "destination": {**destination, "apiSecret": "****"}}
    assert sub.update_actions(returned, draft) == []


# --- against commercetools-mock ---


@pytest.fixture
def ensure(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
        environ.update(env)
        return subprocess.run(
            [*CTSYNC, "subscription", "ensure", *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    return run


@pytest.mark.integration
def test_create_then_noop_then_update(
    ensure: Callable[..., subprocess.CompletedProcess[str]], ct_proxy: CtProxy, tmp_path: Path
) -> None:
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"manage_subscriptions:{project}"])
    env = ct_proxy.env(project, client_id, secret)

    created = ensure(env, "--pubsub-topic", TOPIC)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created subscription ctsync")
    assert "status: Healthy" in created.stdout

    again = ensure(env, "--pubsub-topic", TOPIC)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("subscription ctsync is up to date (version 1)")
    posts = [s for s in ct_proxy.api_requests() if s.method == "POST"]
    assert len(posts) == 1

    scope_map = tmp_path / "scopes.toml"
    scope_map.write_text("[types.cart]\nfamily = 'cart'\n\n[types.order]\nenabled = false\n")
    updated = ensure(
        {**env, "IPAAS_SCOPE_MAP": str(scope_map)}, "--pubsub-topic", "projects/gcp-acme/topics/x"
    )
    assert updated.returncode == 0, updated.stderr
    assert updated.stdout.startswith(
        "updated subscription ctsync (changeDestination, setMessages, setChanges)"
    )

    final = ensure({**env, "IPAAS_SCOPE_MAP": str(scope_map)}, "--pubsub-topic", "projects/gcp-acme/topics/x")
    assert "is up to date" in final.stdout
    changes = final.stdout.split("changes: ")[1].splitlines()[0].split(", ")
    assert "cart" in changes and "order" not in changes
    assert secret not in created.stdout + created.stderr + updated.stdout + updated.stderr


@pytest.mark.integration
def test_dry_run_prints_the_draft_with_the_secret_masked(
    ensure: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "pkc-1.europe-west1.gcp.confluent.cloud:9092",
        "KAFKA_TOPICS": "commercetools",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "CLUSTERKEY",
        "KAFKA_SASL_PASSWORD": "cluster-secret-value",
        "CTSYNC_SOURCE": "kafka",
    }
    done = ensure(env, "--dry-run", "--format", "CloudEvents", "--key", "ctsync-prod")
    assert done.returncode == 0, done.stderr
    draft = orjson.loads(done.stdout)
    assert draft["key"] == "ctsync-prod" and draft["format"]["type"] == "CloudEvents"
    assert draft["destination"]["type"] == "ConfluentCloud"
    assert draft["destination"]["apiKey"] == "CLUSTERKEY" and draft["destination"]["apiSecret"] == sub.MASK
    assert {c["resourceTypeId"] for c in draft["changes"]} == set(DEFAULT_FAMILIES)
    assert "cluster-secret-value" not in done.stdout + done.stderr


@pytest.mark.integration
def test_pubsub_destination_needs_a_topic(ensure: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    done = ensure(
        {"CTSYNC_SOURCE": "pubsub", "PUBSUB_SUBSCRIPTION": "projects/p/subscriptions/s"}, "--dry-run"
    )
    assert done.returncode == 2 and "--pubsub-topic" in done.stderr
