"""Google's in-memory Pub/Sub server (``pstest``) for tests, built from Debian's Go packages.

``tests/pstest/main.go`` is built into ``.cache/pstest/`` (``golang-go`` and ``golang-google-cloud-dev`` are
installed with apt-get when missing) and started once per session on a free port. Where
``PUBSUB_EMULATOR_HOST`` is already set (gcloud's emulator, say), that server is used instead.

Fixtures: ``pstest`` (session: the emulator's ``host:port``), ``pubsub_admin`` (session: clients) and
``pubsub_testbed`` (per test: a fresh topic, subscription, dead-letter topic and dead-letter subscription).
Mind the server's pace: it hands each open stream about one message per 10 ms.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
import grpc
import pytest
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from tests import REPO_ROOT

ROOT = REPO_ROOT
SOURCE = Path(__file__).resolve().parent / "pstest" / "main.go"
CACHE = ROOT / ".cache" / "pstest"
BINARY = CACHE / "pstest-server"
GOPATH = Path("/usr/share/gocode")
PSTEST_PACKAGE = GOPATH / "src" / "cloud.google.com" / "go" / "pubsub" / "pstest"
RPC_TIMEOUT = 10.0


def _install_go() -> None:
    if shutil.which("go") and PSTEST_PACKAGE.is_dir():
        return
    if shutil.which("apt-get") is None:
        pytest.skip("pstest needs Go and Debian's golang-google-cloud-dev; apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = ["golang-go", "golang-google-cloud-dev"]
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or shutil.which("go") is None:
        pytest.skip(f"cannot install Go for pstest: {done.stderr.strip()[-500:]}")


def build_pstest() -> Path:
    """Return the pstest server binary, building it first when it is missing or older than its source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    _install_go()
    CACHE.mkdir(parents=True, exist_ok=True)
    # Built under a unique name and renamed: two test sessions may build at once.
    partial = CACHE / f"pstest-server.{os.getpid()}.tmp"
    env = {
        **os.environ,
        "GOPATH": str(GOPATH),
        "GO111MODULE": "off",
        "GOCACHE": str(CACHE / "gocache"),
        "GOFLAGS": "",
    }
    done = subprocess.run(
        ["go", "build", "-o", str(partial), str(SOURCE)], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        pytest.fail(f"building pstest failed:\n{done.stderr}")
    os.replace(partial, BINARY)
    return BINARY


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline() if process.stdout else ""))
    reader.daemon = True
    reader.start()
    reader.join(timeout)
    if not line or not line[0].strip():
        raise RuntimeError(f"pstest did not print its address within {timeout}s")
    return line[0].strip()


@pytest.fixture(scope="session")
def pstest() -> Iterator[str]:
    """Yield the ``host:port`` of a Pub/Sub emulator: an already-set PUBSUB_EMULATOR_HOST, or our pstest."""
    preset = os.environ.get("PUBSUB_EMULATOR_HOST")
    if preset:
        yield preset
        return
    binary = build_pstest()
    process = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield _first_line(process, timeout=15)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _channel(host: str) -> grpc.Channel:
    return grpc.insecure_channel(
        host, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )


@dataclass
class PubSubAdmin:
    """Plain clients on the emulator for test set-up and inspection."""

    host: str
    publisher: Any
    subscriber: Any

    def create_topic(self, name: str) -> str:
        self.publisher.create_topic(request={"name": name}, timeout=RPC_TIMEOUT)
        return name

    def create_subscription(self, name: str, topic: str, ack_deadline_seconds: int = 10) -> str:
        self.subscriber.create_subscription(
            request={"name": name, "topic": topic, "ack_deadline_seconds": ack_deadline_seconds},
            timeout=RPC_TIMEOUT,
        )
        return name

    def publish(self, topic: str, bodies: Sequence[bytes], **attributes: str) -> list[str]:
        """Publish every body and return the message ids once all are stored."""
        futures = [self.publisher.publish(topic, body, **attributes) for body in bodies]
        return [future.result(timeout=RPC_TIMEOUT) for future in futures]

    def pull(self, subscription: str, max_messages: int = 1000, *, ack: bool = True) -> list[Any]:
        """Pull what is available (pstest answers within 0.5 s) and ack it unless ``ack`` is false."""
        response = self.subscriber.pull(
            request={"subscription": subscription, "max_messages": max_messages, "return_immediately": False},
            timeout=RPC_TIMEOUT,
        )
        received = list(response.received_messages)
        if ack and received:
            self.subscriber.acknowledge(
                request={"subscription": subscription, "ack_ids": [r.ack_id for r in received]},
                timeout=RPC_TIMEOUT,
            )
        return [r.message for r in received]

    def pull_until(self, subscription: str, count: int, timeout: float) -> list[Any]:
        """Pull (and ack) until ``count`` messages arrived; fail after ``timeout`` seconds."""
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"pulled {len(messages)} of {count} messages from {subscription}")
            got = self.pull(subscription)
            messages.extend(got)
            if not got:
                time.sleep(0.1)
        return messages


@pytest.fixture(scope="session")
def pubsub_admin(pstest: str) -> Iterator[PubSubAdmin]:
    publisher = pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=_channel(pstest)))
    subscriber = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=_channel(pstest)))
    try:
        yield PubSubAdmin(pstest, publisher, subscriber)
    finally:
        with contextlib.suppress(Exception):
            publisher.stop()
        subscriber.close()


@dataclass
class PubSubTestbed:
    """A fresh topic and subscription, and a dead-letter topic with a subscription to read it back."""

    admin: PubSubAdmin
    topic: str
    subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Return ctsync's environment for a Pub/Sub source and a Pub/Sub dead-letter topic."""
        return {
            "CTSYNC_SOURCE": "pubsub",
            "PUBSUB_EMULATOR_HOST": self.admin.host,
            "PUBSUB_SUBSCRIPTION": self.subscription,
            "CTSYNC_DEAD_LETTER_URL": f"pubsub://{self.dead_letter_topic}",
        }

    def publish(self, bodies: Sequence[bytes]) -> list[str]:
        return self.admin.publish(self.topic, bodies)


@pytest.fixture
def pubsub_testbed(pubsub_admin: PubSubAdmin) -> PubSubTestbed:
    project = "ctsync-test"
    tag = uuid.uuid4().hex[:10]
    topic = pubsub_admin.create_topic(f"projects/{project}/topics/changes-{tag}")
    subscription = pubsub_admin.create_subscription(f"projects/{project}/subscriptions/ctsync-{tag}", topic)
    dead_topic = pubsub_admin.create_topic(f"projects/{project}/topics/dead-{tag}")
    dead_subscription = pubsub_admin.create_subscription(
        f"projects/{project}/subscriptions/dead-{tag}", dead_topic
    )
    return PubSubTestbed(pubsub_admin, topic, subscription, dead_topic, dead_subscription)
