"""The operations endpoints on ``CTSYNC_HTTP_LISTEN``: ``/healthz``, ``/readyz`` and ``/metrics``.

``/healthz`` answers while the event loop does (liveness). ``/readyz`` answers 503 with the reasons while the
source is not connected, the hook refused our key, or the state or shared throttle store is down.
``/metrics`` is the Prometheus text format, collected at scrape time from the pipeline's own counters and
histograms, so the hot path pays nothing for it but an O(1) observation per accepted message. Every label has
a bounded set of values: HTTP statuses, outcomes, Kafka topic/partition, the build. The process metrics
(CPU, memory, file descriptors, start time) are prometheus_client's process collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import platform
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters._http_server import EmbeddedServer, ListenAddress, listen_socket, serve
from consumer.audit import redact
from consumer.pipeline import LatencyHistogram, Pipeline
from consumer.ports import Source


@runtime_checkable
class SourceStatus(Protocol):
    """What a source may tell the endpoints: why it is not ready, and consumer lag per partition."""

    def problem(self) -> str | None: ...


@runtime_checkable
class SourceAuthentication(Protocol):
    """A source that takes requests from the network says whether it verifies who sends them."""

    @property
    def authenticated(self) -> bool: ...


@runtime_checkable
class SourceLag(Protocol):
    def lag(self) -> Mapping[tuple[str, int], int]: ...


# (metric name, help, Counts field)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("ctsync_messages_received", "Envelopes the source yielded.", "received"),
    ("ctsync_messages_routed", "Parsed messages routed to an iPaaS.com scope.", "routed"),
    ("ctsync_messages_invalid", "Payloads that failed to parse (dead-lettered).", "invalid"),
    ("ctsync_messages_ignored", "Test notifications, echoes and unrouted types.", "ignored"),
    ("ctsync_messages_duplicate", "Messages whose key was already delivered.", "duplicate"),
    ("ctsync_messages_stale", "Messages at or below the resource's delivered version.", "stale"),
    ("ctsync_notifications_coalesced", "Messages merged into a pending notification.", "coalesced"),
    ("ctsync_notifications_sent", "Notifications the hook accepted.", "notifications_sent"),
    ("ctsync_messages_dead_lettered", "Messages written to the dead-letter sink.", "dead_lettered"),
    ("ctsync_batch_retries", "Hook requests that will be retried.", "retries"),
    ("ctsync_messages_acked", "Envelopes acked (offset committable / Pub/Sub ack).", "acked"),
    ("ctsync_messages_handed_back", "Envelopes handed back for redelivery at shutdown.", "handed_back"),
    (
        "ctsync_claim_waits",
        "Entities that waited because another replica was sending a notification of them.",
        "claim_waits",
    ),
)


def build_version() -> str:
    """Return the installed distribution's version ("unknown" when run from a tree not installed)."""
    try:
        return importlib.metadata.version("ctsync")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _histogram(name: str, documentation: str, histogram: LatencyHistogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name,
        documentation,
        buckets=[(_bound(b), float(n)) for b, n in histogram.cumulative()],
        sum_value=histogram.sum,
    )


class PipelineCollector:
    """A Prometheus collector that reads a running pipeline (and its source) when scraped."""

    def __init__(self, pipeline: Pipeline, source: Source) -> None:
        self.pipeline = pipeline
        self.source = source
        self.version = build_version()

    def collect(self) -> Iterable[Metric]:
        pipeline = self.pipeline
        counts = pipeline.counts
        info = GaugeMetricFamily(
            "ctsync_build_info",
            "Always 1: the running ctsync's version and Python.",
            labels=["version", "python"],
        )
        info.add_metric([self.version, platform.python_version()], 1)
        yield info
        for name, documentation, field in _COUNTERS:
            yield CounterMetricFamily(name, documentation, value=getattr(counts, field))
        requests = CounterMetricFamily(
            "ctsync_hook_requests", "Hook requests by HTTP status ('error': no answer).", labels=["status"]
        )
        for status, count in sorted(counts.requests_by_status.items()):
            requests.add_metric([status], count)
        yield requests
        yield _histogram(
            "ctsync_batch_duration_seconds", "Duration of hook requests.", pipeline.batch_latency
        )
        yield _histogram(
            "ctsync_delivery_latency_seconds",
            "From receipt by ctsync to acceptance by the hook, per message whose notification was accepted.",
            pipeline.delivery_latency,
        )
        yield _histogram(
            "ctsync_change_latency_seconds",
            "From the change in commercetools (the payload's createdAt or modifiedAt) to acceptance by the "
            "hook, per accepted message that carries it.",
            pipeline.change_latency,
        )
        throttle = pipeline.throttle
        yield CounterMetricFamily(
            "ctsync_throttle_wait_seconds",
            "Time spent waiting for a request slot.",
            value=throttle.wait_seconds,
        )
        yield CounterMetricFamily(
            "ctsync_batch_slot_wait_seconds",
            "Time spent waiting for a batch-execution slot.",
            value=throttle.batch_wait_seconds,
        )
        yield GaugeMetricFamily(
            "ctsync_in_flight_envelopes",
            "Envelopes received and not yet settled.",
            value=pipeline.unsettled_count,
        )
        yield GaugeMetricFamily(
            "ctsync_outbox_pending", "Notifications waiting in the outbox.", value=len(pipeline.outbox)
        )
        yield GaugeMetricFamily(
            "ctsync_ready", "1 when /readyz answers 200.", value=0 if problems(self) else 1
        )
        if isinstance(self.source, SourceAuthentication):
            yield GaugeMetricFamily(
                "ctsync_push_unauthenticated",
                "1 when the push endpoint accepts pushes not verified as the push subscription's "
                "(PUSH_ALLOW_UNAUTHENTICATED=true).",
                value=0 if self.source.authenticated else 1,
            )
        if isinstance(self.source, SourceLag):
            lag = GaugeMetricFamily(
                "ctsync_kafka_consumer_lag",
                "Records between the committed offset and the partition's end.",
                labels=["topic", "partition"],
            )
            for (topic, partition), records in sorted(self.source.lag().items()):
                lag.add_metric([topic, str(partition)], records)
            yield lag


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def problems(collector: PipelineCollector) -> list[str]:
    found = []
    if isinstance(collector.source, SourceStatus):
        problem = collector.source.problem()
        if problem:
            found.append(f"source: {problem}")
    # A problem may quote a server's answer or an exception, which may echo a secret.
    return [redact(problem) for problem in found + collector.pipeline.problems()]


def endpoints_app(pipeline: Pipeline, source: Source) -> Starlette:
    collector = PipelineCollector(pipeline, source)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        found = problems(collector)
        if found:
            return JSONResponse({"status": "not ready", "problems": found}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


class Endpoints:
    """The endpoints server: ``start`` binds (raising OSError if it cannot), ``close`` stops it."""

    def __init__(self, app: Any, listen: ListenAddress) -> None:
        self.app = app
        self.listen = listen
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = listen_socket(self.listen, "CTSYNC_HTTP_LISTEN")
        self._server, self._task = await serve(self.app, sock, "ctsync-endpoints", log_level="warning")

    async def close(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._server = self._task = None


async def open_endpoints(listen: ListenAddress, pipeline: Pipeline, source: Source) -> Endpoints:
    endpoints = Endpoints(endpoints_app(pipeline, source), listen)
    await endpoints.start()
    return endpoints
