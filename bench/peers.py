"""Benchmark ctsync against its peers: the same job, the same payloads, the same hook, the same broker.

The job: consume a 3-partition Kafka topic of commercetools change notifications from the start with a
consumer group, parse each record, drop duplicates, coalesce per entity within a batch, notify an
unthrottled hook (a real HTTP server) with batches of 100 ``{"scope", "external_id"}`` notifications, and
commit offsets only after the hook accepted. The payloads are one update per entity, so every contender
sends exactly one notification per payload and the runs are comparable.

Contenders, each a fresh process, in interleaved rounds (medians reported):

- ``hand``: what a competent user writes by hand: one aiokafka consumer (manual commits, ``getmany`` of up
  to 1,000 records), ``orjson.loads``, a dict of seen message keys, a dict per batch keyed by entity (the
  newest version wins), one ``httpx.AsyncClient`` POST per 100 notifications, commit after each fetch's
  notifications were accepted. No durable state, no audit trail, no throttle, no dead letters.
- ``faststream``: the same handler as a FastStream 0.7 batch subscriber (``batch=True, max_records=100``,
  ``AckPolicy.ACK``: acked after the handler returns), with the same dedupe dict and httpx client. The
  handler takes ``list[dict]``: FastStream decodes JSON bodies itself (annotated ``list[bytes]`` every
  body fails validation and nothing is ever sent).
- ``ctsync``: ``ctsync run`` at its defaults (SQLite state, INFO audit trail, batch 100), audit to /dev/null.
- ``ctsync-memory-1000``: memory state, batch size 1,000.
- ``ctsync-quiet`` (only when named in ``--contenders``): the defaults with the audit trail off
  (``CTSYNC_AUDIT=off``, ``CTSYNC_LOG_LEVEL=WARNING``: at WARNING alone the trail is still whole), no
  per-message audit lines: what the audit trail costs, by difference.
- ``ctsync@<short sha>`` (with ``--baseline-commit SHA``, in every mode): ``ctsync`` as that commit wrote it,
  checked out in a detached worktree (removed at the end) and run from the same venv with ``PYTHONPATH`` set
  to it, which comes before the venv's editable install (checked: ``consumer.cli`` and ``adapters`` must
  import from that tree). The settings' names are a kept contract, so the same environment serves both.

Figures per contender: payloads/s from the hook's first to last accepted request; CPU-s per 100k payloads
(user + system of the contender's process) from the hook's answer to the first accepted request to its
answer to the last, per notification accepted in between: the per-payload cost, start-up (imports,
connecting, the first fetch) excluded; the whole process's CPU-s per 100k, start-up included, as a second
column (``whole-process``); and Kafka fetch requests per 100k payloads, counted by a proxy that tansu
advertises in front of itself.

Run: ``.venv/bin/python -m bench.peers [--payloads N] [--rounds R] [--baseline-commit SHA]`` from the root of
the tree to measure (its ctsync runs with ``PYTHONPATH`` set to that root); ``make bench`` runs it too.

``--idle SECONDS``: instead, ctsync at its defaults under a full throttle (one request an hour, so after the
first one nothing leaves) with ``CTSYNC_MAX_IN_FLIGHT`` envelopes waiting: the share of a core it burns
while it can only wait, measured over SECONDS once the in-flight bound is reached (20,000 payloads).

``--budget SECONDS``: instead, what a notification costs at the rate the default budget allows: ctsync at
its defaults (SQLite state, INFO audit trail, batch 100) and the default throttle (500 requests per 60 s
moving window, 5 connections and batch executions at once) on a backlog of distinct-entity updates it
cannot send in the span (150,000 payloads by default; a run that notifies them all fails). From the hook's
answer to its first accepted request for SECONDS (120 by default: two windows), the process's user + system
CPU-s and the notifications accepted in that span: µs of CPU per notification, notifications/s and the
share of a core. Each window's 500 requests leave in a burst and the process then waits, so the span must
cover whole windows; the span's end falls where the third window's burst begins, so a few of its requests
may land inside (each is 0.1 % of the count). Example: ``--budget 120 --rounds 3 --baseline-commit SHA``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import orjson

ROOT = Path(__file__).resolve().parent.parent

from tests.servers.hookserver import HookServer  # noqa: E402
from tests.servers.kafkaserver import Kafka, free_port, start_tansu, stop_process  # noqa: E402

FETCH = 1  # Kafka's api key of a Fetch request


# ------------------------------------------------------------------------------------------- the peers

HAND = """
import asyncio, sys, uuid, httpx, orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

SCOPES = {"ResourceCreated": "created", "ResourceUpdated": "updated", "ResourceDeleted": "deleted"}

async def main():
    bootstrap, topic, group, url, key = sys.argv[1:6]
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    seen = {}
    await consumer.start()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            pending = {}
            for records in batches.values():
                for record in records:
                    change = orjson.loads(record.value)
                    resource = change["resource"]
                    message_key = f"{resource['typeId']}:{resource['id']}:{change['version']}"
                    if message_key in seen:
                        continue
                    seen[message_key] = True
                    entity = (resource["typeId"], resource["id"])
                    current = pending.get(entity)
                    if current is None or current[0] <= change["version"]:
                        scope = f"{resource['typeId']}/{SCOPES[change['notificationType']]}"
                        pending[entity] = (change["version"], scope)
            items = [{"scope": s, "external_id": e[1]} for e, (_, s) in pending.items()]
            for start in range(0, len(items), 100):
                response = await client.post(url, json={"notifications": items[start:start + 100]},
                                             headers={"x-correlation-id": str(uuid.uuid4())})
                response.raise_for_status()
            if batches:
                await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})

asyncio.run(main())
"""

FASTSTREAM = """
import asyncio, sys, uuid, httpx
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker

SCOPES = {"ResourceCreated": "created", "ResourceUpdated": "updated", "ResourceDeleted": "deleted"}
bootstrap, topic, group, url, key = sys.argv[1:6]
broker = KafkaBroker(bootstrap)
app = FastStream(broker)
seen = {}
client = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)

@broker.subscriber(topic, group_id=group, batch=True, max_records=100, auto_offset_reset="earliest",
                   ack_policy=AckPolicy.ACK)
async def handle(changes: list[dict]) -> None:
    pending = {}
    for change in changes:
        resource = change["resource"]
        message_key = f"{resource['typeId']}:{resource['id']}:{change['version']}"
        if message_key in seen:
            continue
        seen[message_key] = True
        entity = (resource["typeId"], resource["id"])
        current = pending.get(entity)
        if current is None or current[0] <= change["version"]:
            scope = f"{resource['typeId']}/{SCOPES[change['notificationType']]}"
            pending[entity] = (change["version"], scope)
    if pending:
        items = [{"scope": s, "external_id": e[1]} for e, (_, s) in pending.items()]
        response = await client.post(
            url, json={"notifications": items}, headers={"x-correlation-id": str(uuid.uuid4())}
        )
        response.raise_for_status()

asyncio.run(app.run())
"""


def updates(count: int, tag: str) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme",
                "resource": {"typeId": "product", "id": f"{tag}-{i}"},
                "version": 2,
                "oldVersion": 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        )
        for i in range(count)
    ]


# ----------------------------------------------------------------------------- counting fetch requests


class FetchCounter:
    """A TCP proxy in front of the broker that counts Fetch requests; tansu advertises it to clients."""

    def __init__(self) -> None:
        self.upstream = ""  # set once the broker runs: it must be told the proxy's address first
        self.port = free_port()
        self.fetches = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.upstream.split(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def requests() -> None:
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">i", header)[0])
                if struct.unpack(">h", body[:2])[0] == FETCH:
                    self.fetches += 1
                up_writer.write(header + body)
                await up_writer.drain()

        async def responses() -> None:
            while data := await up_reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(requests()), asyncio.ensure_future(responses())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except Exception:
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            up_writer.close()


# -------------------------------------------------------------------------------------------- running


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ``ctsync@<short sha>`` -> the checked-out tree it runs from (PYTHONPATH comes before the venv's editable
# install of this repository, so ``python -m consumer.cli`` imports that tree's code).
TREES: dict[str, Path] = {}


@contextlib.contextmanager
def baseline(commit: str | None, tmp: Path) -> Iterator[list[str]]:
    """Check ``commit`` out in a detached worktree under ``tmp`` and yield ``[ctsync@<short sha>]`` (no
    commit: ``[]``); check that its ctsync imports its own code; remove the worktree on the way out."""
    if commit is None:
        yield []
        return
    git = ["git", "-C", str(ROOT)]
    short = subprocess.run([*git, "rev-parse", "--short", commit], check=True, capture_output=True, text=True)
    name, tree = f"ctsync@{short.stdout.strip()}", tmp / f"tree-{short.stdout.strip()}"
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), commit], check=True, capture_output=True)
    TREES[name] = tree
    try:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        probe = "import consumer.cli, adapters; print(consumer.cli.__file__); print(adapters.__file__)"
        found = subprocess.run(
            [sys.executable, "-c", probe], env=env, cwd=tmp, check=True, capture_output=True, text=True
        ).stdout.split()
        if not all(Path(path).is_relative_to(tree) for path in found):
            raise RuntimeError(f"{name} imports {found}, not the tree at {tree}")
        help_argv = [sys.executable, "-m", "consumer.cli", "--help"]
        subprocess.run(help_argv, env=env, cwd=tmp, check=True, capture_output=True)
        print(f"{name}: {found[0]}", file=sys.stderr)
        yield [name]
    finally:
        del TREES[name]
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)


class Mark(NamedTuple):
    """The watched process's CPU-s and the notifications accepted so far, at ``time.monotonic()`` ``at``."""

    at: float
    cpu: float
    accepted: int


class Hook(HookServer):
    """The hook server, with a count of accepted notifications that copies nothing, and marks taken as the
    hook answers: ``first`` when the watched process's first notifications are accepted, ``last`` when
    ``target`` notifications are (its CPU read from /proc right then, in the hook's handler thread)."""

    def __init__(self) -> None:
        super().__init__()
        self._pid: int | None = None
        self._target = 0
        self.first: Mark | None = None
        self.last: Mark | None = None

    def watch(self, pid: int | None, target: int = 0) -> None:
        """Take marks for process ``pid`` afresh, ``last`` once ``target`` are accepted; None: take no more
        (the marks taken stay)."""
        with self._lock:
            self._pid, self._target = pid, target
            if pid is not None:
                self.first = self.last = None

    @property
    def accepted(self) -> int:
        """The notifications accepted so far (``len(self.notifications)`` copies them all)."""
        with self._lock:
            return len(self._accepted)

    def mark(self) -> Mark:
        """A mark taken now (the watched process must be set)."""
        with self._lock:
            assert self._pid is not None
            return Mark(time.monotonic(), cpu_seconds(self._pid), len(self._accepted))

    def _notify(self) -> None:
        # Called with the lock held, after every answered request was recorded (and on reset).
        super()._notify()
        if self._pid is None or not self._accepted:
            return
        if self.first is None:
            self.first = self.mark()
        if self.last is None and self._target and len(self._accepted) >= self._target:
            self.last = self.mark()


def command(
    contender: str, bootstrap: str, topic: str, group: str, hook: HookServer, tmp: Path
) -> tuple[list[str], dict[str, str]]:
    """Return (argv, env) for one run of a contender; ``ctsync@<sha>`` runs the tree in ``TREES``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CTSYNC_", "IPAAS_", "KAFKA_", "CTP_"))}
    args = [bootstrap, topic, group, hook.url, hook.api_key]
    if contender == "hand":
        return [sys.executable, "-c", HAND, *args], base
    if contender == "faststream":
        return [sys.executable, "-c", FASTSTREAM, *args], base
    env = {
        **base,
        **hook.env(),
        "PYTHONPATH": str(TREES.get(contender, ROOT)),
        "CTSYNC_SOURCE": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": group,
        "CTSYNC_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        "CTSYNC_DEAD_LETTER_URL": f"file:{tmp}/dead-{group}.jsonl",
        "IPAAS_THROTTLE_LIMIT": "1000000",
        "IPAAS_THROTTLE_SECONDS": "1",
    }
    if contender in ("ctsync", "ctsync-quiet") or contender in TREES:
        env["CTSYNC_STATE_URL"] = f"sqlite:///{tmp}/state-{group}.db"
        if contender == "ctsync-quiet":
            env.update(CTSYNC_LOG_LEVEL="WARNING", CTSYNC_AUDIT="off")
    else:
        env.update(CTSYNC_STATE_URL="memory://", IPAAS_BATCH_SIZE="1000")
    return [sys.executable, "-m", "consumer.cli", "run"], env


def start(argv: list[str], env: dict[str, str], tmp: Path, name: str) -> subprocess.Popen[bytes]:
    """Start one contender process in ``tmp``; its stderr goes to ``tmp/<name>.err`` (``stderr_tail``)."""
    with open(os.devnull, "wb") as devnull, (tmp / f"{name}.err").open("wb") as errors:
        return subprocess.Popen(argv, env=env, stdout=devnull, stderr=errors, cwd=tmp)


def stderr_tail(tmp: Path, name: str) -> str:
    return (tmp / f"{name}.err").read_text()[-2000:]


def run_once(
    contender: str, counter: FetchCounter, topic: str, count: int, hook: Hook, tmp: Path
) -> tuple[float, float, float, float]:
    """Run one contender to the end; return (payloads/s, steady CPU-s per 100k, whole-process CPU-s per
    100k, fetch requests per 100k)."""
    hook.reset()
    fetches_before = counter.fetches
    argv, env = command(contender, counter.address, topic, f"{contender}-{uuid.uuid4().hex[:6]}", hook, tmp)
    proc = start(argv, env, tmp, contender)
    hook.watch(proc.pid, count)
    try:
        deadline = time.monotonic() + 900
        while hook.last is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{contender} exited {proc.returncode}: {stderr_tail(tmp, contender)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{contender}: {hook.accepted} of {count} notifications")
            time.sleep(0.02)
        cpu = cpu_seconds(proc.pid)
    finally:
        hook.watch(None)
        stop_process(proc)
    first, last = hook.first, hook.last
    assert first is not None and last is not None
    arrivals = hook.arrivals
    rate = count / max(arrivals[-1] - arrivals[0], 1e-9)
    # From the first accepted request's answer to the last's: the notifications of every request but the
    # first, and the CPU spent between them (start-up, imports and connecting excluded).
    steady = (last.cpu - first.cpu) * 100_000 / max(last.accepted - first.accepted, 1)
    return rate, steady, cpu * 100_000 / count, (counter.fetches - fetches_before) * 100_000 / count


def idle_share(
    contender: str, counter: FetchCounter, topic: str, hook: Hook, tmp: Path, seconds: float
) -> float:
    """Run ctsync at its defaults under a full throttle; return its CPU share of one core while it waits."""
    hook.reset()
    argv, env = command(contender, counter.address, topic, f"idle-{uuid.uuid4().hex[:6]}", hook, tmp)
    env.update(IPAAS_THROTTLE_LIMIT="1", IPAAS_THROTTLE_SECONDS="3600")
    proc = start(argv, env, tmp, "idle")
    try:
        deadline = time.monotonic() + 120
        while not hook.accepted:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ctsync sent nothing: {stderr_tail(tmp, 'idle')}")
            time.sleep(0.05)
        # The first request left with the first batch; the intake then fills up to the bound and stops.
        time.sleep(5)
        cpu, started = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        return (cpu_seconds(proc.pid) - cpu) / (time.monotonic() - started)
    finally:
        stop_process(proc)


def budget_once(
    contender: str, counter: FetchCounter, topic: str, count: int, hook: Hook, tmp: Path, seconds: float
) -> tuple[float, float, float]:
    """Run a ctsync contender at its defaults, the default throttle included, on a backlog it cannot finish;
    from its first accepted request for ``seconds``, return (µs of CPU per notification accepted in that
    span, notifications/s, its CPU share of one core)."""
    hook.reset()
    argv, env = command(contender, counter.address, topic, f"budget-{uuid.uuid4().hex[:6]}", hook, tmp)
    env.pop("IPAAS_THROTTLE_LIMIT")
    env.pop("IPAAS_THROTTLE_SECONDS")
    proc = start(argv, env, tmp, "budget")
    hook.watch(proc.pid)
    try:
        deadline = time.monotonic() + 120
        while (first := hook.first) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{contender} sent nothing: {stderr_tail(tmp, 'budget')}")
            time.sleep(0.02)
        time.sleep(max(0.0, first.at + seconds - time.monotonic()))
        if proc.poll() is not None:
            raise RuntimeError(f"{contender} exited: {stderr_tail(tmp, 'budget')}")
        last = hook.mark()
    finally:
        hook.watch(None)
        stop_process(proc)
    if last.accepted >= count:
        raise RuntimeError(f"{contender} ran dry: {last.accepted:,} of {count:,} payloads notified")
    sent = last.accepted - first.accepted
    span = last.at - first.at
    cpu = last.cpu - first.cpu
    print(
        f"  {contender}: {sent:,} notifications in {span:.1f} s, {cpu:.2f} CPU-s",
        f"({last.accepted:,} accepted in all)",
        file=sys.stderr,
    )
    return cpu * 1e6 / max(sent, 1), sent / span, cpu / span


async def bench_async(args: argparse.Namespace) -> None:
    """Start the broker and the hook, fill a topic, check the baseline out, and run the chosen mode."""
    if args.budget:
        count = args.payloads or 150_000
    elif args.idle:
        count = args.payloads or 20_000
    else:
        count = args.payloads or 50_000
    rounds: int = args.rounds
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        counter = FetchCounter()
        tansu, counter.upstream = start_tansu(tmp / "tansu.log", advertised=counter.address)
        counter.start()
        try:
            kafka = Kafka(counter.upstream)
            topic = await kafka.create_topic(partitions=3)
            await kafka.produce(topic, updates(count, topic), key=None)
            hook = Hook()
            with baseline(args.baseline_commit, tmp) as baselines, hook:
                if args.budget or args.idle:
                    contenders = ["ctsync", *baselines]
                else:
                    contenders = [*args.contenders.split(","), *baselines]
                results: dict[str, list[tuple[float, ...]]] = {c: [] for c in contenders}
                for n in range(rounds):
                    for contender in contenders:
                        if args.budget:
                            result: tuple[float, ...] = await asyncio.to_thread(
                                budget_once, contender, counter, topic, count, hook, tmp, args.budget
                            )
                        elif args.idle:
                            share = await asyncio.to_thread(
                                idle_share, contender, counter, topic, hook, tmp, args.idle
                            )
                            result = (share,)
                        else:
                            result = await asyncio.to_thread(
                                run_once, contender, counter, topic, count, hook, tmp
                            )
                        results[contender].append(result)
                    print(f"round {n + 1}/{rounds} done", file=sys.stderr)
        finally:
            stop_process(tansu)
    medians = {
        c: [statistics.median(r[i] for r in results[c]) for i in range(len(results[c][0]))]
        for c in contenders
    }
    if args.budget:
        print("ctsync at its defaults (SQLite state, INFO audit, batch 100, 500 requests/60 s, 5 at once)")
        print(f"{count:,}-payload backlog, {args.budget:.0f} s from the first accepted request", end="; ")
        print(f"medians of {rounds} rounds")
        print(f"{'contender':22} {'µs CPU/notif':>13} {'notifs/s':>9} {'CPU share':>10}", end="  ")
        print("µs CPU/notif by round")
        for contender, (micros, rate, share) in medians.items():
            by_round = ", ".join(f"{r[0]:.1f}" for r in results[contender])
            print(f"{contender:22} {micros:13.1f} {rate:9,.0f} {share * 100:9.2f}%  {by_round}")
    elif args.idle:
        print("ctsync at its defaults under a full throttle, 10,000 envelopes waiting", end=", ")
        print(f"{args.idle:.0f} s each:")
        for contender, (share,) in medians.items():
            by_round = ", ".join(f"{r[0] * 100:.2f} %" for r in results[contender])
            print(f"  {contender:22} idle CPU {share * 100:.2f} % of a core (median of {rounds}: {by_round})")
    else:
        print(f"{count:,} one-update payloads, 3 partitions, unthrottled hook; medians of {rounds} rounds")
        print("CPU-s/100k: from the first accepted request to the last; whole-process: start-up included")
        print(f"{'contender':22} {'payloads/s':>11} {'CPU-s/100k':>11}", end=" ")
        print(f"{'whole-process':>14} {'fetches/100k':>13}")
        for contender, (rate, steady, whole, fetches) in medians.items():
            print(f"{contender:22} {rate:11,.0f} {steady:11.2f} {whole:14.2f} {fetches:13,.0f}")
        for contender in contenders:
            if contender.startswith("ctsync"):
                for peer in ("faststream", "hand"):
                    if peer in medians:
                        ratio = medians[contender][0] / medians[peer][0]
                        print(f"  {contender} / {peer}: {ratio:.2f}x payloads/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payloads", type=int, help="50,000; --budget 150,000; --idle 20,000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contenders", default="hand,faststream,ctsync,ctsync-memory-1000")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--idle", type=float, metavar="SECONDS", help="idle CPU, full throttle")
    mode.add_argument(
        "--budget", type=float, metavar="SECONDS", help="CPU per notification, default throttle (120 s)"
    )
    parser.add_argument("--baseline-commit", metavar="SHA", help="also run this commit's ctsync")
    asyncio.run(bench_async(parser.parse_args()))


if __name__ == "__main__":
    main()
