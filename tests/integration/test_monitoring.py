"""deploy/monitoring/: the alert rules pass promtool's own unit tests, the dashboard is well formed, and every
ctsync metric the rules and the dashboard read is exposed by a running ``ctsync run``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import REPO_ROOT
from tests.integration.test_deploy import render, rendered
from tests.integration.test_kafka import kafka_env, updates
from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import Ctsync, Kafka

ROOT = REPO_ROOT
MONITORING = ROOT / "deploy" / "monitoring"
# Metrics read from other exporters, by design: ctsync cannot see a Pub/Sub subscription's backlog.
FOREIGN_METRICS = {
    "stackdriver_pubsub_subscription_pubsub_googleapis_com_subscription_num_undelivered_messages"
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: run `make servers` (Debian package prometheus)")
    return found


def rule_spec() -> dict[str, Any]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    spec: dict[str, Any] = rule["spec"]
    return spec


def dashboard() -> dict[str, Any]:
    found: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return found


def expressions() -> Iterator[str]:
    for group in rule_spec()["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            yield target["expr"]


def metrics_used() -> set[str]:
    """Every metric name the rules and the dashboard query (functions, keywords and labels left out)."""
    names: set[str] = set()
    for expression in expressions():
        without_labels = re.sub(r"\{[^}]*\}", "{}", expression)
        without_grouping = re.sub(r"\b(by|without)\s*\([^)]*\)", "", without_labels)
        names.update(re.findall(r"\b(?:ctsync|stackdriver)_[a-z0-9_]+", without_grouping))
    return names


def test_the_rules_pass_promtool_check_and_their_unit_tests(tmp_path: Path) -> None:
    binary = promtool()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec()))
    shutil.copy(MONITORING / "tests" / "rules-test.yaml", tmp_path / "rules-test.yaml")
    checked = subprocess.run(
        [binary, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [binary, "test", "rules", "rules-test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_and_a_severity() -> None:
    tests = yaml.safe_load((MONITORING / "tests" / "rules-test.yaml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    alerts = [rule for group in rule_spec()["groups"] for rule in group["rules"] if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == tested
    assert all(rule["labels"]["severity"] in ("critical", "warning", "info") for rule in alerts)


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    board = dashboard()
    titles = " ".join(panel["title"].lower() for panel in board["panels"])
    for topic in ("throughput", "budget", "latency", "lag", "dead letters", "retries", "ready"):
        assert topic in titles, topic
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"


def test_the_monitoring_objects_select_the_ctsync_service() -> None:
    documents = render(MONITORING)
    monitor = next(d for d in documents if d["kind"] == "ServiceMonitor")
    service = next(
        d for d in rendered("kafka") if d["kind"] == "Service" and d["metadata"]["name"] == "ctsync"
    )
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert all(
        endpoint["port"] in ports and endpoint["path"] == "/metrics"
        for endpoint in monitor["spec"]["endpoints"]
    )
    configmap = next(d for d in documents if d["kind"] == "ConfigMap")
    assert json.loads(configmap["data"]["grafana-dashboard.json"]) == dashboard()


def exposed_names(text: str) -> set[str]:
    """Every series name /metrics declares, including families that have no sample yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
            names.update(family + suffix for suffix in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@pytest.mark.integration
async def test_every_metric_the_rules_and_dashboard_use_is_exposed_by_a_running_ctsync(
    kafka: Kafka, hook_server: HookServer, ctsync_process: Callable[..., Ctsync]
) -> None:
    topic = await kafka.create_topic(partitions=2)
    letters = await kafka.create_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    await kafka.produce(topic, [*updates(20, 10), b"not json {"])
    service = ctsync_process(
        kafka_env(kafka, topic, group, hook_server, CTSYNC_DEAD_LETTER_URL=f"kafka://{letters}")
    )
    service.wait_for(lambda: len(service.events("message.acked")) >= 21, message="21 acks")
    async with httpx.AsyncClient(base_url=f"http://{service.env['CTSYNC_HTTP_LISTEN']}", timeout=5) as client:
        scrape = (await client.get("/metrics")).text
    assert service.stop() == 0
    used = metrics_used()
    assert {name for name in used if name.startswith("ctsync_")} - exposed_names(scrape) == set()
    assert {name for name in used if not name.startswith("ctsync_")} <= FOREIGN_METRICS
    assert_promtool_accepts(scrape)


def assert_promtool_accepts(scrape: str) -> None:
    """The scrape itself is well formed for Prometheus (names, help, units)."""
    checked = subprocess.run([promtool(), "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
