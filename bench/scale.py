"""Benchmark scale-out: 1 vs 3 ``ctsync run`` replicas in one Kafka group sharing one Redis.

1. Under a throttle (the budget is shared, so 3 replicas must stay at the budget, not triple it): the same
   backlog's notifications per second with 1 and with 3 replicas, beside the budget's ceiling.
2. Without a throttle: notifications per second with 1 and 3 replicas, and their ratio (on this 2-core
   machine, three processes share two cores, so the ratio says more about contention than about ctsync).
3. Redis round trips per delivered batch for batch sizes 10, 100 and 1,000 (target: a constant), and
   in-process payloads/s on Redis state, each with the order rule's claims and without them (a store that
   grants every claim without asking Redis: the pipeline as it was before claims), in the same run.

Run: ``.venv/bin/python -m bench.scale`` (``--sections 3`` for the round trips alone).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from adapters.redis.state import open_state_store  # noqa: E402
from adapters.redis.throttle import open_throttle_store  # noqa: E402
from consumer import audit  # noqa: E402
from consumer.cli import wiring  # noqa: E402
from consumer.cli.wiring import configured_limits, router  # noqa: E402
from consumer.config import load_settings  # noqa: E402
from consumer.dedupe import Deduplicator  # noqa: E402
from consumer.dry_run import ReadOnlyStateStore  # noqa: E402
from consumer.pipeline import Pipeline, PipelineOptions  # noqa: E402
from consumer.ports import Claim, StateView  # noqa: E402
from consumer.testing import ListSource, MemoryDeadLetters, RecordingSink  # noqa: E402
from consumer.throttle import Throttle  # noqa: E402
from tests.servers.hookserver import HookServer  # noqa: E402
from tests.servers.kafkaserver import Kafka, free_port, start_tansu, stop_process  # noqa: E402
from tests.servers.redisserver import RedisServer, _binary  # noqa: E402


def updates(count: int, prefix: str) -> list[bytes]:
    """One update per entity: no coalescing, so notifications measure throughput."""
    import orjson

    return [
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme-prod",
                "resource": {"typeId": "product", "id": f"{prefix}-{i}"},
                "version": 2,
                "oldVersion": 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        )
        for i in range(count)
    ]


def replicas_rate(
    kafka: Kafka,
    redis: RedisServer,
    hook: HookServer,
    topic: str,
    count: int,
    replicas: int,
    tmp: Path,
    batch_size: int = 100,
) -> float:
    """Run ``replicas`` processes until the hook has ``count`` notifications; return notifications/s."""
    ours = ("CTSYNC_", "IPAAS_", "KAFKA_", "CTP_")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    environ.update(
        hook.env(),
        CTSYNC_SOURCE="kafka",
        KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        KAFKA_TOPICS=topic,
        KAFKA_GROUP_ID=f"scale-{uuid.uuid4().hex[:8]}",
        CTSYNC_STATE_URL=redis.url,
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp}/dead.jsonl",
        CTSYNC_LOG_LEVEL="WARNING",
        CTSYNC_AUDIT="off",
        IPAAS_CONCURRENT_CONNECTIONS="10",
        IPAAS_CONCURRENT_BATCH_EXECUTIONS="10",
        IPAAS_BATCH_SIZE=str(batch_size),
    )
    if hook.limit is None:
        environ.update(IPAAS_THROTTLE_LIMIT="1000000", IPAAS_THROTTLE_SECONDS="1")
    procs = []
    with open(os.devnull, "wb") as devnull:
        for _ in range(replicas):
            env = {**environ, "CTSYNC_HTTP_LISTEN": f"127.0.0.1:{free_port()}"}
            procs.append(
                subprocess.Popen([sys.executable, "-m", "consumer.cli", "run"], env=env, stdout=devnull)
            )
    try:
        deadline = time.monotonic() + 600
        while len(hook.notifications) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(hook.notifications)} of {count} notifications arrived")
            time.sleep(0.05)
    finally:
        for proc in procs:
            stop_process(proc)  # type: ignore[arg-type]
    arrivals = hook.arrivals
    return count / (arrivals[-1] - arrivals[0])


class WithoutClaims(ReadOnlyStateStore):
    """A Redis state store whose claims are granted without asking Redis: the pipeline before claims. It
    records what is delivered (unlike the read-only store it builds on) and closes the inner store."""

    async def record_delivered(
        self,
        message_keys: Collection[str],
        watermarks: Mapping[str, int],
        ttl_seconds: float,
        *,
        holder: str = "",
        release: Collection[str] = (),
    ) -> None:
        await self.inner.record_delivered(message_keys, watermarks, ttl_seconds)

    async def claim(
        self,
        holder: str,
        ranks: Mapping[str, int],
        message_keys: Collection[str],
        lease_seconds: float,
        attempt_seconds: float,
    ) -> Claim:
        return Claim(frozenset(), StateView(frozenset(), {}))


async def round_trips(
    redis: RedisServer, batch_size: int, count: int = 5_000, claims: bool = True
) -> tuple[float, float]:
    """Return (Redis round trips per delivered batch, payloads/s) of an in-process pipeline on Redis."""
    environ = {
        "CTSYNC_STATE_URL": redis.url,
        "CTP_PROJECT_KEY": f"bench-{uuid.uuid4().hex[:6]}",
        "IPAAS_THROTTLE_LIMIT": "1000000",
        "IPAAS_THROTTLE_SECONDS": "1",
        "IPAAS_BATCH_SIZE": str(batch_size),
    }
    settings = load_settings(None, environ=environ, for_command="replay")
    state = await open_state_store(wiring.redis_options(settings))
    limits = configured_limits(settings)
    throttle_port = await open_throttle_store(wiring.redis_options(settings), limits)
    sink = RecordingSink()
    pipeline = Pipeline(
        source=ListSource(updates(count, f"rt{batch_size}-{uuid.uuid4().hex[:6]}")),
        router=router(settings),
        deduplicator=Deduplicator(state if claims else WithoutClaims(state), 3600),
        throttle=Throttle(throttle_port, limits),
        sink=sink,
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(batch_size=batch_size),
    )
    started = time.perf_counter()
    await pipeline.run()
    elapsed = time.perf_counter() - started
    trips = state.round_trips + throttle_port.round_trips
    await state.close()
    await throttle_port.close()
    return trips / len(sink.requests), count / elapsed


async def throttled(kafka: Kafka, redis: RedisServer, tmp: Path) -> None:
    count = 3_000
    print(f"1. throttled: {count:,} one-update entities, 10 requests/s, batch size 20")
    print(f"   the budget's ceiling                 {10 * 20:8,.0f} notifications/s")
    for replicas in (1, 3):
        topic = await kafka.create_topic(partitions=3)
        await kafka.produce(topic, updates(count, topic))
        with HookServer(limit=10, window_seconds=1.0) as hook:
            rate = await asyncio.to_thread(replicas_rate, kafka, redis, hook, topic, count, replicas, tmp, 20)
            print(
                f"   {replicas} replica{'s' if replicas > 1 else ' '}                          "
                f"{rate:8,.0f} notifications/s   window violations {hook.window_violations}"
            )


async def unthrottled(kafka: Kafka, redis: RedisServer, tmp: Path, count: int) -> None:
    print(f"2. unthrottled: {count:,} one-update entities, batch size 100")
    rates = {}
    for replicas in (1, 3):
        topic = await kafka.create_topic(partitions=3)
        await kafka.produce(topic, updates(count, topic))
        with HookServer() as hook:
            rates[replicas] = await asyncio.to_thread(
                replicas_rate, kafka, redis, hook, topic, count, replicas, tmp
            )
        print(
            f"   {replicas} replica{'s' if replicas > 1 else ' '}                          "
            f"{rates[replicas]:8,.0f} notifications/s"
        )
    print(f"   ratio 3 / 1: {rates[3] / rates[1]:.2f} (on {os.cpu_count()} cores)")


async def main_async(count: int, sections: set[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tansu, bootstrap = start_tansu(tmp / "tansu.log")
        redis = RedisServer(_binary(), tmp)
        redis.start()
        try:
            kafka = Kafka(bootstrap)
            if 1 in sections:
                await throttled(kafka, redis, tmp)
            if 2 in sections:
                await unthrottled(kafka, redis, tmp, count)
            if 3 in sections:
                print(
                    "3. Redis round trips per delivered batch (state + throttle) and in-process payloads/s,"
                )
                print(
                    "   one update per entity, with claims beside without them (3 interleaved rounds, median)"
                )
                with open(os.devnull, "wb") as devnull:  # noqa: ASYNC230
                    audit.configure(level="WARNING", stream=devnull, audit=False)
                    for batch_size in (10, 100, 1_000):
                        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
                        for _ in range(3):
                            for claims in (False, True):
                                results[claims].append(
                                    await round_trips(redis, batch_size, count=10_000, claims=claims)
                                )
                        without, with_claims = (
                            sorted(results[False], key=lambda r: r[1])[1],
                            sorted(results[True], key=lambda r: r[1])[1],
                        )
                        print(
                            f"   batch size {batch_size:5}: "
                            f"round trips {without[0]:5.2f} -> {with_claims[0]:5.2f}"
                            f"   payloads/s {without[1]:8,.0f} -> {with_claims[1]:8,.0f}"
                            f" (ratio {with_claims[1] / without[1]:.2f})"
                        )
        finally:
            redis.kill()
            stop_process(tansu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, default=20_000)
    parser.add_argument("--sections", default="1,2,3", help="which parts to run, e.g. 3")
    args = parser.parse_args()
    asyncio.run(main_async(args.payloads, {int(n) for n in args.sections.split(",")}))


if __name__ == "__main__":
    main()
