"""The Kafka source on Apache Kafka 4 over SASL_SSL with PLAIN and a private CA: the Confluent Cloud path.

The tansu tests of ``test_kafka.py`` run here unchanged against the SASL_SSL listener (their helpers take the
TLS and SASL options; ctsync gets KAFKA_SECURITY_PROTOCOL, the SASL user and KAFKA_SSL_CAFILE). Apache Kafka
also answers group offsets and end offsets exactly, which tansu does not. Then what goes wrong on such a
cluster: a refused password and a certificate from a CA ctsync does not trust.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from adapters.kafka import client_options
from consumer.cli import wiring
from consumer.config import ConfigError, load_settings
from tests.integration import test_kafka
from tests.integration.test_kafka import kafka_env, updates
from tests.servers.apachekafka import ApacheKafka
from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import CTSYNC, Ctsync, Kafka

pytestmark = pytest.mark.integration


@pytest.fixture
def sasl_ctsync(apache_kafka: ApacheKafka, ctsync_process: Callable[..., Ctsync]) -> Callable[..., Ctsync]:
    """``ctsync run`` set up for the SASL_SSL listener: protocol, PLAIN user, and the cluster's own CA."""

    def start(env: dict[str, str], name: str = "ctsync") -> Ctsync:
        return ctsync_process({**apache_kafka.env(), **env}, name)

    return start


# ------------------------------------------------------------------ the tansu tests, on Apache Kafka


async def test_end_to_end_over_sasl_ssl(
    apache: Kafka, hook_server: HookServer, sasl_ctsync: Callable[..., Ctsync]
) -> None:
    await test_kafka.test_end_to_end_delivers_everything_and_commits_to_the_end(
        apache, hook_server, sasl_ctsync
    )


async def test_dead_letter_topic_over_sasl_ssl(
    apache: Kafka, hook_server: HookServer, sasl_ctsync: Callable[..., Ctsync]
) -> None:
    await test_kafka.test_poison_records_go_to_the_dead_letter_topic_without_blocking(
        apache, hook_server, sasl_ctsync
    )


async def test_dead_letters_replayed_from_a_topic_over_sasl_ssl(
    apache: Kafka, hook_server: HookServer, sasl_ctsync: Callable[..., Ctsync], tmp_path: Path
) -> None:
    await test_kafka.test_dead_letters_on_a_topic_are_replayed_after_a_fix(
        apache, hook_server, sasl_ctsync, tmp_path
    )


async def test_rebalance_between_two_replicas_loses_nothing_over_sasl_ssl(
    apache: Kafka, hook_server: HookServer, sasl_ctsync: Callable[..., Ctsync]
) -> None:
    await test_kafka.test_a_second_replica_joins_and_the_first_leaves_without_loss(
        apache, hook_server, sasl_ctsync
    )


async def test_a_killed_service_loses_nothing_over_sasl_ssl(
    apache: Kafka, hook_server_factory: Callable[..., HookServer], sasl_ctsync: Callable[..., Ctsync]
) -> None:
    await test_kafka.test_a_killed_service_loses_nothing_after_restart(
        apache, hook_server_factory, sasl_ctsync
    )


async def test_end_offsets_and_lag_are_exact(
    apache: Kafka, hook_server: HookServer, sasl_ctsync: Callable[..., Ctsync]
) -> None:
    # tansu reports a wrong end offset after batched produces; a real broker's lag must come out exact.
    topic = await apache.create_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    ends = await apache.produce(topic, updates(90, 30))
    service = sasl_ctsync(kafka_env(apache, topic, group, hook_server))
    service.wait_for(lambda: len(service.events("message.acked")) >= 90, message="90 acks")
    [started] = service.events("service.started")
    assert started["kafka_security_protocol"] == "SASL_SSL" and started["kafka_ssl_cafile"]
    base = f"http://{service.env['CTSYNC_HTTP_LISTEN']}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            metrics = (await client.get("/metrics")).text
            lags = [line for line in metrics.splitlines() if line.startswith("ctsync_kafka_consumer_lag{")]
            if len(lags) == 3 and all(line.endswith(" 0.0") for line in lags):
                break
            assert asyncio.get_running_loop().time() < deadline, lags
            await asyncio.sleep(0.5)
    assert service.stop() == 0
    assert await apache.committed(group, topic) == ends


# ------------------------------------------------------------------------------ what goes wrong


def _never_ready(service: Ctsync) -> None:
    """The service gives up on its own; until it has exited, /readyz never says ready."""
    assert service.proc is not None
    url = f"http://{service.env['CTSYNC_HTTP_LISTEN']}/readyz"
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=2) as client:
        while service.proc.poll() is None:
            assert time.monotonic() < deadline, "ctsync keeps running against a broker that refuses it"
            try:
                status = client.get(url).status_code
            except httpx.TransportError:
                status = None
            assert status != 200, "ready although the broker refused it"
            time.sleep(0.2)
    assert service.proc.returncode != 0


def _check(env: dict[str, str], tmp_path: Path) -> dict[str, dict[str, str]]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_"))
    }
    environ.update(CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/check.db", **env)
    done = subprocess.run(
        [*CTSYNC, "check", "--json"], env=environ, capture_output=True, text=True, timeout=90, cwd=tmp_path
    )
    assert done.stdout, done.stderr
    assert "wrong-secret" not in done.stdout + done.stderr
    return {c["name"]: c for c in orjson.loads(done.stdout)["checks"]}


REFUSALS = {
    # case: (settings, the variable the error names, a word of the broker's or TLS's own reason)
    "wrong password": (
        {"KAFKA_SASL_PASSWORD": "wrong-secret"},
        "KAFKA_SASL_PASSWORD",
        "Authentication failed",
    ),
    "another CA": ({"KAFKA_SSL_CAFILE": "<other CA>"}, "KAFKA_SSL_CAFILE", "does not chain to the CA in"),
    "only the system CAs": (
        {"KAFKA_SSL_CAFILE": ""},
        "KAFKA_SSL_CAFILE",
        "does not chain to a CA of the system",
    ),
    "SASL_SSL to a plaintext listener": (
        {"KAFKA_BOOTSTRAP_SERVERS": "<plaintext>"},
        "KAFKA_SECURITY_PROTOCOL",
        "TLS handshake",
    ),
    "SASL_PLAINTEXT to a TLS listener": (
        {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SSL_CAFILE": ""},
        "KAFKA_SECURITY_PROTOCOL",
        "closed the connection at once",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_refused_connection_names_the_variable_and_the_fix(
    case: str,
    apache_kafka: ApacheKafka,
    apache: Kafka,
    hook_server: HookServer,
    sasl_ctsync: Callable[..., Ctsync],
    tmp_path: Path,
) -> None:
    settings, variable, reason = REFUSALS[case]
    stand_ins = {"<other CA>": str(apache_kafka.other_ca_file), "<plaintext>": apache_kafka.plaintext}
    settings = {k: stand_ins.get(v, v) for k, v in settings.items()}
    topic = await apache.create_topic(partitions=1)
    env = {**kafka_env(apache, topic, f"g-{uuid.uuid4().hex[:8]}", hook_server), **settings}
    service = sasl_ctsync(env)
    await asyncio.to_thread(_never_ready, service)
    said = service.stderr()
    assert variable in said and reason in said, said
    assert "wrong-secret" not in said
    stopped = service.events("service.stopped")
    assert stopped and variable in str(stopped[-1]["error"])

    checks = await asyncio.to_thread(_check, {**apache_kafka.env(), **env}, tmp_path)
    source = checks["source"]
    assert source["status"] == "FAIL", source
    assert variable in source["detail"] and reason in source["detail"], source
    assert variable in source["fix"], source


async def test_the_right_settings_pass_the_check(
    apache_kafka: ApacheKafka, apache: Kafka, hook_server: HookServer, tmp_path: Path
) -> None:
    topic = await apache.create_topic(partitions=2)
    env = {**apache_kafka.env(), **kafka_env(apache, topic, "g", hook_server)}
    source = (await asyncio.to_thread(_check, env, tmp_path))["source"]
    assert source["status"] == "OK" and f"{topic} (2 partitions)" in source["detail"], source


# ------------------------------------------------------------------------------------ KAFKA_SSL_CAFILE


def test_the_private_ca_is_the_one_trusted(tmp_path: Path) -> None:
    from tests.servers.apachekafka import make_ca, write_pem

    _, cert = make_ca("private test CA")
    ca_file = write_pem(tmp_path / "ca.pem", cert)
    environ = {
        "CTSYNC_SOURCE": "kafka",
        "CTSYNC_DRY_RUN": "true",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka.internal:9093",
        "KAFKA_TOPICS": "ct",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "u",
        "KAFKA_SASL_PASSWORD": "p",
    }
    private = client_options(
        wiring.kafka_options(load_settings(None, environ={**environ, "KAFKA_SSL_CAFILE": f" {ca_file} "}))
    )
    issuers = [dict(item[0] for item in ca["subject"]) for ca in private["ssl_context"].get_ca_certs()]
    assert issuers == [{"commonName": "private test CA"}]
    assert private["ssl_context"].check_hostname
    # Unset: the system's CAs, as for Confluent Cloud.
    public = client_options(wiring.kafka_options(load_settings(None, environ=environ)))
    assert {"commonName": "private test CA"} not in [
        dict(item[0] for item in ca["subject"]) for ca in public["ssl_context"].get_ca_certs()
    ]


@pytest.mark.parametrize(
    ("content", "protocol", "expected"),
    [
        (None, "SASL_SSL", "KAFKA_SSL_CAFILE: file does not exist"),
        (b"", "SASL_SSL", "KAFKA_SSL_CAFILE: holds no PEM certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
            "SSL",
            "no PEM certificate",
        ),
        ("ca", "PLAINTEXT", "KAFKA_SSL_CAFILE: set, but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
    ],
)
def test_a_bad_ca_file_is_named(
    content: bytes | str | None, protocol: str, expected: str, tmp_path: Path
) -> None:
    from tests.servers.apachekafka import make_ca, write_pem

    path = tmp_path / "ca.pem"
    if content == "ca":
        write_pem(path, make_ca("CA")[1])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    environ = {"KAFKA_SECURITY_PROTOCOL": protocol, "KAFKA_SSL_CAFILE": str(path)}
    if protocol.startswith("SASL_"):
        environ |= {"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}
    with pytest.raises(ConfigError) as raised:
        load_settings(None, environ=environ, for_command="check")
    assert expected in str(raised.value)
