"""Apache Kafka 4 (KRaft) for the tests, with a SASL_SSL/PLAIN listener as on Confluent Cloud.

The broker's jars come from the Maven registry (``tests/apachekafka/pom.xml``), fetched once into
``.cache/apachekafka/``. Each test session makes a throwaway CA and a broker certificate for ``localhost`` and
``127.0.0.1``, formats one KRaft node (broker and controller) and starts it on free ports with two client
listeners: PLAINTEXT, and SASL_SSL with PLAIN (users in an inline JAAS line). Topics are never created on use
(``auto.create.topics.enable=false``), as on Confluent Cloud.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests import REPO_ROOT
from tests.servers.kafkaserver import Kafka, free_port, stop_process

ROOT = REPO_ROOT
POM = Path(__file__).resolve().parent / "apachekafka" / "pom.xml"
CACHE = ROOT / ".cache" / "apachekafka"
USERNAME = "ctsync-key"
PASSWORD = "ctsync-secret"
KEYSTORE_PASSWORD = "changeit"
START_TIMEOUT_S = 120.0


class BrokerUnavailable(RuntimeError):
    """Java or Maven is missing, or the jars could not be fetched."""


def broker_jars() -> Path:
    """Fetch the broker's jars once (per version of the pom) and return their folder."""
    for tool in ("java", "mvn"):
        if shutil.which(tool) is None:
            raise BrokerUnavailable(f"{tool} is not installed: run `make servers`")
    digest = hashlib.sha1(POM.read_bytes()).hexdigest()[:12]
    libs = CACHE / f"libs-{digest}"
    if (libs / ".complete").exists():
        return libs
    partial = CACHE / f"libs-{digest}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    fetched = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if fetched.returncode != 0:
        raise BrokerUnavailable(
            f"mvn could not fetch the Kafka jars: {(fetched.stdout + fetched.stderr)[-2000:]}"
        )
    (partial / ".complete").touch()
    try:
        partial.rename(libs)
    except OSError:  # another session finished first; its copy is as good
        shutil.rmtree(partial, ignore_errors=True)
    return libs


# ------------------------------------------------------------------------------------------------- TLS


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_broker_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# ---------------------------------------------------------------------------------------------- broker


@dataclass
class ApacheKafka:
    """A running broker: its two client listeners, the CA that signed it, and the SASL user it knows."""

    proc: subprocess.Popen[bytes]
    plaintext: str
    sasl_ssl: str
    ca_file: Path
    other_ca_file: Path
    log_path: Path
    started_in_s: float
    username: str = USERNAME
    password: str = PASSWORD

    def client_options(self, password: str | None = None) -> dict[str, Any]:
        """aiokafka options for the SASL_SSL listener (the test side of the Confluent Cloud path)."""
        from aiokafka.helpers import create_ssl_context

        return {
            "security_protocol": "SASL_SSL",
            "ssl_context": create_ssl_context(cafile=str(self.ca_file)),
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": self.username,
            "sasl_plain_password": password or self.password,
        }

    def env(self, **overrides: str) -> dict[str, str]:
        """ctsync's settings for the SASL_SSL listener, as an operator of a private Kafka would set them."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.sasl_ssl,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": self.username,
            "KAFKA_SASL_PASSWORD": self.password,
            "KAFKA_SSL_CAFILE": str(self.ca_file),
            **overrides,
        }

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def _server_properties(workdir: Path, ports: dict[str, int], keystore: Path) -> str:
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{USERNAME}" password="{PASSWORD}" user_{USERNAME}="{PASSWORD}";'
    )
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{ports['controller']}",
        "controller.listener.names": "CONTROLLER",
        "listeners": (
            f"PLAINTEXT://127.0.0.1:{ports['plaintext']},SASL_SSL://127.0.0.1:{ports['sasl_ssl']},"
            f"CONTROLLER://127.0.0.1:{ports['controller']}"
        ),
        # The certificate names localhost: clients reach the TLS listener by that name, as by a DNS name.
        "advertised.listeners": (
            f"PLAINTEXT://127.0.0.1:{ports['plaintext']},SASL_SSL://localhost:{ports['sasl_ssl']}"
        ),
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_ssl.plain.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(keystore),
        "ssl.keystore.password": KEYSTORE_PASSWORD,
        "log.dirs": str(workdir / "data"),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
    }
    return "".join(f"{name}={value}\n" for name, value in settings.items())


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def start_apache_kafka(workdir: Path) -> ApacheKafka:
    """Make the TLS material, format and start one KRaft node; return once its listeners answer."""
    libs = broker_jars()
    workdir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca("ctsync test CA")
    broker_key, broker_cert = make_broker_certificate(ca_key, ca_cert)
    _, other_cert = make_ca("some other CA")
    keystore = workdir / "broker.p12"
    keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"broker",
            broker_key,
            broker_cert,
            [ca_cert],
            serialization.BestAvailableEncryption(KEYSTORE_PASSWORD.encode()),
        )
    )
    ports = {"plaintext": free_port(), "sasl_ssl": free_port(), "controller": free_port()}
    properties = workdir / "server.properties"
    properties.write_text(_server_properties(workdir, ports, keystore))
    log_path = workdir / "server.log"
    (workdir / "log4j2.properties").write_text(_LOG4J2.format(log=log_path))
    java = [
        "java",
        # Small and quick to start: one node of a test cluster, on a shared machine with two cores.
        "-Xms128m",
        "-Xmx512m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        f"-Dlog4j2.configurationFile={workdir / 'log4j2.properties'}",
        "-cp",
        f"{libs}/*",
    ]
    # 16 bytes in URL-safe base64; a leading '-' would read as an option, so none at all.
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode().replace("-", "k")
    started = time.monotonic()
    formatted = subprocess.run(
        [*java, "kafka.tools.StorageTool", "format", "--cluster-id", cluster_id, "--config", str(properties)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if formatted.returncode != 0:
        raise RuntimeError(f"kafka-storage format failed: {(formatted.stdout + formatted.stderr)[-2000:]}")
    with (workdir / "stdout.log").open("wb") as out:
        proc = subprocess.Popen([*java, "kafka.Kafka", str(properties)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (log_path.exists() and b"Kafka Server started" in log_path.read_bytes()):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise RuntimeError(f"Apache Kafka did not start: {text[-3000:]}")
        time.sleep(0.1)
    for port in ports.values():
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    return ApacheKafka(
        proc=proc,
        plaintext=f"127.0.0.1:{ports['plaintext']}",
        sasl_ssl=f"localhost:{ports['sasl_ssl']}",
        ca_file=write_pem(workdir / "ca.pem", ca_cert),
        other_ca_file=write_pem(workdir / "other-ca.pem", other_cert),
        log_path=log_path,
        started_in_s=time.monotonic() - started,
    )


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    """One Apache Kafka node for the session; without Java it skips (fails under CTSYNC_REQUIRE_SERVERS)."""
    try:
        broker = start_apache_kafka(tmp_path_factory.mktemp("apachekafka"))
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield broker
    finally:
        stop_process(broker.proc)


@pytest.fixture
async def apache(apache_kafka: ApacheKafka) -> AsyncIterator[Kafka]:
    """The topic, produce and offset helpers of the tansu tests, over the SASL_SSL listener."""
    yield Kafka(apache_kafka.sasl_ssl, **apache_kafka.client_options())
