"""End to end: ``ctsync run`` with CTSYNC_SOURCE=pubsub as a subprocess, on Google's pstest server, against
the local hook server. pstest hands each stream about 100 messages/s: volumes stay small, waits poll."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.servers.hookserver import Fault, HookServer
from tests.servers.pstestserver import PubSubTestbed

pytestmark = pytest.mark.integration

CTSYNC = [sys.executable, "-m", "consumer.cli"]
# pstest's shortest ack deadline; a killed consumer's messages come back after about this long.
ACK_DEADLINE = 10


def updates(count: int, prefix: str, *, padding: int = 0) -> list[bytes]:
    """Return ``count`` ResourceUpdated payloads, one product each (nothing coalesces)."""
    extra = {"padding": "x" * padding} if padding else {}
    return [
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme",
                "resource": {"typeId": "product", "id": f"{prefix}-{i}"},
                "version": 2,
                "oldVersion": 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
                **extra,
            }
        )
        for i in range(count)
    ]


class Ctsync:
    """``ctsync run`` in the background; its JSON log goes to a file so a long run never blocks on a pipe."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        self.err_path = workdir / f"{name}.err"
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_"))
        }
        environ.update(
            CTSYNC_STATE_URL=f"sqlite:///{workdir}/state.db",
            CTSYNC_HTTP_LISTEN="127.0.0.1:0",
            CTSYNC_DRAIN_TIMEOUT_SECONDS="5",
        )
        environ.update(env)
        with self.log_path.open("wb") as out, self.err_path.open("wb") as err:
            self.process = subprocess.Popen(
                [*CTSYNC, "run"], env=environ, stdout=out, stderr=err, cwd=workdir
            )

    @property
    def events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_bytes().splitlines()
        events = []
        for line in lines:
            if line.startswith(b"{"):
                with contextlib.suppress(orjson.JSONDecodeError):  # a line being written
                    events.append(orjson.loads(line))
        return events

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(f"ctsync exited {self.process.returncode}: {self.err_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture
def run_ctsync(tmp_path: Path) -> Iterator[Callable[..., Ctsync]]:
    started: list[Ctsync] = []

    def start(env: dict[str, str], name: str = "ctsync") -> Ctsync:
        process = Ctsync(tmp_path, env, name)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait(timeout=10)


def acked_ids(process: Ctsync) -> set[str]:
    return {str(e["message_id"]) for e in process.named("message.acked")}


def assert_nothing_left(testbed: PubSubTestbed, subscription: str) -> None:
    """Pull until an unacked message's lease would have run out: nothing may come back."""
    deadline = time.monotonic() + ACK_DEADLINE + 2
    while time.monotonic() < deadline:
        left = testbed.admin.pull(subscription, ack=False)
        assert left == [], f"{len(left)} messages came back: {[m.message_id for m in left][:5]}"
        time.sleep(0.5)


def test_every_message_delivered_acked_and_poison_dead_lettered(
    pubsub_testbed: PubSubTestbed, hook_server: HookServer, run_ctsync: Callable[..., Ctsync]
) -> None:
    good = updates(150, "p")
    poison = [b"{not json", b'{"notificationType": "Bogus"}', b""]
    ids = pubsub_testbed.publish(good + poison)
    poison_ids = set(ids[-3:])
    ctsync = run_ctsync({**pubsub_testbed.env(), **hook_server.env()})
    hook_server.wait_for_notifications(150, timeout=30)
    ctsync.wait_for(lambda: acked_ids(ctsync) >= set(ids), 20, "every message acked")
    assert ctsync.stop() == 0, ctsync.err_path.read_text()

    assert sorted(e for _, e in hook_server.notifications) == sorted(f"p-{i}" for i in range(150))
    # Audit: received and acked carry the Pub/Sub message id and delivery attempt.
    received = ctsync.named("message.received")
    assert {e["message_id"] for e in received} == set(ids)
    # The Pub/Sub message id is the position: written once.
    assert all("delivery_attempt" in e and "position" not in e for e in received)
    assert all("delivery_attempt" in e for e in ctsync.named("message.acked"))
    assert hook_server.api_key not in ctsync.log_path.read_text()

    letters = pubsub_testbed.admin.pull_until(pubsub_testbed.dead_letter_subscription, 3, timeout=10)
    by_source_id = {m.attributes["source_message_id"]: m for m in letters}
    assert set(by_source_id) == poison_ids
    for message in letters:
        attributes = message.attributes
        assert attributes["source"] == "pubsub"
        assert attributes["position"] == attributes["source_message_id"]
        assert attributes["reason"]
        assert attributes["ctsync_type"] == "ctsync.dead_letter"
    assert {m.data for m in letters} == set(poison)
    reasons = {m.data: m.attributes["reason"] for m in letters}
    assert "JSON" in reasons[b"{not json"] and "notificationType" in reasons[b'{"notificationType": "Bogus"}']

    assert_nothing_left(pubsub_testbed, pubsub_testbed.subscription)


def test_sigkill_mid_stream_then_restart_loses_nothing(
    pubsub_testbed: PubSubTestbed,
    hook_server_factory: Callable[..., HookServer],
    run_ctsync: Callable[..., Ctsync],
) -> None:
    hooks = hook_server_factory()
    # Slow answers keep messages in flight (leased, not acked) when the kill lands.
    hooks.faults.always = Fault.delay(0.3)
    ids = pubsub_testbed.publish(updates(250, "k"))
    env = {
        **pubsub_testbed.env(),
        **hooks.env(),
        "IPAAS_BATCH_SIZE": "10",
        "IPAAS_CONCURRENT_BATCH_EXECUTIONS": "2",
    }
    first = run_ctsync(env, name="first")
    first.wait_for(lambda: len(acked_ids(first)) >= 40, 30, "some messages acked")
    first.stop(signal.SIGKILL)
    done_before = acked_ids(first)
    assert len(done_before) < len(ids)

    hooks.faults.always = None
    second = run_ctsync(env, name="second")
    # Leases of the killed consumer run out after the ack deadline, then everything arrives again.
    second.wait_for(
        lambda: done_before | acked_ids(second) >= set(ids),
        ACK_DEADLINE * 4,
        "every message acked by someone",
    )
    assert second.stop() == 0, second.err_path.read_text()
    assert {e for _, e in hooks.notifications} == {f"k-{i}" for i in range(250)}
    # At least once: only what was on the wire when the kill landed (two batches of 10) may go out twice.
    assert sum(n - 1 for n in _counts(hooks).values()) <= 20


def _counts(hooks: HookServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, external_id in hooks.notifications:
        counts[external_id] = counts.get(external_id, 0) + 1
    return counts


def test_slow_hook_with_large_backlog_keeps_memory_flat(
    pubsub_testbed: PubSubTestbed,
    hook_server_factory: Callable[..., HookServer],
    run_ctsync: Callable[..., Ctsync],
) -> None:
    hooks = hook_server_factory()
    hooks.faults.always = Fault.delay(0.2)
    max_in_flight = 40
    # 1,200 payloads of 32 KiB wait on the subscription: about 38 MiB that must stay on the server.
    ids = pubsub_testbed.publish(updates(1200, "m", padding=32 * 1024))
    env = {
        **pubsub_testbed.env(),
        **hooks.env(),
        "CTSYNC_MAX_IN_FLIGHT": str(max_in_flight),
        "IPAAS_BATCH_SIZE": "5",
        "IPAAS_CONCURRENT_CONNECTIONS": "1",
        "IPAAS_CONCURRENT_BATCH_EXECUTIONS": "1",
        "CTSYNC_LOG_LEVEL": "INFO",
    }
    ctsync = run_ctsync(env)
    ctsync.wait_for(lambda: len(acked_ids(ctsync)) >= 20, 30, "the first messages acked")
    baseline = ctsync.rss_kib()
    samples = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        samples.append(ctsync.rss_kib())
        time.sleep(0.25)
    acked_during = len(acked_ids(ctsync))
    assert ctsync.stop() == 0, ctsync.err_path.read_text()
    assert acked_during < len(ids) - 500, "the backlog must still be large while memory is sampled"
    growth_mib = (max(samples) - baseline) / 1024
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB (baseline {baseline / 1024:.1f} MiB)"
    # Never more than CTSYNC_MAX_IN_FLIGHT messages held at once, in the pipeline's own accounting.
    held, peak = 0, 0
    for event in ctsync.events:
        if event["event"] == "message.received":
            held += 1
        elif event["event"] in ("message.acked", "message.handed_back"):
            held -= 1
        peak = max(peak, held)
    assert 0 < peak <= max_in_flight


def test_missing_subscription_fails_at_start_naming_the_variable(
    pubsub_testbed: PubSubTestbed, hook_server: HookServer, run_ctsync: Callable[..., Ctsync]
) -> None:
    missing = pubsub_testbed.subscription + "-missing"
    ctsync = run_ctsync({**pubsub_testbed.env(), **hook_server.env(), "PUBSUB_SUBSCRIPTION": missing})
    assert ctsync.process.wait(timeout=30) == 1
    stderr = ctsync.err_path.read_text()
    assert "PUBSUB_SUBSCRIPTION" in stderr and missing in stderr and "does not exist" in stderr


async def test_probe_describes_a_subscription_or_raises(
    pubsub_testbed: PubSubTestbed, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.api_core.retry import Retry

    from adapters.pubsub import clients as pubsub
    from consumer.cli import wiring
    from consumer.config import load_settings

    # An unreachable server is retried for ADMIN_TIMEOUT_SECONDS; one second is enough to prove the point.
    monkeypatch.setattr(pubsub, "ADMIN_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(pubsub, "_ADMIN_RETRY", Retry(timeout=1.0))

    env = pubsub_testbed.env()
    description = await pubsub.probe(wiring.pubsub_options(load_settings(environ=env, for_command="check")))
    assert pubsub_testbed.subscription in description and pubsub_testbed.topic in description
    missing = {**env, "PUBSUB_SUBSCRIPTION": pubsub_testbed.subscription + "-missing"}
    with pytest.raises(LookupError, match="PUBSUB_SUBSCRIPTION"):
        await pubsub.probe(wiring.pubsub_options(load_settings(environ=missing, for_command="check")))
    unreachable = {**env, "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    with pytest.raises(ConnectionError, match="cannot reach"):
        await pubsub.probe(wiring.pubsub_options(load_settings(environ=unreachable, for_command="check")))


def test_dead_letters_replay_from_a_pubsub_subscription(
    pubsub_testbed: PubSubTestbed, hook_server: HookServer, tmp_path: Path
) -> None:
    # Letters as ctsync publishes them: the original payload, the reason and origin as attributes.
    bodies = updates(5, "d")
    pubsub_testbed.admin.publish(
        pubsub_testbed.dead_letter_topic,
        bodies,
        ctsync_type="ctsync.dead_letter",
        reason="hook rejected notification: HTTP 400",
        source="pubsub",
        position="m1",
        dead_lettered_at="2026-01-01T00:00:00+00:00",
    )
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_"))
    }
    environ.update(
        hook_server.env(),
        PUBSUB_EMULATOR_HOST=pubsub_testbed.admin.host,
        CTSYNC_STATE_URL="memory://",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
    )
    done = subprocess.run(
        [*CTSYNC, "dead-letters", "replay", pubsub_testbed.dead_letter_subscription],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(e for _, e in hook_server.notifications) == [f"d-{i}" for i in range(5)]
    events = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    acked = [e for e in events if e["event"] == "message.acked"]
    assert len(acked) == 5 and all(e["dead_letter_reason"].startswith("hook rejected") for e in acked)


async def test_messages_are_handed_over_on_the_stream_thread_and_acked(pubsub_testbed: PubSubTestbed) -> None:
    """The source's own scheduler runs the hand-over on the client's stream thread, not a callback pool,
    and acks made on the loop still reach the server through the client's dispatcher."""
    import asyncio
    import threading

    from adapters import pubsub
    from consumer.cli import wiring
    from consumer.config import load_settings

    bodies = updates(20, "h")
    pubsub_testbed.publish(bodies)
    threads: set[str] = set()

    class Recording(pubsub.PubSubSource):
        def on_message(self, message: Any) -> None:
            threads.add(threading.current_thread().name)
            super().on_message(message)

    settings = load_settings(environ=pubsub_testbed.env(), for_command="check")
    source = Recording(pubsub_testbed.subscription)
    source.start(pubsub.subscriber_client(wiring.pubsub_options(settings)), pubsub.flow_control(100))
    received: list[bytes] = []
    try:
        async with asyncio.timeout(60):
            while len(received) < len(bodies):
                for envelope in (await source.fetch(100)).envelopes:
                    received.append(envelope.body)
                    envelope.ack()
    finally:
        await source.close()
    assert sorted(received) == sorted(bodies)
    assert threads and not any(name.startswith("ThreadPoolExecutor") for name in threads), threads
    assert_nothing_left(pubsub_testbed, pubsub_testbed.subscription)
