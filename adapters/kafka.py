"""Kafka and Confluent Cloud: an aiokafka source with at-least-once offsets, and a dead-letter producer.

One poller task owns the consumer: it fetches in batches (``getmany``) into a buffer that the pipeline drains
through ``fetch``, commits per partition only up to the lowest offset not yet acked, pauses every assigned
partition while ``CTSYNC_MAX_IN_FLIGHT`` envelopes are unsettled and keeps polling meanwhile, so the group
does not evict a consumer that is only waiting for the throttle.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, SaslAuthenticationFailed
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

from consumer import audit, dead_letters
from consumer.offsets import OffsetTracker, PartitionOffsets
from consumer.ports import DeadLetter, DeadLetterSink, Envelope, Fetched, Source

Partition = tuple[str, int]

COMMIT_INTERVAL_S = 1.0
FETCH_RECORDS_MAX = 5_000
DEAD_LETTER_IDLE_S = 3.0


@dataclass(frozen=True, slots=True)
class KafkaOptions:
    """What the Kafka clients need: brokers, topics, group, TLS and SASL, and the source's bounds."""

    bootstrap_servers: tuple[str, ...]
    topics: tuple[str, ...] = ()
    group_id: str = "ctsync"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_in_flight: int = 10_000
    drain_timeout_seconds: float = 30.0


class SourceUnavailable(ConnectionError):
    """The broker cannot be reached or the configured topics do not exist; the message names the setting.

    ``fix`` says what to change, where the cause is known (rejected credentials, an untrusted certificate).
    """

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


def client_options(options: KafkaOptions) -> dict[str, Any]:
    """Return the connection options aiokafka clients share: servers, TLS (verified), SASL."""
    protocol = options.security_protocol
    shared: dict[str, Any] = {
        "bootstrap_servers": list(options.bootstrap_servers),
        "security_protocol": protocol,
        "client_id": "ctsync",
    }
    if protocol in ("SSL", "SASL_SSL"):
        # Always verifies the broker's certificate and host name: against the system's CAs, or a private CA.
        cafile = options.ssl_cafile
        shared["ssl_context"] = create_ssl_context(cafile=str(cafile) if cafile is not None else None)
    if protocol.startswith("SASL_"):
        password = options.sasl_password
        shared["sasl_mechanism"] = options.sasl_mechanism
        shared["sasl_plain_username"] = options.sasl_username
        shared["sasl_plain_password"] = password.get_secret_value() if password is not None else None
    return shared


def _servers(options: KafkaOptions) -> str:
    return ",".join(options.bootstrap_servers)


def _unreachable(options: KafkaOptions, exc: BaseException) -> SourceUnavailable:
    return SourceUnavailable(
        f"KAFKA_BOOTSTRAP_SERVERS: cannot reach {_servers(options)} ({type(exc).__name__}: {exc})"
    )


async def _connection_problem(options: KafkaOptions, exc: BaseException) -> SourceUnavailable:
    """Say why the clients could not bootstrap, naming the setting to fix.

    aiokafka only logs each broker's error and raises "Unable to bootstrap"; one direct connection to the
    first broker, with the same TLS and SASL options, shows whether the credentials or the certificate were
    refused, or the protocol does not match the listener.
    """
    server = options.bootstrap_servers[0]
    host, _, port = server.rpartition(":")
    shared = client_options(options)
    protocol = options.security_protocol
    with_tls = protocol in ("SSL", "SASL_SSL")
    try:
        async with asyncio.timeout(5):
            connection = await create_conn(
                host.strip("[]"),
                int(port),
                ssl_context=shared.get("ssl_context"),
                security_protocol=protocol,
                sasl_mechanism=shared.get("sasl_mechanism", "PLAIN"),
                sasl_plain_username=shared.get("sasl_plain_username"),
                sasl_plain_password=shared.get("sasl_plain_password"),
            )
    except SaslAuthenticationFailed as refused:
        return SourceUnavailable(
            f"KAFKA_SASL_PASSWORD: {server} refused the SASL {options.sasl_mechanism} credentials of "
            f"KAFKA_SASL_USERNAME ({refused})",
            "check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD (Confluent Cloud: the cluster's API key and "
            "secret, not a Cloud API key)",
        )
    except ssl.SSLCertVerificationError as untrusted:
        reason = untrusted.verify_message or str(untrusted)
        if untrusted.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return SourceUnavailable(
                f"KAFKA_BOOTSTRAP_SERVERS: the certificate of {server} is not for host {host} ({reason})",
                "use the broker's host name as its certificate names it in KAFKA_BOOTSTRAP_SERVERS",
            )
        cafile = options.ssl_cafile
        trusted = f"the CA in {cafile}" if cafile is not None else "a CA of the system's store"
        return SourceUnavailable(
            f"KAFKA_SSL_CAFILE: the certificate of {server} does not chain to {trusted} ({reason})",
            "set KAFKA_SSL_CAFILE to the PEM file of the CA that signed the brokers' certificates",
        )
    except (ssl.SSLError, ConnectionResetError) as failed:
        if not with_tls:
            return _unreachable(options, exc)
        # A listener without TLS reads the handshake as a broken request and drops the connection.
        return SourceUnavailable(
            f"KAFKA_SECURITY_PROTOCOL: the TLS handshake with {server} failed "
            f"({getattr(failed, 'reason', None) or type(failed).__name__}); is it a TLS listener?",
            "check KAFKA_SECURITY_PROTOCOL against the listener behind KAFKA_BOOTSTRAP_SERVERS",
        )
    except KafkaConnectionError:
        if with_tls:
            return _unreachable(options, exc)
        # A TLS listener drops a connection whose first bytes are not a TLS handshake.
        return SourceUnavailable(
            f"KAFKA_SECURITY_PROTOCOL: {server} closed the connection at once: is it a TLS listener "
            f"(SASL_SSL, as on Confluent Cloud), while KAFKA_SECURITY_PROTOCOL is {protocol}?",
            "check KAFKA_SECURITY_PROTOCOL against the listener behind KAFKA_BOOTSTRAP_SERVERS",
        )
    except (KafkaError, OSError, TimeoutError):
        return _unreachable(options, exc)
    connection.close()
    return _unreachable(options, exc)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.source.partitions_revoked([(tp.topic, tp.partition) for tp in revoked])

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.source.joined = True
        self.source.log.info(
            "kafka.partitions_assigned", partitions=sorted(f"{t}/{p}" for t, p in self.source.assigned())
        )


class KafkaSource:
    """A ``Source`` over a consumer group's share of the topics."""

    name = "kafka"

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topics: Sequence[str],
        *,
        max_in_flight: int,
        revoke_timeout: float,
        commit_interval: float = COMMIT_INTERVAL_S,
        exhaust_after_idle: float | None = None,
    ) -> None:
        self.consumer = consumer
        self.topics = list(topics)
        self.max_in_flight = max_in_flight
        self.revoke_timeout = revoke_timeout
        self.commit_interval = commit_interval
        # A finite read (dead-letter replay): exhausted once nothing arrived for this long.
        self.exhaust_after_idle = exhaust_after_idle
        self.log = audit.get_logger("ctsync.kafka").bind()
        self.offsets: OffsetTracker[Partition] = OffsetTracker()
        self._buffer: deque[Envelope] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._paused = False
        self._last_commit = time.monotonic()
        self._last_record = time.monotonic()
        self._commit_lock = asyncio.Lock()
        # Set once the group gave this member its share (possibly none, with more replicas than partitions).
        self.joined = False

    async def start(self) -> None:
        self.consumer.subscribe(topics=self.topics, listener=_Rebalance(self))
        await self.consumer.start()
        try:
            known = await self.consumer.topics()
        except KafkaError as exc:
            await self.consumer.stop()
            raise SourceUnavailable(f"KAFKA_TOPICS: cannot list topics ({type(exc).__name__})") from None
        missing = [topic for topic in self.topics if topic not in known]
        if missing:
            await self.consumer.stop()
            raise SourceUnavailable(f"KAFKA_TOPICS: no such topic on the broker: {', '.join(missing)}")
        self._poller = asyncio.create_task(self._poll(), name="ctsync-kafka-poller")

    def assigned(self) -> list[Partition]:
        return [(tp.topic, tp.partition) for tp in self.consumer.assignment()]

    def problem(self) -> str | None:
        """Why this source is not ready, for /readyz: not yet in the group, or the poller failed."""
        poller = self._poller
        if poller is not None and poller.done() and not poller.cancelled() and poller.exception() is not None:
            return f"the Kafka poller failed: {poller.exception()!r}"
        if not self.joined:
            return "not yet joined the consumer group"
        # aiokafka forgets the coordinator when it stops answering (broker down or unreachable).
        coordinator = getattr(self.consumer, "_coordinator", None)
        if coordinator is not None and getattr(coordinator, "coordinator_id", 0) is None:
            return "the group coordinator does not answer (broker unreachable?)"
        return None

    def lag(self) -> dict[Partition, int]:
        """Records between the committed offset and the end, per assigned partition (as last fetched)."""
        found = {}
        for tp in self.consumer.assignment():
            partition = (tp.topic, tp.partition)
            end = self.consumer.highwater(tp)
            committed = self.offsets.last_committed(partition)
            if end is not None and committed is not None:
                found[partition] = max(0, end - committed)
        return found

    # ------------------------------------------------------------------------------------ pipeline side

    async def fetch(self, max_count: int) -> Fetched:
        if not self._buffer:
            self._raise_if_poller_failed()
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._ready.wait()
        buffer = self._buffer
        if max_count >= len(buffer):
            envelopes = list(buffer)
            buffer.clear()
        else:
            popleft = buffer.popleft
            envelopes = [popleft() for _ in range(max_count)]
        exhausted = (
            self.exhaust_after_idle is not None
            and not buffer
            and not envelopes
            and time.monotonic() - self._last_record >= self.exhaust_after_idle
        )
        return Fetched(envelopes, more_ready=bool(buffer), exhausted=exhausted)

    def _raise_if_poller_failed(self) -> None:
        poller = self._poller
        if poller is not None and poller.done() and not poller.cancelled():
            error = poller.exception()
            if error is not None:
                raise error

    def _acked(self, offsets: PartitionOffsets, offset: int) -> None:
        offsets.acked(offset)
        self._room.set()

    @staticmethod
    def _handed_back() -> None:
        # A handed-back offset stays unsettled, so no commit passes it and the group redelivers it.
        return None

    # -------------------------------------------------------------------------------------- poller side

    async def _poll(self) -> None:
        consumer = self.consumer
        # Once paused, the partitions stay paused until half the bound is free: resuming at the first free
        # slot makes aiokafka drop its prefetched data on every cycle and fetch it again (fetch churn).
        resume_at = max(1, self.max_in_flight // 2)
        while True:
            room = self.max_in_flight - self.offsets.outstanding()
            if room <= 0 or (self._paused and room < resume_at):
                self._pause()
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._room.wait()
                # Polling a paused consumer returns nothing but tells the group this member is alive.
                await consumer.getmany(timeout_ms=0)
            else:
                self._resume()
                batches = await consumer.getmany(timeout_ms=500, max_records=min(room, FETCH_RECORDS_MAX))
                if batches:
                    self._take(batches)
            if time.monotonic() - self._last_commit >= self.commit_interval:
                await self.commit()

    def _take(self, batches: dict[Any, list[Any]]) -> None:
        """Turn what one poll fetched into envelopes, one pass per partition."""
        append = self._buffer.append
        acked = self._acked
        handed_back = self._handed_back
        plain = self.exhaust_after_idle is None
        for tp, records in batches.items():
            topic, number = tp.topic, tp.partition
            offsets = self.offsets.partition((topic, number))
            offsets.received_many([record.offset for record in records])
            prefix = f"{topic}/{number}/"
            for record in records:
                offset = record.offset
                value = record.value
                append(
                    Envelope(
                        value if value is not None else b"",
                        prefix + str(offset),
                        partial(acked, offsets, offset),
                        handed_back,
                        {"topic": topic, "partition": number, "offset": offset}
                        if plain
                        else self._fields(topic, number, offset, record),
                        record.key,
                    )
                )
        self._last_record = time.monotonic()
        self._ready.set()

    def _fields(self, topic: str, partition: int, offset: int, record: Any) -> dict[str, object]:
        fields: dict[str, object] = {"topic": topic, "partition": partition, "offset": offset}
        if self.exhaust_after_idle is not None:
            # Reading dead letters back: their reason and time let a replay filter them.
            fields.update(dead_letters.replay_fields(dead_letters.from_kafka_headers(record.headers or ())))
        return fields

    def _pause(self) -> None:
        # Every time: partitions assigned by a rebalance since the last pause arrive unpaused.
        self.consumer.pause(*self.consumer.assignment())
        if not self._paused:
            self._paused = True
            self.log.info("kafka.paused", unsettled=self.offsets.outstanding(), bound=self.max_in_flight)

    def _resume(self) -> None:
        if self._paused:
            self.consumer.resume(*self.consumer.paused())
            self._paused = False
            self.log.info("kafka.resumed", unsettled=self.offsets.outstanding())

    async def commit(self, partitions: Sequence[Partition] | None = None) -> None:
        """Commit, per partition, the offset below which everything is settled."""
        async with self._commit_lock:
            self._last_commit = time.monotonic()
            offsets = self.offsets.committable()
            if partitions is not None:
                offsets = {p: o for p, o in offsets.items() if p in partitions}
            if not offsets:
                return
            try:
                await self.consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
            except KafkaError as exc:
                # Not fatal: the next commit carries the same offsets; a lost one means redelivery, not loss.
                self.log.warning("kafka.commit_failed", error=f"{type(exc).__name__}: {exc}")
                return
            self.offsets.committed(offsets)
            self.log.debug("kafka.committed", offsets={f"{t}/{p}": o for (t, p), o in offsets.items()})

    async def partitions_revoked(self, revoked: list[Partition]) -> None:
        """Drop unread envelopes of ``revoked``, wait (bounded) for the rest to settle, commit, let go."""
        revoked_set = set(revoked)
        kept = [
            e
            for e in self._buffer
            if (e.source_fields["topic"], e.source_fields["partition"]) not in revoked_set
        ]
        dropped = len(self._buffer) - len(kept)
        self._buffer = deque(kept)
        handed_out = self.offsets.outstanding(revoked) - dropped
        deadline = time.monotonic() + self.revoke_timeout
        while handed_out > 0 and time.monotonic() < deadline:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, max(0.0, deadline - time.monotonic()))):
                    await self._room.wait()
            handed_out = self.offsets.outstanding(revoked) - dropped
        await self.commit(revoked)
        for partition in revoked:
            self.offsets.retire(partition)
        self.log.info(
            "kafka.partitions_revoked",
            partitions=sorted(f"{t}/{p}" for t, p in revoked),
            unread_dropped=dropped,
            given_up=max(0, handed_out),
        )

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await poller
        try:
            await self.commit()
        finally:
            await self.consumer.stop()


IDLE_FETCH_WAKEUP_MS: Final = 1000


def _consumer(options: KafkaOptions, group_id: str | None, **extra: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=options.auto_offset_reset,
        fetch_max_bytes=4 * 1024 * 1024,
        max_partition_fetch_bytes=512 * 1024,
        # How often aiokafka's fetch routine wakes when it has nothing to wait on. A paused partition gives
        # it a resume future, consumption and rebalances give it others, so its 200 ms default only polls
        # while ctsync waits at the in-flight bound or for the budget: 5 wake-ups a second for nothing.
        consumer_timeout_ms=IDLE_FETCH_WAKEUP_MS,
        **client_options(options),
        **extra,
    )


async def open_source(options: KafkaOptions) -> Source:
    drain = options.drain_timeout_seconds
    consumer = _consumer(
        options,
        options.group_id,
        # A revocation waits for in-flight work up to the drain deadline; the group must allow that long.
        rebalance_timeout_ms=int((drain + 30) * 1000),
        max_poll_interval_ms=int(max(300.0, drain + 60) * 1000),
    )
    source = KafkaSource(consumer, options.topics, max_in_flight=options.max_in_flight, revoke_timeout=drain)
    try:
        await source.start()
    except (KafkaError, OSError) as exc:
        if isinstance(exc, SourceUnavailable):
            raise
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise await _connection_problem(options, exc) from None
    return source


async def open_dead_letter_source(options: KafkaOptions, name: str) -> Source:
    """Read what waits on dead-letter topic ``name`` (group ``<KAFKA_GROUP_ID>-dead-letters``), then stop."""
    consumer = _consumer(options, f"{options.group_id}-dead-letters")
    source = KafkaSource(
        consumer,
        [name],
        max_in_flight=options.max_in_flight,
        revoke_timeout=options.drain_timeout_seconds,
        exhaust_after_idle=DEAD_LETTER_IDLE_S,
    )
    source.name = "kafka-dead-letters"
    try:
        await source.start()
    except (KafkaError, OSError) as exc:
        if isinstance(exc, SourceUnavailable):
            raise
        raise await _connection_problem(options, exc) from None
    return source


async def probe(options: KafkaOptions) -> str:
    """Check the brokers answer and every topic of KAFKA_TOPICS exists; describe what was found."""
    consumer = AIOKafkaConsumer(**client_options(options))
    try:
        await consumer.start()
    except (KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise await _connection_problem(options, exc) from None
    try:
        # The partition counts come from the same answer: a consumer subscribed to nothing keeps no
        # topic's metadata (tansu answered with every topic anyway; Apache Kafka rightly does not).
        cluster = await consumer._client.fetch_all_metadata()
        known = cluster.topics()
        missing = [topic for topic in options.topics if topic not in known]
        if missing:
            raise LookupError(f"KAFKA_TOPICS: no such topic on {_servers(options)}: {', '.join(missing)}")
        found = ", ".join(
            f"{topic} ({len(cluster.partitions_for_topic(topic) or ())} partitions)"
            for topic in options.topics
        )
        return f"Kafka at {_servers(options)}: {found}"
    finally:
        await consumer.stop()


async def probe_topic(options: KafkaOptions, topic: str) -> str:
    """Check that the brokers answer and ``topic`` exists (``ctsync check`` of a dead-letter topic)."""
    consumer = AIOKafkaConsumer(**client_options(options))
    try:
        await consumer.start()
    except (KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise _unreachable(options, exc) from None
    try:
        if topic not in await consumer.topics():
            raise LookupError(f"no such topic on {_servers(options)}: {topic}")
        return f"Kafka topic {topic} exists ({len(consumer.partitions_for_topic(topic) or ())} partitions)"
    finally:
        await consumer.stop()


class KafkaDeadLetterSink:
    """Dead letters to a topic: the original value and key, with headers for the reason and the origin."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        sent = [
            await self.producer.send(
                self.topic, value=letter.body, key=letter.key, headers=dead_letters.kafka_headers(letter)
            )
            for letter in letters
        ]
        # Every write is acknowledged by the broker (acks=all) before the offsets behind it may be committed.
        await asyncio.gather(*sent)

    async def close(self) -> None:
        await self.producer.stop()


async def open_dead_letter_sink(options: KafkaOptions, topic: str) -> DeadLetterSink:
    producer = AIOKafkaProducer(acks="all", linger_ms=5, **client_options(options))
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await producer.stop()
        problem = await _connection_problem(options, exc)
        if problem.fix is not None:
            raise problem from None
        raise ConnectionError(
            f"CTSYNC_DEAD_LETTER_URL: cannot reach {_servers(options)} ({type(exc).__name__}: {exc})"
        ) from None
    return KafkaDeadLetterSink(producer, topic)
