"""Benchmark the Kafka source on real brokers (tansu, Apache Kafka), each figure beside a same-run baseline.

1. Throughput: a raw aiokafka ``getmany`` loop over the topic (the ceiling), then ctsync end to end (Kafka
   source -> pipeline -> HTTP to an unthrottled local hook server in another process -> acks -> commits).
   Target ratio >= 0.5. A second baseline, the raw loop that also ``orjson.loads`` every value, shows how much
   of that budget the least possible per-record work already takes. ctsync runs at the default
   ``IPAAS_BATCH_SIZE`` (100) and at the largest (1000).
   All are timed from their first record to their last, so the group join is not counted.
2. Under a throttle of 20 requests per 2 s, the same 10,000 payloads over 1,000 entities: ctsync against the
   obvious implementation (aiokafka loop, one POST per message, aiolimiter). Payloads delivered per minute
   and requests used. Target >= 50x.
3. Peak RSS of a ``ctsync run`` subprocess while 200,000 payloads wait behind a throttle. Target <= 250 MiB.
4. The same payloads on Apache Kafka 4 (``tests/apachekafka.py``; needs Java, skipped with ``--no-apache``):
   the raw ``getmany`` ceiling over PLAINTEXT and over SASL_SSL (TLS and PLAIN, as on Confluent Cloud), and
   ctsync over SASL_SSL against the latter.

Run: ``make bench`` or ``.venv/bin/python -m bench.kafka [--payloads N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer
from aiolimiter import AsyncLimiter

ROOT = Path(__file__).resolve().parent.parent

from consumer import audit, collector  # noqa: E402
from consumer.cli import wiring  # noqa: E402
from consumer.config import load_settings  # noqa: E402
from tests.servers.apachekafka import BrokerUnavailable, start_apache_kafka  # noqa: E402
from tests.servers.hookserver import HookServer  # noqa: E402
from tests.servers.kafkaserver import Kafka, start_tansu, stop_process  # noqa: E402


def _pipeline_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HookProcess:
    """An unthrottled hook server in a process of its own, so its request parsing does not share this
    process's interpreter lock with the ctsync being measured."""

    limit = None

    def __enter__(self) -> HookProcess:
        code = (
            "import time; from tests.servers.hookserver import HookServer; "
            "s = HookServer().start(); print(s.url, s.api_key, flush=True); time.sleep(3600)"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert self.proc.stdout is not None
        self.url, self.api_key = self.proc.stdout.readline().split()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def env(self) -> dict[str, str]:
        return {"IPAAS_HOOK_URL": self.url, "IPAAS_WEBHOOK_API_KEY": self.api_key}


def ctsync_environ(
    bootstrap: str, topic: str, hook: HookServer | HookProcess, **extra: str
) -> dict[str, str]:
    return {
        "CTSYNC_SOURCE": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": f"ctsync-{uuid.uuid4().hex[:8]}",
        "CTSYNC_STATE_URL": "memory://",
        # Unthrottled unless the hook sets limits (its env() then overrides these).
        "IPAAS_THROTTLE_LIMIT": "1000000",
        "IPAAS_THROTTLE_SECONDS": "1",
        "IPAAS_CONCURRENT_CONNECTIONS": "10",
        "IPAAS_CONCURRENT_BATCH_EXECUTIONS": "10",
        "CTSYNC_DEAD_LETTER_URL": f"file:{tempfile.gettempdir()}/ctsync-bench-dead.jsonl",
        **hook.env(),
        **extra,
    }


async def raw_rate(bootstrap: str, topic: str, count: int, *, decode: bool = False, **options: Any) -> float:
    """Consume ``count`` records with a bare getmany loop; with ``decode``, also orjson-load each value (the
    least per-record work any consumer of the payloads must do). ``options``: TLS and SASL, if any."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )
    await consumer.start()
    seen, first = 0, 0.0
    try:
        while seen < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=5_000)
            for records in batches.values():
                if not first:
                    first = time.perf_counter()
                seen += len(records)
                if decode:
                    for record in records:
                        orjson.loads(record.value)
        elapsed = time.perf_counter() - first
    finally:
        await consumer.stop()
    return count / elapsed


async def ctsync_rate(environ: dict[str, str], count: int) -> tuple[float, dict[str, Any]]:
    """Run the real wiring in this process until ``count`` envelopes are acked; return payloads/s."""
    settings = load_settings(None, environ=environ, for_command="run")
    source = await wiring.configured_source(settings)
    built = await wiring.build(settings, source, finite=False)
    pipeline = built.pipeline
    stop = asyncio.Event()
    async with collector.garbage_collected():  # as `ctsync run` does
        running = asyncio.create_task(pipeline.run(stop))
        first = 0.0
        try:
            while pipeline.counts.acked < count:
                if not first and pipeline.counts.received:
                    first = time.perf_counter()
                if running.done():
                    running.result()
                    raise RuntimeError("the pipeline stopped early")
                await asyncio.sleep(0.002)
            elapsed = time.perf_counter() - first
        finally:
            stop.set()
            await running
            await built.aclose()
    return count / elapsed, pipeline.counts.as_dict()


async def naive_rate(bootstrap: str, topic: str, hook: HookServer, seconds: float) -> tuple[float, int]:
    """One POST per message under aiolimiter: return payloads per minute and requests used."""
    limiter = AsyncLimiter(hook.limit or 20, hook.window_seconds)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"naive-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    delivered = requests = 0
    headers = {"Authorization": f"Bearer {hook.api_key}"}
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.perf_counter()
        try:
            while time.perf_counter() - started < seconds:
                batches = await consumer.getmany(timeout_ms=200, max_records=1)
                for records in batches.values():
                    for record in records:
                        body = orjson.loads(record.value)
                        note = {
                            "notifications": [
                                {"scope": "product/updated", "external_id": body["resource"]["id"]}
                            ]
                        }
                        async with limiter:
                            response = await client.post(
                                hook.url,
                                json=note,
                                headers={**headers, "x-correlation-id": str(uuid.uuid4())},
                            )
                        requests += 1
                        if response.status_code < 300:
                            delivered += 1
                        await consumer.commit()
        finally:
            await consumer.stop()
    return delivered / (time.perf_counter() - started) * 60, requests


def updates(count: int, entities: int) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme-prod",
                "resource": {"typeId": "product", "id": f"product-{i % entities}"},
                "version": i // entities + 2,
                "oldVersion": i // entities + 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        )
        for i in range(count)
    ]


async def throughput(kafka: Kafka, count: int) -> str:
    bodies = _pipeline_bench().payloads(count, entities=count // 4)
    topic = await kafka.create_topic(partitions=3)
    await kafka.produce(topic, bodies)
    async with collector.garbage_collected():  # the collector settings ctsync runs with
        ceiling = await raw_rate(kafka.bootstrap, topic, count)
    print(f"1. {count:,} payloads over {count // 4:,} entities, 3 partitions, unthrottled hook")
    print(f"   raw aiokafka getmany loop       {ceiling:10,.0f} payloads/s   (ceiling)")
    async with collector.garbage_collected():
        decoded = await raw_rate(kafka.bootstrap, topic, count, decode=True)
    print(
        f"   the same, orjson.loads each     {decoded:10,.0f} payloads/s   ratio {decoded / ceiling:.2f}"
        "   (the least work a consumer of the payloads does)"
    )
    with HookProcess() as hook, open(os.devnull, "wb") as devnull:  # noqa: ASYNC230
        # The default batch size, then the largest: each hook request costs about a millisecond of httpx.
        for level, batch_size in (("INFO", 100), ("WARNING", 100), ("INFO", 1000), ("WARNING", 1000)):
            audit.configure(level=level, stream=devnull, audit=level == "INFO")
            environ = ctsync_environ(kafka.bootstrap, topic, hook, IPAAS_BATCH_SIZE=str(batch_size))
            rate, counts = await ctsync_rate(environ, count)
            print(
                f"   ctsync, audit {level:7}, batch {batch_size:4} {rate:9,.0f} payloads/s   "
                f"ratio {rate / ceiling:.2f}   ({counts['requests']:,} requests, "
                f"{counts['notifications_sent']:,} notifications)"
            )
    return topic


async def throttled(kafka: Kafka, naive_seconds: float) -> None:
    topic = await kafka.create_topic(partitions=3)
    await kafka.produce(topic, updates(10_000, 1_000))
    print("2. 10,000 payloads over 1,000 entities, throttle 20 requests per 2 s")
    with HookServer(limit=20, window_seconds=2.0) as hook, open(os.devnull, "wb") as devnull:  # noqa: ASYNC230
        audit.configure(level="INFO", stream=devnull)
        environ = ctsync_environ(kafka.bootstrap, topic, hook)
        rate, counts = await ctsync_rate(environ, 10_000)
        ours = rate * 60
        print(
            f"   ctsync                          {ours:10,.0f} payloads/min   {counts['requests']} requests"
            f" ({hook.window_violations} over the limit)"
        )
        hook.reset()
        naive, requests = await naive_rate(kafka.bootstrap, topic, hook, naive_seconds)
        print(
            f"   naive: one POST per message     {naive:10,.0f} payloads/min   {requests} requests in "
            f"{naive_seconds:.0f} s (10,000 would need 10,000 requests)"
        )
        print(f"   ratio {ours / naive:,.0f}x")


def peak_rss(kafka: Kafka, topic: str, seconds: float) -> None:
    with HookServer(limit=1, window_seconds=60.0) as hook, tempfile.TemporaryDirectory() as tmp:
        environ = {
            k: v for k, v in os.environ.items() if not k.startswith(("CTSYNC_", "IPAAS_", "KAFKA_", "CTP_"))
        }
        environ.update(ctsync_environ(kafka.bootstrap, topic, hook, CTSYNC_DEAD_LETTER_URL=f"file:{tmp}/d"))
        with open(os.devnull, "wb") as devnull:
            proc = subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "run"], env=environ, stdout=devnull, stderr=devnull
            )
        peak = 0
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
                time.sleep(0.5)
        finally:
            stop_process(proc)  # type: ignore[arg-type]
    print(
        f"3. peak RSS of ctsync run while the {topic} backlog waits behind 1 request/min "
        f"(CTSYNC_MAX_IN_FLIGHT 10,000): {peak / 1024:.0f} MiB (target <= 250 MiB)"
    )


async def apache_kafka(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            broker = await asyncio.to_thread(start_apache_kafka, Path(tmp) / "apachekafka")
        except BrokerUnavailable as exc:
            print(f"4. Apache Kafka: not run ({exc})")
            return
        try:
            print(
                f"4. Apache Kafka 4, the same {count:,} payloads, 3 partitions (broker started in "
                f"{broker.started_in_s:.1f} s, RSS {broker.rss_kib() / 1024:.0f} MiB)"
            )
            options = broker.client_options()
            kafka = Kafka(broker.sasl_ssl, **options)
            topic = await kafka.create_topic(partitions=3)
            await kafka.produce(topic, _pipeline_bench().payloads(count, entities=count // 4))
            async with collector.garbage_collected():
                plain = await raw_rate(broker.plaintext, topic, count)
                sasl_ssl = await raw_rate(broker.sasl_ssl, topic, count, **options)
            print(f"   raw getmany loop, PLAINTEXT     {plain:10,.0f} payloads/s")
            print(
                f"   raw getmany loop, SASL_SSL      {sasl_ssl:10,.0f} payloads/s   "
                f"ratio {sasl_ssl / plain:.2f}   (the ceiling for ctsync below)"
            )
            with HookProcess() as hook, open(os.devnull, "wb") as devnull:  # noqa: ASYNC230
                audit.configure(level="INFO", stream=devnull)
                environ = ctsync_environ(broker.sasl_ssl, topic, hook, **broker.env())
                rate, _ = await ctsync_rate(environ, count)
            print(
                f"   ctsync over SASL_SSL, batch 100 {rate:10,.0f} payloads/s   ratio {rate / sasl_ssl:.2f}"
            )
        finally:
            stop_process(broker.proc)


async def main_async(count: int, naive_seconds: float, rss_seconds: float, apache: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        proc, bootstrap = start_tansu(Path(tmp) / "tansu.log")
        try:
            kafka = Kafka(bootstrap)
            topic = await throughput(kafka, count)
            await throttled(kafka, naive_seconds)
            await asyncio.to_thread(peak_rss, kafka, topic, rss_seconds)
        finally:
            stop_process(proc)
    if apache:
        await apache_kafka(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=200_000)
    parser.add_argument("--naive-seconds", type=float, default=20.0)
    parser.add_argument("--rss-seconds", type=float, default=20.0)
    parser.add_argument("--no-apache", action="store_true", help="skip the Apache Kafka figures")
    args = parser.parse_args()
    asyncio.run(main_async(args.payloads, args.naive_seconds, args.rss_seconds, not args.no_apache))


if __name__ == "__main__":
    main()
