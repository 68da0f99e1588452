"""An interrupted backfill says so: the first Ctrl-C says it drains and for how long, a second stops at once,
and a sweep that did not finish exits 1 and says where it resumes."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_backfill_integration import (
    CTSYNC,
    MockApi,
    Project,
    accepted,
    environment,
    hook_env,
)
from tests.servers.ctmockserver import CtMock, SortingFront
from tests.servers.hookserver import HookServer

pytestmark = pytest.mark.integration

CATEGORIES = 300


@pytest.fixture(scope="module")
def categories(ctmock: CtMock, ctmock_sorted: SortingFront) -> Project:
    project = Project("safe-" + secrets.token_hex(4), ctmock_sorted.url)

    async def create() -> None:
        async with MockApi(ctmock.url, project.key) as api:
            project.resources = await api.create({"category": CATEGORIES})

    asyncio.run(create())
    return project


def test_an_interrupted_backfill_exits_1_and_says_where_it_resumes(
    categories: Project, hook_server: HookServer, tmp_path: Path
) -> None:
    # Slow on purpose: 2 requests of 10 a second, so the sweep is far from done when it is interrupted.
    env = environment(tmp_path, categories.env(), hook_env(hook_server, limit=2, seconds=1.0, batch=10))
    env["CTSYNC_DRAIN_TIMEOUT_SECONDS"] = "20"
    log = tmp_path / "backfill.log"
    with log.open("wb") as out:
        sweep = subprocess.Popen(
            [*CTSYNC, "backfill", "--type", "category", "--budget-share", "1"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.PIPE,
        )
    assert sweep.stderr is not None
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.extend(sweep.stderr or ()), daemon=True)
    reader.start()

    def said(text: bytes) -> bool:
        return any(text in line for line in list(stderr))

    try:
        deadline = time.monotonic() + 60
        while not (
            sum(accepted(hook_server).values()) >= 30 and b'"backfill.cursor_saved"' in log.read_bytes()
        ):
            assert sweep.poll() is None, "the backfill ended before it could be interrupted"
            assert time.monotonic() < deadline, "no cursor was saved in time"
            time.sleep(0.05)
        sweep.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while not said(b"stopping; waiting up to 20s"):
            assert time.monotonic() < deadline, b"".join(stderr).decode()
            time.sleep(0.05)
        assert said(b"again (Ctrl-C) to stop at once")
        sweep.send_signal(signal.SIGINT)
        assert sweep.wait(15) == 1, b"".join(stderr).decode()
    finally:
        sweep.kill()
        reader.join(10)
    text = b"".join(stderr).decode()
    assert "SIGINT again: stopping at once" in text
    assert "interrupted before it finished (exit 1)" in text
    assert "category resumes after id " in text
    assert sum(accepted(hook_server).values()) < CATEGORIES
