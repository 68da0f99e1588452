"""Wiring: build a Pipeline and its adapters from Settings. The one place that knows every adapter.

Adapters are imported lazily so the core stays free of broker and HTTP libraries until a command runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer import audit, collector
from consumer.config import Settings
from consumer.dedupe import Deduplicator
from consumer.dry_run import DryRunSink, HandingBackSource, ReadOnlyStateStore
from consumer.pipeline import Pipeline, PipelineOptions
from consumer.ports import DeadLetterSink, Sink, Source, StateStore, ThrottleStore
from consumer.routing import Router, ScopeMap, load_scope_map
from consumer.throttle import LocalThrottleStore, Throttle, ThrottleLimits

# The collector regime lives in consumer.collector; cli.py and _sweep_cli.py still call it by this name.
garbage_collected_on_a_clock = collector.garbage_collected


# Sources whose acks change what the stream delivers next (the names their adapters give them).
STREAM_SOURCES = frozenset({"kafka", "kafka-dead-letters", "pubsub", "push"})


class UnsupportedSetting(ValueError):
    """A valid setting this build cannot serve yet; the message names the variable."""


def throttle_limits(settings: Settings) -> ThrottleLimits:
    return ThrottleLimits(
        limit=settings.ipaas_throttle_limit,
        window_seconds=float(settings.ipaas_throttle_seconds),
        connections=settings.ipaas_concurrent_connections,
        batch_executions=settings.ipaas_concurrent_batch_executions,
    )


def router(settings: Settings) -> Router:
    scope_map = load_scope_map(settings.ipaas_scope_map) if settings.ipaas_scope_map else ScopeMap()
    return Router(scope_map, settings.ignore_client_ids)


async def state_store(settings: Settings) -> StateStore:
    state = settings.state
    if state.kind == "memory":
        from adapters.state_memory import MemoryStateStore

        return MemoryStateStore()
    if state.kind == "sqlite":
        from adapters.state_sqlite import SqliteStateStore, UnusableStateFile

        assert state.path is not None
        store = SqliteStateStore(state.path)
        try:
            await store.open()
        except UnusableStateFile as exc:
            raise UnsupportedSetting(f"CTSYNC_STATE_URL: {exc}") from None
        return store
    if state.kind == "redis":
        from adapters.state_redis import open_state_store

        # Unchecked: a replica starts while Redis is down and reports not-ready until it answers.
        return await open_state_store(settings, check=False)
    raise UnsupportedSetting(f"CTSYNC_STATE_URL: {state.kind} state is not supported by this build yet")


async def throttle_store(settings: Settings) -> ThrottleStore:
    """The throttle budget: shared by every replica through Redis with Redis state, else this process's."""
    if settings.state.kind == "redis":
        from adapters.throttle_redis import open_throttle_store

        return await open_throttle_store(settings, throttle_limits(settings), check=False)
    return LocalThrottleStore(throttle_limits(settings))


async def dead_letter_sink(settings: Settings) -> DeadLetterSink:
    target = settings.dead_letter
    if target.kind == "file":
        from adapters.files import FileDeadLetterSink

        assert target.path is not None
        return FileDeadLetterSink(target.path)
    assert target.topic is not None
    if target.kind == "kafka":
        from adapters import kafka

        return await kafka.open_dead_letter_sink(settings, target.topic)
    if target.kind == "pubsub":
        from adapters import pubsub

        return await pubsub.open_dead_letter_sink(settings, target.topic)
    raise UnsupportedSetting(
        f"CTSYNC_DEAD_LETTER_URL: {target.kind} dead letters are not supported by this build yet"
    )


def sink(settings: Settings) -> Sink:
    if settings.ctsync_dry_run or settings.ipaas_hook_url is None:
        log = audit.get_logger("ctsync.dry_run")
        return DryRunSink(lambda **fields: log.info("dry_run.would_send", **fields))
    from adapters.ipaas import HttpHookSink

    key = settings.ipaas_webhook_api_key
    return HttpHookSink(
        settings.ipaas_hook_url,
        key.get_secret_value() if key is not None else "",
        max_connections=settings.ipaas_concurrent_connections,
    )


def file_source(path: str | Path, *, follow: bool = False) -> Source:
    from adapters.files import JsonlFileSource

    source = JsonlFileSource(path, follow=follow)
    source.open()
    return source


async def configured_source(settings: Settings, *, follow: bool = False) -> Source:
    """Open the source ``CTSYNC_SOURCE`` names; broker sources connect here, so this may raise OSError."""
    spec = settings.source
    if spec is None:
        raise UnsupportedSetting("CTSYNC_SOURCE: required for run (kafka, pubsub, push or file:<path>)")
    if spec.kind == "file":
        assert spec.path is not None
        return file_source(spec.path, follow=follow)
    if spec.kind == "kafka":
        from adapters import kafka

        return await kafka.open_source(settings)
    if spec.kind == "pubsub":
        from adapters import pubsub

        return await pubsub.open_source(settings)
    if spec.kind == "push":
        from adapters import push

        return await push.open_source(settings)
    raise UnsupportedSetting(f"CTSYNC_SOURCE: the {spec.kind} source is not supported by this build yet")


async def closing_within(close: Callable[[], Awaitable[None]], seconds: float, what: str) -> None:
    """Run ``close``, giving up after ``seconds``: a stop must end even when the far side is gone. What was
    not committed then is redelivered, never lost."""
    try:
        async with asyncio.timeout(seconds):
            await close()
    except TimeoutError:
        audit.get_logger().warning("service.close_timeout", resource=what, timeout_s=seconds)


@dataclass
class App:
    pipeline: Pipeline
    resources: AsyncExitStack
    state: StateStore | None = None

    async def aclose(self) -> None:
        await self.resources.aclose()


async def build(settings: Settings, source: Source, *, finite: bool) -> App:
    """Build the pipeline for ``source``; ``finite`` runs (replay) give up on a hook that refuses the key."""
    resources = AsyncExitStack()
    # A dry run on a stream (broker or push) must leave it as it found it: nothing acked, nothing recorded.
    # A file has nothing to ack, and recording keeps `make run` twice showing dedupe at work.
    hands_back = settings.ctsync_dry_run and source.name in STREAM_SOURCES
    if hands_back:
        source = HandingBackSource(source)
    try:
        # Bounded: closing a Kafka source commits and leaves the group, which waits for ever on a dead broker.
        resources.push_async_callback(
            closing_within, source.close, settings.ctsync_drain_timeout_seconds, "source"
        )
        limits = throttle_limits(settings)
        throttle_port = await throttle_store(settings)
        resources.push_async_callback(throttle_port.close)
        store = await state_store(settings)
        if hands_back:
            store = ReadOnlyStateStore(store)
        resources.push_async_callback(store.close)
        letters = await dead_letter_sink(settings)
        resources.push_async_callback(letters.close)
        hook = sink(settings)
        resources.push_async_callback(hook.close)
        pipeline = Pipeline(
            source=source,
            router=router(settings),
            deduplicator=Deduplicator(store, settings.ctsync_dedupe_ttl_seconds),
            throttle=Throttle(throttle_port, limits),
            sink=hook,
            dead_letters=letters,
            options=PipelineOptions(
                batch_size=settings.ipaas_batch_size,
                max_in_flight=settings.ctsync_max_in_flight,
                debug=settings.ipaas_debug,
                drain_timeout=settings.ctsync_drain_timeout_seconds,
                stop_on_unusable_sink=finite,
            ),
        )
    except BaseException:
        await resources.aclose()
        raise
    return App(pipeline, resources, store)


STATE_PROBE_KEY = "ctsync:readiness-probe"
STATE_PROBE_TIMEOUT_SECONDS = 5.0
STATE_UNCHECKED = "state store: not checked yet"


def mark_state_unchecked(built: App) -> None:
    """Report not-ready until ``state_probed`` found the state store answering; call it before /readyz
    can be asked, so not even its first answer is a guess."""
    if built.state is not None:
        built.pipeline.health.state_problem = built.pipeline.health.state_problem or STATE_UNCHECKED


@asynccontextmanager
async def state_probed(built: App, *, enabled: bool = True, retry_cap: float = 15.0) -> AsyncIterator[None]:
    """Within the block, readiness is honest from the start: the service reports not-ready (and takes no
    work) until its state store answered one lookup, rather than until the first message finds it down.
    """
    store, health = built.state, built.pipeline.health
    if store is None or not enabled:
        yield
        return
    mark_state_unchecked(built)

    async def probe() -> None:
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(STATE_PROBE_TIMEOUT_SECONDS):
                    await store.lookup([STATE_PROBE_KEY], [])
            except Exception as exc:
                attempt += 1
                health.state_problem = f"state store: {type(exc).__name__}: {exc}".rstrip(": ")
                audit.get_logger().warning(
                    audit.STATE_RETRYING,
                    operation="start-up probe",
                    attempt=attempt,
                    error=health.state_problem,
                )
                await asyncio.sleep(min(retry_cap, 2.0 ** (attempt - 1)))
                continue
            if health.state_problem.startswith("state store: "):
                health.state_problem = ""
            if attempt:
                audit.get_logger().info(audit.STATE_RECOVERED, operation="start-up probe", attempts=attempt)
            return

    task = asyncio.create_task(probe(), name="ctsync-state-probe")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def summary_lines(counts: dict[str, Any]) -> list[str]:
    """Return a person-readable summary of a run's counts."""
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(counts["requests_by_status"].items()))
    return [
        f"received {counts['received']} payloads",
        f"  notified    {counts['notifications_sent']} notifications in {counts['requests']} requests"
        + (f" ({statuses})" if statuses else ""),
        f"  coalesced   {counts['coalesced']}",
        f"  duplicates  {counts['duplicate']}",
        f"  stale       {counts['stale']}",
        f"  ignored     {counts['ignored']}",
        f"  invalid     {counts['invalid']}",
        f"  dead-letter {counts['dead_lettered']}",
        f"  retries     {counts['retries']}",
        f"  acked {counts['acked']}, handed back {counts['handed_back']}",
    ]
