"""A hostile or broken iPaaS.com hook (issue 13, items 6 to 10): ``ctsync`` runs as users run it, a
subprocess, against the local hook server injecting each fault. Every test also checks that nothing is lost:
what the hook accepted is acked, what it did not is handed back, never dead-lettered for the hook's fault."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from adapters.ipaas import BODY_READ_LIMIT, HttpHookSink, probe_hook
from consumer.routing import Notification
from tests.servers.hookserver import Fault, HookServer

pytestmark = pytest.mark.integration

CTSYNC = [sys.executable, "-m", "consumer.cli"]
CLIENT_SECRET = "ct-secret-Hq2vX9mK7pL4"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    workdir: Path

    @property
    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    @property
    def dead_letters(self) -> str:
        path = self.workdir / "dead.jsonl"
        return path.read_text() if path.exists() else ""


def environment(tmp_path: Path, **env: str) -> dict[str, str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUSH_", "PUBSUB_"))
    }
    environ.update(
        CTSYNC_STATE_URL=f"sqlite:///{tmp_path}/state.db",
        CTSYNC_DEAD_LETTER_URL=f"file:{tmp_path}/dead.jsonl",
        CTP_CLIENT_SECRET=CLIENT_SECRET,
        **env,
    )
    return environ


@pytest.fixture
def ctsync(tmp_path: Path) -> Callable[..., Result]:
    def run(*args: str, env: dict[str, str], timeout: float = 60) -> Result:
        done = subprocess.run(
            [*CTSYNC, *args],
            env=environment(tmp_path, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
        )
        return Result(done.returncode, done.stdout, done.stderr, tmp_path)

    return run


def updates(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "updates.jsonl"
    lines = [
        orjson.dumps(
            {
                "notificationType": "ResourceUpdated",
                "projectKey": "acme",
                "resource": {"typeId": "product", "id": f"p-{i}"},
                "version": 2,
                "oldVersion": 1,
                "modifiedAt": "2026-01-01T00:00:00.000Z",
            }
        )
        for i in range(count)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    ops: str

    def readyz(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.ops}/readyz", timeout=2)
        except httpx.TransportError:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            return None

    def peak_rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        return int(line.split()[1]) * 1024

    def stop(self) -> tuple[int, bytes, bytes]:
        self.proc.send_signal(signal.SIGTERM)
        stdout, stderr = self.proc.communicate(timeout=30)
        return self.proc.returncode, stdout, stderr


@pytest.fixture
def run_following(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """``ctsync run --follow`` on a file source, with its operations endpoints on a free port."""
    started: list[Running] = []

    def start(path: Path, **env: str) -> Running:
        port = free_port()
        environ = environment(
            tmp_path,
            CTSYNC_SOURCE=f"file:{path}",
            CTSYNC_HTTP_LISTEN=f"127.0.0.1:{port}",
            # A batch waiting for a usable hook is handed back after this, not after the default 30 s.
            CTSYNC_DRAIN_TIMEOUT_SECONDS="2",
            **env,
        )
        proc = subprocess.Popen(
            [*CTSYNC, "run", "--follow"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
        )
        running = Running(proc, f"http://127.0.0.1:{port}")
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.communicate()


# ---------------------------------------------------------------------------------------- item 6


def test_zero_negative_or_tiny_retry_after_backs_off_and_loses_nothing(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server: HookServer
) -> None:
    """Retry-After -1, 0 and 0.01 answered to a 429: each retry waits at least the backoff's first step
    (IPAAS retry base 1 s: a jittered first step is at least 0.5 s, a tiny Retry-After is raised to 1 s)."""
    hook_server.faults.push(
        Fault.status(429, retry_after="-1"),
        Fault.status(429, retry_after="0"),
        Fault.status(429, retry_after="0.01"),
    )
    result = ctsync("replay", str(updates(tmp_path, 5)), env=hook_server.env())
    assert result.code == 0, result.stderr
    arrivals = hook_server.arrivals
    assert hook_server.statuses == [429, 429, 429, 200]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0 and gaps[2] >= 1.0, gaps
    assert sorted(e for _, e in hook_server.notifications) == sorted(f"p-{i}" for i in range(5))
    assert len(result.named("message.acked")) == 5 and result.dead_letters == ""


# ---------------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_replay_stops_on_a_redirect_without_following_it(
    ctsync: Callable[..., Result],
    tmp_path: Path,
    hook_server_factory: Callable[..., HookServer],
    status: int,
) -> None:
    hooks, elsewhere = hook_server_factory(), hook_server_factory()
    hooks.faults.always = Fault.redirect(status, f"{elsewhere.url}/moved?token=abc")
    result = ctsync("replay", str(updates(tmp_path, 4)), env=hooks.env())
    assert result.code == 1, result.stderr
    assert hooks.request_count == 1 and elsewhere.request_count == 0
    assert f"redirects to {elsewhere.url}/moved" in result.stderr and "token=abc" not in result.stderr
    # Nothing acked, nothing dead-lettered: all four are handed back for a later run.
    assert result.named("message.acked") == [] and result.dead_letters == ""
    assert len(result.named("message.handed_back")) == 4
    assert hooks.api_key not in result.stdout + result.stderr


def test_run_stops_intake_on_a_redirect_and_readyz_says_where(
    run_following: Callable[..., Running], tmp_path: Path, hook_server_factory: Callable[..., HookServer]
) -> None:
    hooks, elsewhere = hook_server_factory(), hook_server_factory()
    hooks.faults.always = Fault.redirect(308, f"{elsewhere.url}/new")
    running = run_following(updates(tmp_path, 3), **hooks.env())

    def not_ready() -> httpx.Response | None:
        answer = running.readyz()
        # Before the state store first answered, /readyz is 503 for that alone; wait for the redirect.
        return (
            answer
            if answer is not None and answer.status_code == 503 and "redirects" in answer.text
            else None
        )

    answer = poll(not_ready, 20, "/readyz to report the redirect")
    [problem] = answer.json()["problems"]
    assert f"{hooks.url} redirects to {elsewhere.url}/new" in problem and "308" in problem
    assert hooks.api_key not in answer.text
    code, stdout, stderr = running.stop()
    assert code == 0, stderr
    assert elsewhere.request_count == 0 and hooks.request_count == 1
    events = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
    assert not [e for e in events if e["event"] == "message.acked"]
    assert len([e for e in events if e["event"] == "message.handed_back"]) == 3


def test_check_reports_a_redirecting_hook(
    ctsync: Callable[..., Result], hook_server_factory: Callable[..., HookServer]
) -> None:
    hooks, elsewhere = hook_server_factory(), hook_server_factory()
    hooks.faults.always = Fault.redirect(302, elsewhere.url)
    result = ctsync("check", "--json", env={**hooks.env(), "CTSYNC_SOURCE": "file:missing.jsonl"})
    [hook] = [c for c in orjson.loads(result.stdout)["checks"] if c["name"] == "hook"]
    assert hook["status"] == "FAIL" and f"redirects to {elsewhere.url}" in hook["detail"]
    assert "IPAAS_HOOK_URL" in hook["fix"]
    assert elsewhere.request_count == 0 and hooks.api_key not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------- item 8


def test_201_is_success_and_sent_once(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server_factory: Callable[..., HookServer]
) -> None:
    hooks = hook_server_factory(status=201)
    result = ctsync("replay", str(updates(tmp_path, 6)), env=hooks.env())
    assert result.code == 0, result.stderr
    assert hooks.statuses == [201] and len(hooks.notifications) == 6
    assert len(result.named("message.acked")) == 6 and result.named("batch.retrying") == []


# ---------------------------------------------------------------------------------------- item 9

HUGE = 400 * 1024 * 1024


def test_a_huge_2xx_body_is_not_read(
    run_following: Callable[..., Running], tmp_path: Path, hook_server: HookServer
) -> None:
    """A 400 MB answer: ctsync reads 64 KiB, takes the status, and its peak RSS stays far below the body."""
    hook_server.faults.push(Fault.huge_body(200, HUGE), Fault.huge_body(503, HUGE))
    path = updates(tmp_path, 2)
    running = run_following(
        path, **hook_server.env(), IPAAS_BATCH_SIZE="1", IPAAS_CONCURRENT_BATCH_EXECUTIONS="1"
    )
    poll(lambda: len(hook_server.notifications) >= 2, 30, "both notifications")
    peak = running.peak_rss_bytes()
    code, stdout, stderr = running.stop()
    assert code == 0, stderr
    assert peak < 250 * 1024 * 1024, peak
    # What the kernel's socket buffers took, plus the 64 KiB read: a few MB at most, out of 800 MB.
    assert hook_server.huge_body_bytes_sent < 32 * 1024 * 1024, hook_server.huge_body_bytes_sent
    events = [orjson.loads(line) for line in stdout.splitlines() if line.startswith(b"{")]
    assert len([e for e in events if e["event"] == "message.acked"]) == 2


async def test_the_sink_and_probe_read_at_most_the_cap(hook_server: HookServer) -> None:
    hook_server.faults.push(
        Fault.huge_body(200, HUGE), Fault.huge_body(500, HUGE), Fault.huge_body(202, HUGE)
    )
    sink = HttpHookSink(hook_server.url, hook_server.api_key, timeout=10)
    try:
        accepted = await sink.send([Notification("product/updated", "p-1")], "c-1")
        failed = await sink.send([Notification("product/updated", "p-2")], "c-2")
    finally:
        await sink.close()
    probed = await probe_hook(hook_server.url, hook_server.api_key, seconds=10)
    assert (accepted.status, failed.status, probed.status) == (200, 500, 202)
    assert len(failed.detail) <= 300 and len(probed.detail) <= 160
    assert hook_server.huge_body_bytes_sent < 3 * (BODY_READ_LIMIT + 16 * 1024 * 1024)


# --------------------------------------------------------------------------------------- item 10


def test_a_hook_echoing_the_key_leaks_it_nowhere(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server: HookServer
) -> None:
    """400 quoting the Authorization header: the notification is dead-lettered with a reason that names
    the answer, never the key; the log says the same."""
    hook_server.faults.push(Fault.echo_key(400))
    result = ctsync("replay", str(updates(tmp_path, 1)), env=hook_server.env())
    assert result.code == 0, result.stderr
    letters = result.dead_letters
    assert "refused credentials" in letters and "[redacted]" in letters
    for text in (letters, result.stdout, result.stderr):
        assert hook_server.api_key not in text and CLIENT_SECRET not in text


def test_readyz_never_shows_an_echoed_key(
    run_following: Callable[..., Running], tmp_path: Path, hook_server: HookServer
) -> None:
    hook_server.faults.always = Fault.echo_key(401)
    running = run_following(updates(tmp_path, 1), **hook_server.env())

    def not_ready() -> httpx.Response | None:
        answer = running.readyz()
        return answer if answer is not None and answer.status_code == 503 else None

    answer = poll(not_ready, 20, "/readyz to report the refused key")
    assert "refused credentials" in answer.text and hook_server.api_key not in answer.text
    code, stdout, stderr = running.stop()
    assert code == 0 and hook_server.api_key.encode() not in stdout + stderr


@pytest.mark.parametrize("key", ["k", "short-key", "fifteen-chars-k"])
def test_a_webhook_key_shorter_than_16_characters_is_refused(
    ctsync: Callable[..., Result], tmp_path: Path, hook_server: HookServer, key: str
) -> None:
    result = ctsync(
        "replay", str(updates(tmp_path, 1)), env={**hook_server.env(), "IPAAS_WEBHOOK_API_KEY": key}
    )
    assert result.code == 2
    assert "IPAAS_WEBHOOK_API_KEY: is shorter than 16 characters" in result.stderr
    if len(key) > 1:
        assert key not in result.stderr
    assert hook_server.request_count == 0
