"""Readiness is honest from the start: with the state store down, /readyz says so before any message."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import CTSYNC, free_port
from tests.servers.redisserver import RedisServer

pytestmark = pytest.mark.integration

PREFIXES = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUBSUB_", "PUSH_")


def readyz(base: str, deadline: float) -> httpx.Response:
    """Return the first answer of /readyz once the endpoint listens."""
    while True:
        try:
            return httpx.get(f"{base}/readyz", timeout=2)
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the endpoints never listened"
            time.sleep(0.05)


def test_readyz_is_not_ready_from_the_start_while_redis_is_down(
    tmp_path: Path, hook_server: HookServer, redis_servers: Callable[[], RedisServer]
) -> None:
    redis = redis_servers()
    redis.stop()  # down before ctsync starts, on a port it will come back on
    source = tmp_path / "changes.jsonl"
    source.write_bytes(b"")  # nothing arrives: readiness must not wait for a first message
    listen = f"127.0.0.1:{free_port()}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    environ.update(
        hook_server.env(),
        CTSYNC_SOURCE=f"file:{source}",
        CTSYNC_STATE_URL=redis.url,
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        CTSYNC_HTTP_LISTEN=listen,
    )
    log = tmp_path / "ctsync.log"
    with log.open("wb") as out:
        service = subprocess.Popen(
            [*CTSYNC, "run", "--follow"], env=environ, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        first = readyz(f"http://{listen}", time.monotonic() + 30)
        assert first.status_code == 503, first.text
        assert any(p.startswith("state store") for p in first.json()["problems"]), first.text
        # Redis comes back only once the probe found it down (not merely "not checked yet"): on a loaded
        # machine the probe's first look could otherwise come after the restart, and find nothing to recover.
        deadline = time.monotonic() + 30
        while not any(
            p.startswith("state store") and "not checked yet" not in p
            for p in httpx.get(f"http://{listen}/readyz", timeout=2).json()["problems"]
        ):
            assert service.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        redis.start()
        deadline = time.monotonic() + 40
        while (answer := httpx.get(f"http://{listen}/readyz", timeout=2)).status_code != 200:
            assert service.poll() is None and time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        service.terminate()
        assert service.wait(30) == 0
    finally:
        service.kill()
    events = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]
    assert any(e["event"] == "state.recovered" for e in events)
