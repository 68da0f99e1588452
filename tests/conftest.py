"""Shared test set-up: the local iPaaS.com hook server fixtures, and no silent skips in CI."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

pytest_plugins = [
    "tests.servers.hookserver",
    "tests.servers.kafkaserver",
    "tests.servers.apachekafka",
    "tests.servers.ctmockserver",
    "tests.servers.pstestserver",
    "tests.servers.redisserver",
]

# .ci/run sets this: a test that would skip because a real server is missing must fail instead.
REQUIRE_SERVERS = os.environ.get("CTSYNC_REQUIRE_SERVERS", "") not in ("", "0", "false")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, object]:
    report = yield
    if REQUIRE_SERVERS and isinstance(report, pytest.TestReport) and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped, but CTSYNC_REQUIRE_SERVERS is set: {report.longrepr}"
    return report
