"""Benchmark the Pub/Sub source's own cost.

1. The callback path we own: 100,000 in-memory Message-like objects are handed to ``PubSubSource.on_message``
   from a 10-thread pool (what the client library's scheduler uses), under flow control of
   ``CTSYNC_MAX_IN_FLIGHT`` (10,000) leased messages, through the full pipeline (parse, dedupe, route,
   outbox) into an unthrottled no-op sink until every message is acked. The ceiling, measured in the same
   run, is a bare callback that acks on receipt through the same pool and flow control. Target ratio >= 0.5.
   For reference, the same pipeline over an in-memory list (no threads, no hand-over) is measured too: the
   ratio can never exceed that line's.
2. A sanity check end to end on Google's pstest server: 2,000 messages through ctsync's source and pipeline
   vs a bare streaming-pull subscriber that acks on receipt, same server, same run. pstest hands each stream
   about 100 messages/s, so both figures mostly measure pstest.

Run: ``.venv/bin/python -m bench.pubsub [--messages N] [--pstest-messages N]``; ``--skip-pstest`` skips 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler
from pipeline import UNTHROTTLED, payloads

from adapters import pubsub
from adapters.memory import MemoryStateStore
from consumer import audit, collector
from consumer.cli import wiring
from consumer.config import load_settings
from consumer.dedupe import Deduplicator
from consumer.pipeline import Pipeline, PipelineOptions
from consumer.ports import Source
from consumer.routing import Router
from consumer.testing import ListSource, MemoryDeadLetters, RecordingSink
from consumer.throttle import LocalThrottleStore, Throttle

MAX_IN_FLIGHT = 10_000
CALLBACK_THREADS = 10


class FakeMessage:
    """What the client library hands a callback, reduced to what the source reads."""

    __slots__ = ("_done", "data", "delivery_attempt", "message_id")

    def __init__(self, data: bytes, message_id: str, done: Callable[[], None]) -> None:
        self.data = data
        self.message_id = message_id
        self.delivery_attempt = 1
        self._done = done

    def ack(self) -> None:
        self._done()

    def nack(self) -> None:
        self._done()


class Completion:
    """Count settlements, release flow control, and signal when all ``total`` are settled."""

    def __init__(self, total: int, *, flow_control: bool = True) -> None:
        self.total = total
        self.settled = 0
        self.lock = threading.Lock()
        # Without flow control (a real client does its own), releases are not bounded.
        self.flow = threading.BoundedSemaphore(MAX_IN_FLIGHT) if flow_control else threading.Semaphore(0)
        self.finished = threading.Event()
        self.on_finish: Callable[[], None] = lambda: None

    def done(self) -> None:
        with self.lock:
            self.settled += 1
            last = self.settled == self.total
        self.flow.release()
        if last:
            self.finished.set()
            self.on_finish()


def feed(
    bodies: Sequence[bytes], completion: Completion, callback: Callable[[FakeMessage], None], scheduler: Any
) -> None:
    """Hand every message to ``scheduler`` as the client's stream thread does, leasing at most MAX_IN_FLIGHT
    at once; shut the scheduler down once all are settled (a shutdown drops what is still queued)."""
    for i, body in enumerate(bodies):
        completion.flow.acquire()
        scheduler.schedule(callback, FakeMessage(body, str(i), completion.done))
    completion.finished.wait()
    scheduler.shutdown()


def bare_ceiling(bodies: Sequence[bytes], scheduler: Any) -> float:
    completion = Completion(len(bodies))
    started = time.perf_counter()
    feed(bodies, completion, lambda message: message.ack(), scheduler)
    return len(bodies) / (time.perf_counter() - started)


async def collected(measure: Callable[..., float], *args: Any) -> float:
    """Run a thread-driven measurement under the collector settings ctsync runs with, so that baselines and
    ctsync are compared on equal terms."""
    async with collector.garbage_collected():
        return await asyncio.to_thread(measure, *args)


def default_scheduler() -> Any:
    """The client's default: a pool of CALLBACK_THREADS callback threads."""
    return ThreadScheduler(ThreadPoolExecutor(max_workers=CALLBACK_THREADS))


def build_pipeline(source: Source) -> Pipeline:
    return Pipeline(
        source=source,
        router=Router(),
        deduplicator=Deduplicator(MemoryStateStore(), 3600),
        throttle=Throttle(LocalThrottleStore(UNTHROTTLED), UNTHROTTLED),
        sink=RecordingSink(),
        dead_letters=MemoryDeadLetters(),
        options=PipelineOptions(batch_size=100, max_in_flight=MAX_IN_FLIGHT),
    )


async def through_ctsync(bodies: Sequence[bytes]) -> float:
    loop = asyncio.get_running_loop()
    source = pubsub.PubSubSource("projects/bench/subscriptions/bench", loop)
    pipeline = build_pipeline(source)
    completion = Completion(len(bodies))
    stop = asyncio.Event()
    # Acks run on the event loop (the pipeline settles there), so the stop event may be set directly.
    completion.on_finish = stop.set
    started = time.perf_counter()
    # As PubSubSource.start subscribes: the hand-over runs on the stream thread.
    scheduler = pubsub.HandOverScheduler()
    feeder = threading.Thread(
        target=feed, args=(bodies, completion, source.on_message, scheduler), daemon=True
    )
    feeder.start()
    async with collector.garbage_collected():  # as `ctsync run` does
        await pipeline.run(stop)
    elapsed = time.perf_counter() - started
    await asyncio.to_thread(feeder.join)
    await source.close()
    assert pipeline.counts.acked == len(bodies), pipeline.counts
    return len(bodies) / elapsed


async def pipeline_alone(bodies: Sequence[bytes]) -> float:
    """The same pipeline over an in-memory list: no threads, no hand-over (what the core alone costs)."""
    pipeline = build_pipeline(ListSource(bodies))
    started = time.perf_counter()
    async with collector.garbage_collected():  # as `ctsync run` does
        await pipeline.run()
    return len(bodies) / (time.perf_counter() - started)


def callback_path(count: int) -> None:
    bodies = payloads(count, entities=count // 4)
    threads, flow = CALLBACK_THREADS, MAX_IN_FLIGHT
    print(f"callback path: {count:,} messages, flow control {flow:,}")
    ceiling = asyncio.run(collected(bare_ceiling, bodies, default_scheduler()))
    print(f"  bare callback, ack on receipt, {threads} pool threads {ceiling:10,.0f} messages/s   (ceiling)")
    inline = asyncio.run(collected(bare_ceiling, bodies, pubsub.HandOverScheduler()))
    print(
        f"  bare callback, ack on receipt, stream thread {inline:9,.0f} messages/s   "
        "(no pool: ctsync's scheduler, no work at all)"
    )
    with open(os.devnull, "wb") as devnull:
        for level in ("INFO", "WARNING"):
            audit.configure(level=level, stream=devnull, audit=level == "INFO")
            alone = asyncio.run(pipeline_alone(bodies))
            print(
                f"  pipeline alone, list source, {level:7}  {alone:12,.0f} messages/s   "
                f"ratio {alone / ceiling:.3f}   (the core's own bound)"
            )
            rate = asyncio.run(through_ctsync(bodies))
            print(
                f"  ctsync source + pipeline, audit {level:7} {rate:12,.0f} messages/s   "
                f"ratio {rate / ceiling:.3f}   (to the stream-thread line {rate / inline:.3f})"
            )


# ------------------------------------------------------------------------------------------------ pstest


def emulator() -> tuple[str, Callable[[], None]]:
    preset = os.environ.get("PUBSUB_EMULATOR_HOST")
    if preset:
        return preset, lambda: None
    import subprocess

    from tests.servers.pstestserver import _first_line, build_pstest

    process = subprocess.Popen(
        [str(build_pstest())], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    return _first_line(process, timeout=15), process.terminate


def fresh_subscription(host: str, bodies: Sequence[bytes]) -> str:
    import google.cloud.pubsub_v1 as pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    from tests.servers.pstestserver import PubSubAdmin, _channel

    admin = PubSubAdmin(
        host,
        pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=_channel(host))),
        pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=_channel(host))),
    )
    tag = uuid.uuid4().hex[:8]
    topic = admin.create_topic(f"projects/bench/topics/t-{tag}")
    subscription = admin.create_subscription(f"projects/bench/subscriptions/s-{tag}", topic)
    admin.publish(topic, bodies)
    admin.publisher.stop()
    admin.subscriber.close()
    return subscription


def pubsub_env(host: str, subscription: str) -> dict[str, str]:
    return {
        "CTSYNC_SOURCE": "pubsub",
        "PUBSUB_EMULATOR_HOST": host,
        "PUBSUB_SUBSCRIPTION": subscription,
        "CTSYNC_STATE_URL": "memory://",
    }


def bare_subscriber(host: str, subscription: str, count: int) -> float:
    settings = load_settings(environ=pubsub_env(host, subscription), for_command="check")
    client = pubsub.subscriber_client(wiring.pubsub_options(settings))
    completion = Completion(count, flow_control=False)

    def callback(message: Any) -> None:
        message.ack()
        completion.done()

    started = time.perf_counter()
    future = client.subscribe(subscription, callback, flow_control=pubsub.flow_control(MAX_IN_FLIGHT))
    if not completion.finished.wait(timeout=600):
        raise RuntimeError(f"the bare subscriber got {completion.settled} of {count}")
    elapsed = time.perf_counter() - started
    future.cancel()
    future.result(timeout=10)
    client.close()
    return count / elapsed


async def ctsync_subscriber(host: str, subscription: str, count: int) -> float:
    settings = load_settings(environ=pubsub_env(host, subscription), for_command="check")
    started = time.perf_counter()
    source = await pubsub.open_source(wiring.pubsub_options(settings))
    pipeline = build_pipeline(source)
    stop = asyncio.Event()

    async def watch() -> None:
        # The pipeline exposes counts, not an event; a 10 ms poll is noise beside pstest's pace.
        while pipeline.counts.acked < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        stop.set()

    async with asyncio.timeout(600):
        watcher = asyncio.create_task(watch())
        async with collector.garbage_collected():  # as `ctsync run` does
            await pipeline.run(stop)
        await watcher
    elapsed = time.perf_counter() - started
    await source.close()
    return count / elapsed


def end_to_end(count: int) -> None:
    host, stop_server = emulator()
    try:
        bodies = payloads(count, entities=count)
        with open(os.devnull, "wb") as devnull:
            audit.configure(level="INFO", stream=devnull)
            bare = bare_subscriber(host, fresh_subscription(host, bodies), count)
            ours = asyncio.run(ctsync_subscriber(host, fresh_subscription(host, bodies), count))
        print(f"end to end on pstest ({host}): {count:,} messages, one stream each")
        print(f"  bare streaming-pull subscriber          {bare:12,.0f} messages/s")
        print(f"  ctsync source + pipeline                {ours:12,.0f} messages/s   ratio {ours / bare:.3f}")
    finally:
        stop_server()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--pstest-messages", type=int, default=2_000)
    parser.add_argument("--skip-pstest", action="store_true")
    args = parser.parse_args()
    callback_path(args.messages)
    if not args.skip_pstest:
        end_to_end(args.pstest_messages)


if __name__ == "__main__":
    main()
