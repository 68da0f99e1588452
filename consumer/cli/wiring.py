"""Wiring: build a Pipeline and its adapters from Settings. The only module that imports adapters.

Configuration flows one way: Settings -> the options each adapter takes -> the adapter. Parts can be passed
in (a sink, a state store, a throttle store), so a command that needs a different part says so when it
builds, instead of patching a built pipeline. Adapters are imported when used, so a command pays only for
the broker and HTTP libraries it touches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from consumer import audit
from consumer.config import ListenAddress, Settings
from consumer.dedupe import Deduplicator
from consumer.dry_run import DryRunSink, HandingBackSource, ReadOnlyStateStore
from consumer.pipeline import Pipeline, PipelineOptions
from consumer.ports import CursorStore, DeadLetterSink, Sink, Source, StateStore, ThrottleStore
from consumer.retry import backoff_delay
from consumer.routing import Router, ScopeMap, load_scope_map
from consumer.sweep import Mode
from consumer.throttle import LocalThrottleStore, Throttle, ThrottleLimits

if TYPE_CHECKING:
    from adapters import _http_server
    from adapters.backfill_source import BackfillSource
    from adapters.commercetools import CommercetoolsClient as CommercetoolsClient
    from adapters.commercetools import CommercetoolsError, CommercetoolsOptions
    from adapters.ipaas import HookProbe
    from adapters.kafka import KafkaOptions
    from adapters.pubsub import PubSubOptions
    from adapters.push import PushOptions
    from adapters.redis.state import RedisOptions, RedisStateStore


class Serving(Protocol):
    """Something serving in the background until closed (the HTTP endpoints)."""

    async def close(self) -> None: ...


# Sources whose acks change what the stream delivers next (the names their adapters give them).
STREAM_SOURCES = frozenset({"kafka", "kafka-dead-letters", "pubsub", "push"})


class UnsupportedSetting(ValueError):
    """A valid setting this build cannot serve yet; the message names the variable."""


# ------------------------------------------------------------------ Settings -> the options of each adapter


def listen_address(address: ListenAddress) -> _http_server.ListenAddress:
    from adapters._http_server import ListenAddress as AdapterListenAddress

    return AdapterListenAddress(address.host, address.port)


def kafka_options(settings: Settings) -> KafkaOptions:
    from adapters.kafka import KafkaOptions

    return KafkaOptions(
        bootstrap_servers=tuple(settings.kafka_bootstrap_server_list),
        topics=tuple(settings.kafka_topic_list),
        group_id=settings.kafka_group_id,
        security_protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=settings.kafka_sasl_password,
        ssl_cafile=settings.kafka_ssl_cafile,
        auto_offset_reset=settings.kafka_auto_offset_reset,
        max_in_flight=settings.ctsync_max_in_flight,
        drain_timeout_seconds=settings.ctsync_drain_timeout_seconds,
    )


def pubsub_options(settings: Settings) -> PubSubOptions:
    from adapters.pubsub import PubSubOptions

    return PubSubOptions(
        subscription=settings.pubsub_subscription,
        emulator_host=settings.pubsub_emulator_host,
        max_in_flight=settings.ctsync_max_in_flight,
    )


def push_options(settings: Settings) -> PushOptions:
    """Raise ``UnsupportedSetting`` for an account without an audience: it is only checked inside a token."""
    from adapters.push import PushOptions

    if settings.push_service_account is not None and settings.push_audience is None:
        raise UnsupportedSetting(
            "PUSH_SERVICE_ACCOUNT: is checked only inside a verified token; set PUSH_AUDIENCE too"
        )
    return PushOptions(
        listen=listen_address(settings.push_listen),
        audience=settings.push_audience,
        service_account=settings.push_service_account,
        max_in_flight=settings.ctsync_max_in_flight,
        header_timeout_seconds=settings.push_header_timeout_seconds,
        max_connections=settings.push_max_connections,
        keep_alive_seconds=settings.push_keep_alive_seconds,
    )


def redis_key_prefix(settings: Settings) -> str:
    """The prefix of this deployment's Redis keys: one per project and hook, so deployments can share."""
    from adapters.redis.state import key_prefix

    return key_prefix(settings.ctp_project_key, settings.ipaas_hook_url)


def redis_options(settings: Settings) -> RedisOptions:
    """The Redis of CTSYNC_STATE_URL, with this deployment's key prefix."""
    from adapters.redis.state import RedisOptions

    state = settings.state
    assert state.kind == "redis", "Redis options need a redis:// CTSYNC_STATE_URL"
    return RedisOptions(url=state.url, key_prefix=redis_key_prefix(settings), password=state.password)


def commercetools_options(settings: Settings) -> CommercetoolsOptions:
    """Raise ValueError naming the first CTP_* setting missing."""
    from adapters.commercetools import CommercetoolsOptions

    for name in ("CTP_PROJECT_KEY", "CTP_CLIENT_ID", "CTP_CLIENT_SECRET", "CTP_AUTH_URL", "CTP_API_URL"):
        if getattr(settings, name.lower()) is None:
            raise ValueError(f"{name}: required")
    secret = settings.ctp_client_secret
    assert secret is not None
    return CommercetoolsOptions(
        project_key=str(settings.ctp_project_key),
        api_url=str(settings.ctp_api_url),
        auth_url=str(settings.ctp_auth_url),
        client_id=str(settings.ctp_client_id),
        client_secret=secret,
        scopes=tuple(settings.scopes),
    )


# ------------------------------------------------------------------------------------------------ parts


def configured_limits(settings: Settings) -> ThrottleLimits:
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
        from adapters.memory import MemoryStateStore

        return MemoryStateStore()
    if state.kind == "sqlite":
        from adapters.sqlite.state import SqliteStateStore, UnusableStateFile

        assert state.path is not None
        store = SqliteStateStore(state.path)
        try:
            await store.open()
        except UnusableStateFile as exc:
            raise UnsupportedSetting(f"CTSYNC_STATE_URL: {exc}") from None
        return store
    if state.kind == "redis":
        from adapters.redis.state import open_state_store

        # Unchecked: a replica starts while Redis is down and reports not-ready until it answers.
        return await open_state_store(redis_options(settings), check=False)
    raise UnsupportedSetting(f"CTSYNC_STATE_URL: {state.kind} state is not supported by this build yet")


async def throttle_store(settings: Settings) -> ThrottleStore:
    """The throttle budget: shared by every replica through Redis with Redis state, else this process's."""
    if settings.state.kind == "redis":
        from adapters.redis.throttle import open_throttle_store

        return await open_throttle_store(redis_options(settings), configured_limits(settings), check=False)
    return LocalThrottleStore(configured_limits(settings))


async def dead_letter_sink(settings: Settings) -> DeadLetterSink:
    target = settings.dead_letter
    if target.kind == "file":
        from adapters.files import FileDeadLetterSink

        assert target.path is not None
        return FileDeadLetterSink(target.path)
    assert target.topic is not None
    if target.kind == "kafka":
        from adapters import kafka

        return await kafka.open_dead_letter_sink(kafka_options(settings), target.topic)
    if target.kind == "pubsub":
        from adapters import pubsub

        return await pubsub.open_dead_letter_sink(pubsub_options(settings), target.topic)
    raise UnsupportedSetting(
        f"CTSYNC_DEAD_LETTER_URL: {target.kind} dead letters are not supported by this build yet"
    )


def configured_sink(settings: Settings) -> Sink:
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

        return await kafka.open_source(kafka_options(settings))
    if spec.kind == "pubsub":
        from adapters import pubsub

        return await pubsub.open_source(pubsub_options(settings))
    if spec.kind == "push":
        from adapters import push

        return await push.open_source(push_options(settings))
    raise UnsupportedSetting(f"CTSYNC_SOURCE: the {spec.kind} source is not supported by this build yet")


async def open_endpoints(settings: Settings, pipeline: Pipeline, source: Source) -> Serving:
    """Serve /healthz, /readyz and /metrics for a long-lived run (raise OSError if the port is taken)."""
    from adapters.endpoints import open_endpoints as open_http

    return await open_http(listen_address(settings.http_listen), pipeline, source)


# ---------------------------------------------------------- what the operator commands and checks call


def commercetools_client(settings: Settings, **overrides: Any) -> CommercetoolsClient:
    """A client for the CTP_* project; raise ValueError naming the first setting missing."""
    from adapters.commercetools import CommercetoolsClient

    return CommercetoolsClient.from_options(commercetools_options(settings), **overrides)


def commercetools_error() -> type[CommercetoolsError]:
    """The error a commercetools call raises (status, codes, message), for an ``except`` clause."""
    from adapters.commercetools import CommercetoolsError

    return CommercetoolsError


async def probe_hook(settings: Settings, seconds: float) -> HookProbe:
    """Ask the hook whether it takes IPAAS_WEBHOOK_API_KEY, sending no notification."""
    from adapters.ipaas import probe_hook as probe

    assert settings.ipaas_hook_url is not None and settings.ipaas_webhook_api_key is not None
    return await probe(
        settings.ipaas_hook_url, settings.ipaas_webhook_api_key.get_secret_value(), seconds=seconds
    )


async def probe_source(settings: Settings) -> str:
    """Check that the broker source of CTSYNC_SOURCE answers and has what it needs; describe it."""
    assert settings.source is not None
    if settings.source.kind == "kafka":
        from adapters import kafka

        return await kafka.probe(kafka_options(settings))
    from adapters import pubsub

    return await pubsub.probe(pubsub_options(settings))


async def probe_dead_letter_topic(settings: Settings) -> str:
    """Check that the dead-letter topic of CTSYNC_DEAD_LETTER_URL exists; describe it."""
    target = settings.dead_letter
    assert target.topic is not None
    if target.kind == "kafka":
        from adapters import kafka

        return await kafka.probe_topic(kafka_options(settings), target.topic)
    from adapters import pubsub

    return await pubsub.probe_topic(pubsub_options(settings), target.topic)


async def sqlite_state_problem(path: Path) -> str | None:
    """Open the SQLite state file at ``path`` and close it; return why it cannot be used, if it cannot."""
    from adapters.sqlite.state import SqliteStateStore, UnusableStateFile

    store = SqliteStateStore(path)
    try:
        await store.open()
    except UnusableStateFile as exc:
        return str(exc)
    await store.close()
    return None


async def redis_state_store(settings: Settings) -> RedisStateStore:
    """Open the Redis state store and PING it; raise ``StoreUnavailable`` (a ConnectionError) if it does
    not answer."""
    from adapters.redis.state import open_state_store

    return await open_state_store(redis_options(settings))


async def pubsub_subscription_topic(settings: Settings) -> str:
    """The topic PUBSUB_SUBSCRIPTION is attached to."""
    from adapters import pubsub

    return await pubsub.subscription_topic(pubsub_options(settings))


async def dead_letter_source(
    settings: Settings, kind: str, name: str, *, snapshot: datetime
) -> tuple[Source, str | None]:
    """Open a finite source over the dead letters in file, Kafka topic or Pub/Sub subscription ``name``,
    up to those written before ``snapshot``; with the topic a Pub/Sub subscription is attached to."""
    if kind == "file":
        from adapters.files import JsonlFileSource

        source = JsonlFileSource(name, snapshot=True)
        source.open()
        return source, None
    if kind == "kafka":
        from adapters import kafka

        return await kafka.open_dead_letter_source(kafka_options(settings), name), None
    from adapters import pubsub

    pulled = await pubsub.open_dead_letter_source(pubsub_options(settings), name, snapshot=snapshot)
    return pulled, pulled.topic


async def cursor_store(settings: Settings) -> CursorStore:
    """Open the store of sweep cursors that goes with CTSYNC_STATE_URL."""
    state = settings.state
    if state.kind == "sqlite":
        from adapters.sqlite.cursors import SqliteCursorStore

        assert state.path is not None
        store = SqliteCursorStore(state.path)
        await store.open()
        return store
    if state.kind == "redis":
        from adapters.redis.cursors import open_cursor_store

        return await open_cursor_store(redis_options(settings))
    from adapters.memory import MemoryCursorStore

    return MemoryCursorStore()


def backfill_source(
    client: CommercetoolsClient,
    types: Sequence[str],
    *,
    mode: Mode,
    cursors: CursorStore,
    key: str,
    since: datetime | None,
    until: datetime | None,
    restart: bool,
    save: bool,
) -> BackfillSource:
    """A sweep's source over the project's query endpoints, resuming from ``cursors`` under ``key``."""
    from adapters.backfill_source import BackfillSource

    return BackfillSource(
        client.query_pages,
        types,
        project_key=client.project_key,
        mode=mode,
        cursors=cursors,
        key=key,
        since=since,
        until=until,
        restart=restart,
        save=save,
    )


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


async def build(
    settings: Settings,
    source: Source,
    *,
    finite: bool,
    sink: Sink | None = None,
    state: StateStore | None = None,
    throttle: ThrottleStore | None = None,
    throttle_limits: ThrottleLimits | None = None,
) -> App:
    """Build the pipeline for ``source``; ``finite`` runs (replay) give up on a hook that refuses the key.

    ``sink``, ``state``, ``throttle`` (with its ``throttle_limits``) replace the configured parts; the
    pipeline closes them as its own.
    """
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
        limits = throttle_limits or configured_limits(settings)
        throttle_port = throttle or await throttle_store(settings)
        resources.push_async_callback(throttle_port.close)
        store = state or await state_store(settings)
        if hands_back:
            store = ReadOnlyStateStore(store)
        resources.push_async_callback(store.close)
        letters = await dead_letter_sink(settings)
        resources.push_async_callback(letters.close)
        hook = sink or configured_sink(settings)
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
                await asyncio.sleep(backoff_delay(attempt, 1.0, retry_cap))
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
