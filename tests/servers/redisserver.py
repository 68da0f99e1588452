"""Real Redis for the tests: the machine's shared server, and private servers a test can stop and restart.

- ``redis_url``: the shared Redis on 127.0.0.1:6379 (started by the machine); where it is missing, one
  private ``redis-server`` for the session. Skips (a failure under CTSYNC_REQUIRE_SERVERS) when neither.
- ``redis_prefix``: a unique key prefix for one test; its keys are deleted afterwards.
- ``redis_servers``: a factory of private ``redis-server`` processes on free ports, no persistence, which
  a test can stop, restart on the same port, freeze (SIGSTOP) and thaw; all are killed after the test.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

SHARED_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisServer:
    """A private ``redis-server`` on a fixed free port; ``stop``/``start`` keep the port."""

    def __init__(self, binary: str, log_dir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers PING."""
        assert self.proc is None, "already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while not _answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (as a crash would) and wait for it to be gone."""
        self.kill()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def freeze(self) -> None:
        """Stop the process without closing its sockets: a hung Redis that never answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server")
    return binary


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the URL of a Redis for the session: the shared one, else a private one."""
    if _answers(SHARED_URL):
        yield SHARED_URL
        return
    server = RedisServer(_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """Yield a key prefix no other test uses, as a hash tag like the service's; delete its keys after."""
    prefix = f"ctsync-test:{{{uuid.uuid4().hex[:12]}}}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Yield a factory that starts a private Redis server; every server is killed after the test."""
    binary = _binary()
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(binary, tmp_path)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        if server.proc is not None:
            server.thaw()
        server.kill()
