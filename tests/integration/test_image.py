"""The container image, built from deploy/Dockerfile exactly as ``make image`` builds it (tools/build-image),
then run as UID 10001 inside it: ``ctsync --version``, ``ctsync check`` against the local stand-ins, the
image's own HEALTHCHECK command, and ``ctsync run`` consuming from the test broker (tansu).

Without a Docker engine the image is built and run with buildah (chroot isolation), whose containers share
the host's network, so the stand-ins on 127.0.0.1 are reachable from inside."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import REPO_ROOT
from tests.integration.test_check import ALL_NEEDED
from tests.integration.test_kafka import updates
from tests.servers.ctmockserver import CtProxy, project_key
from tests.servers.hookserver import HookServer
from tests.servers.kafkaserver import Kafka, free_port

pytestmark = pytest.mark.integration

ROOT = REPO_ROOT
TAG = "localhost/ctsync:pytest"
UID = "10001"


def docker_engine() -> bool:
    docker = shutil.which("docker")
    return docker is not None and subprocess.run([docker, "info"], capture_output=True).returncode == 0


class Image:
    """Commands run inside the image as UID 10001, in one container (buildah) or one per command (docker)."""

    def __init__(self, tag: str, docker: bool) -> None:
        self.tag = tag
        self.docker = docker
        self.container = ""
        if not docker:
            self.container = subprocess.run(
                ["buildah", "from", "--pull-never", tag], capture_output=True, text=True, check=True
            ).stdout.strip()

    def command(self, args: list[str], env: dict[str, str]) -> list[str]:
        settings = [item for name, value in env.items() for item in ("--env", f"{name}={value}")]
        if self.docker:
            return ["docker", "run", "--rm", "--network", "host", "--user", UID, *settings, "--entrypoint",
                    args[0], self.tag, *args[1:]]  # fmt: skip
        return ["buildah", "run", "--isolation", "chroot", "--network", "host", "--user", f"{UID}:{UID}",
                *settings, self.container, "--", *args]  # fmt: skip

    def run(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args, env or {}), capture_output=True, text=True, timeout=120)

    def start(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(self.command(args, env), stdout=out, stderr=subprocess.STDOUT)

    def config(self) -> dict[str, object]:
        if self.docker:
            raw = subprocess.run(["docker", "image", "inspect", self.tag], capture_output=True, check=True)
            found: dict[str, object] = json.loads(raw.stdout)[0]["Config"]
            return found
        raw = subprocess.run(
            ["buildah", "inspect", "--type", "image", self.tag], capture_output=True, check=True
        )
        config: dict[str, object] = json.loads(raw.stdout)["Docker"]["config"]
        return config

    def remove(self) -> None:
        if self.container:
            subprocess.run(["buildah", "rm", self.container], capture_output=True)


def innermost(pid: int) -> int:
    """The process at the bottom of the chain ``pid`` started (buildah run -> chroot runtime -> exec -> the
    command itself), read from /proc; ``pid`` itself when it has no child."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    while children.get(pid):
        pid = children[pid][0]
    return pid


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    docker = docker_engine()
    if not docker and not (shutil.which("buildah") and shutil.which("debootstrap")):
        pytest.skip("no Docker engine, and no buildah + debootstrap: run `make servers`")
    started = time.monotonic()
    built = subprocess.run(
        [str(ROOT / "tools" / "build-image"), TAG], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    print(f"image built in {time.monotonic() - started:.0f} s")
    found = Image(TAG, docker)
    yield found
    found.remove()


def test_the_image_runs_ctsync_as_uid_10001(image: Image) -> None:
    assert image.run(["id", "-u"]).stdout.strip() == UID
    version = image.run(["ctsync", "--version"])
    assert version.returncode == 0 and "0.1.0" in version.stdout, version.stderr
    config = image.config()
    assert (
        config["User"] == f"{UID}:{UID}" and config["Entrypoint"] == ["ctsync"] and config["Cmd"] == ["run"]
    )
    # The wheels were built apart: nothing to compile with in the image.
    assert image.run(["sh", "-c", "command -v gcc cc || true"]).stdout.strip() == ""


async def test_check_passes_inside_the_image(
    image: Image, ct_proxy: CtProxy, hook_server: HookServer, kafka: Kafka
) -> None:
    topic = await kafka.create_topic(partitions=1)
    project = project_key()
    client_id, secret = ct_proxy.add_client([f"{s}:{project}" for s in ALL_NEEDED])
    env = {
        **ct_proxy.env(project, client_id, secret),
        **hook_server.env(),
        "CTSYNC_SOURCE": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "KAFKA_TOPICS": topic,
    }
    checked = image.run(["ctsync", "check"], env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.splitlines()[-1] == "all checks passed"
    assert secret not in checked.stdout + checked.stderr


async def test_run_consumes_from_the_broker_and_the_healthcheck_passes(
    image: Image, hook_server: HookServer, kafka: Kafka, tmp_path: Path
) -> None:
    topic = await kafka.create_topic(partitions=2)
    group = f"g-{uuid.uuid4().hex[:8]}"
    ends = await kafka.produce(topic, updates(40, 20))
    listen = f"127.0.0.1:{free_port()}"
    env = {
        **hook_server.env(),
        "CTSYNC_SOURCE": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "KAFKA_TOPICS": topic,
        "KAFKA_GROUP_ID": group,
        "CTSYNC_HTTP_LISTEN": listen,
        "CTSYNC_DRAIN_TIMEOUT_SECONDS": "10",
    }
    log = tmp_path / "run.log"
    service = image.start(["ctsync", "run"], env, log)
    try:
        deadline = time.monotonic() + 90
        while {external_id for _, external_id in hook_server.notifications} != {f"p-{i}" for i in range(20)}:
            assert service.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.2)
        # The image's own HEALTHCHECK command, run inside it as Docker would run it.
        healthcheck = image.config()["Healthcheck"]
        assert isinstance(healthcheck, dict) and healthcheck["Test"][0] == "CMD"
        probed = image.run(healthcheck["Test"][1:], {"CTSYNC_HTTP_LISTEN": listen})
        assert probed.returncode == 0, probed.stderr
        # And it fails when nothing answers, so the pass above means something.
        refused = image.run(healthcheck["Test"][1:], {"CTSYNC_HTTP_LISTEN": f"127.0.0.1:{free_port()}"})
        assert refused.returncode != 0
    finally:
        # As `docker stop` does: SIGTERM to ctsync itself (buildah run would SIGKILL it on its own SIGTERM).
        os.kill(service.pid if image.docker else innermost(service.pid), signal.SIGTERM)
        try:
            code = service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
            code = service.wait(10)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    assert await kafka.committed(group, topic, partitions=2) == ends
    assert hook_server.violations == 0
