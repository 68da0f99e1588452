"""/healthz, /readyz and /metrics over real HTTP, on a pipeline running in this process."""

from __future__ import annotations

import asyncio

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from adapters.endpoints import open_endpoints
from adapters.memory import MemoryStateStore
from consumer.config import ListenAddress
from consumer.dedupe import Deduplicator
from consumer.pipeline import Pipeline, PipelineOptions
from consumer.ports import HookResponse
from consumer.routing import Router
from consumer.testing import ListSource, MemoryDeadLetters, RecordingSink
from consumer.throttle import LocalThrottleStore, Throttle, ThrottleLimits
from tests.servers.kafkaserver import free_port

LIMITS = ThrottleLimits(limit=100, window_seconds=1.0, connections=2, batch_executions=2)


def update(entity: int, version: int) -> bytes:
    return orjson.dumps(
        {
            "notificationType": "ResourceUpdated",
            "projectKey": "acme",
            "resource": {"typeId": "product", "id": f"p-{entity}"},
            "version": version,
            "oldVersion": version - 1,
            "modifiedAt": "2026-01-01T00:00:00.000Z",
        }
    )


def metrics(text: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_health_readiness_and_metrics_follow_the_pipeline() -> None:
    source = ListSource([update(i % 5, 2 + i // 5) for i in range(20)], exhaust=False)
    answers = iter([HookResponse(200), HookResponse(503), HookResponse(200)])
    sink = RecordingSink(lambda _: next(answers, HookResponse(200)))
    pipeline = Pipeline(
        source=source,
        router=Router(),
        deduplicator=Deduplicator(MemoryStateStore(), 60),
        throttle=Throttle(LocalThrottleStore(LIMITS), LIMITS),
        sink=sink,
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(batch_size=2, retry_base=0.01, retry_cap=0.02),
    )
    listen = ListenAddress("127.0.0.1", free_port())
    endpoints = await open_endpoints(listen, pipeline, source)
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    base = f"http://{listen.host}:{listen.port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            for _ in range(500):
                if pipeline.counts.acked == 20:
                    break
                await asyncio.sleep(0.01)
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            scraped = metrics((await client.get("/metrics")).text)
            assert scraped["ctsync_messages_received_total"] == 20
            assert scraped["ctsync_messages_routed_total"] == 20
            assert scraped["ctsync_messages_acked_total"] == 20
            assert scraped["ctsync_hook_requests_total{status=200}"] >= 1
            assert scraped["ctsync_hook_requests_total{status=503}"] == 1
            assert scraped["ctsync_batch_retries_total"] == 1
            assert scraped["ctsync_claim_waits_total"] == 0
            assert scraped["ctsync_batch_duration_seconds_count"] == pipeline.counts.requests
            # One observation per accepted message, each carrying a change time (modifiedAt).
            assert scraped["ctsync_delivery_latency_seconds_count"] == 20
            assert scraped["ctsync_change_latency_seconds_count"] == 20
            assert scraped["ctsync_delivery_latency_seconds_bucket{le=+Inf}"] == 20
            build = [name for name in scraped if name.startswith("ctsync_build_info{")]
            assert len(build) == 1 and scraped[build[0]] == 1 and "python=3." in build[0]
            for name in (
                "process_cpu_seconds_total",
                "process_resident_memory_bytes",
                "process_open_fds",
                "process_max_fds",
                "process_start_time_seconds",
            ):
                assert scraped[name] > 0, name
            assert scraped["ctsync_in_flight_envelopes"] == 0
            assert scraped["ctsync_ready"] == 1
            # A hook that refuses the key makes the instance not ready, with the reason.
            pipeline.health.sink_usable, pipeline.health.sink_problem = False, "hook answered 401"
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503
            assert "hook answered 401" in not_ready.json()["problems"][0]
            assert metrics((await client.get("/metrics")).text)["ctsync_ready"] == 0
    finally:
        stop.set()
        await running
        await endpoints.close()


async def test_a_taken_port_is_an_error_at_start() -> None:
    listen = ListenAddress("127.0.0.1", free_port())
    source = ListSource([])
    pipeline = Pipeline(
        source=source,
        router=Router(),
        deduplicator=Deduplicator(MemoryStateStore(), 60),
        throttle=Throttle(LocalThrottleStore(LIMITS), LIMITS),
        sink=RecordingSink(),
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(),
    )
    first = await open_endpoints(listen, pipeline, source)
    try:
        try:
            await open_endpoints(listen, pipeline, source)
        except OSError as exc:
            assert "CTSYNC_HTTP_LISTEN" in str(exc)
        else:
            raise AssertionError("a second server bound the same port")
    finally:
        await first.close()
