"""``run`` and ``replay``: a source through the pipeline, until a signal (a stream) or its end (a file)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import click

from consumer import audit
from consumer.cli import wiring
from consumer.cli.lifecycle import Outcome, build_or_report, echo_error, run_app
from consumer.cli.startup import (
    ENV_FILE,
    EXIT_FAILURE,
    config_failure,
    describe_error,
    describe_open_error,
    settings_for,
)
from consumer.config import Settings
from consumer.ports import Envelope, Fetched, Source


@click.command()
@ENV_FILE
@click.option("--follow", is_flag=True, help="With a file: source, keep reading lines appended later.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Send nothing: log what would be sent; on a broker or push source ack and record nothing "
    "(same as CTSYNC_DRY_RUN=true).",
)
def run(env_file: Path | None, follow: bool, dry_run: bool) -> None:
    """Run the service: consume, deliver, ack, until SIGTERM/SIGINT; then drain and stop."""
    if dry_run:
        # Through the environment, so the setting is loaded, checked and logged like any other.
        os.environ["CTSYNC_DRY_RUN"] = "true"
    settings = settings_for(env_file, "run")
    if settings.source is None:
        config_failure(["CTSYNC_SOURCE: required for run (kafka, pubsub, push or file:<path>)"])
    finite = settings.source.kind == "file" and not follow

    async def open_configured() -> Source:
        return await wiring.configured_source(settings, follow=follow)

    outcome = asyncio.run(serve(settings, open_configured, command="run", finite=finite))
    sys.exit(outcome.code)


@click.command()
@ENV_FILE
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def replay(env_file: Path | None, file: Path) -> None:
    """Push a JSONL file of payloads (or of dead letters) through the pipeline and print a summary."""
    settings = settings_for(env_file, "replay")

    async def open_file() -> Source:
        # Wrapped only for the progress line a person at a terminal sees on stderr.
        return FilteringSource(wiring.file_source(file), lambda envelope: True, Progress("replay"))

    sys.exit(asyncio.run(serve(settings, open_file, command="replay", finite=True)).code)


async def serve(
    settings: Settings, open_source: Callable[[], Awaitable[Source]], *, command: str, finite: bool
) -> Outcome:
    """Run a pipeline from ``open_source``; a long-lived ``run`` also serves /healthz, /readyz, /metrics.
    The counts are empty when it never started."""
    log = audit.get_logger()
    try:
        source = await open_source()
    except wiring.UnsupportedSetting as exc:
        config_failure([str(exc)])
    except OSError as exc:
        if settings.source is not None and settings.source.kind == "file" and command == "run":
            config_failure([describe_open_error(exc, "CTSYNC_SOURCE")])
        log.error(audit.SERVICE_STOPPED, command=command, error=describe_error(exc))
        echo_error(f"cannot open the source: {describe_error(exc)}")
        return Outcome(EXIT_FAILURE, {})
    built = await build_or_report(settings, source, command=command, finite=finite)
    if built is None:
        return Outcome(EXIT_FAILURE, {})
    endpoints: wiring.Serving | None = None
    if command == "run" and not finite:
        wiring.mark_state_unchecked(built)
        try:
            endpoints = await wiring.open_endpoints(settings, built.pipeline, source)
        except OSError as exc:
            await built.aclose()
            log.error(audit.SERVICE_STOPPED, command=command, error=str(exc))
            echo_error(str(exc))
            return Outcome(EXIT_FAILURE, {})
    outcome = await run_app(
        built,
        command=command,
        source_name=source.name,
        started_fields=settings.summary(),
        probe_state=endpoints is not None,
        on_close=endpoints.close if endpoints is not None else None,
    )
    if command == "replay" or finite:
        for line in wiring.summary_lines(outcome.counts):
            click.echo(line, err=True)
    return outcome


class Progress:
    """A progress line on stderr for a person at a terminal; silent when stderr is not a terminal."""

    def __init__(self, label: str, interval: float = 0.25) -> None:
        self.label = label
        self.interval = interval
        self.enabled = sys.stderr.isatty()
        self.read = self.matched = 0
        self._shown = 0.0
        self._drawn = False

    def update(self, read: int, matched: int) -> None:
        self.read += read
        self.matched += matched
        now = time.monotonic()
        if self.enabled and now - self._shown >= self.interval:
            self._shown = now
            self._drawn = True
            text = f"{self.label}: read {self.read}"
            if self.matched != self.read:
                text += f", {self.matched} match the filters"
            sys.stderr.write(f"\r{text}\x1b[K")
            sys.stderr.flush()

    def finish(self) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._drawn = False


class FilteringSource:
    """Pass on the envelopes ``keep`` accepts, counting for the progress line; the rest are handed back
    (nacked) and never reach the pipeline, so they stay where they are."""

    def __init__(self, inner: Source, keep: Callable[[Envelope], bool], progress: Progress) -> None:
        self.inner = inner
        self.name = inner.name
        self.keep = keep
        self.progress = progress

    async def fetch(self, max_count: int) -> Fetched:
        while True:
            fetched = await self.inner.fetch(max_count)
            kept = []
            for envelope in fetched.envelopes:
                if self.keep(envelope):
                    kept.append(envelope)
                else:
                    envelope.nack()
            self.progress.update(len(fetched.envelopes), len(kept))
            # Filtered-out envelopes must not look like an idle source: read on while more is ready.
            if kept or fetched.exhausted or not fetched.more_ready:
                return Fetched(kept, more_ready=fetched.more_ready, exhausted=fetched.exhausted)

    async def close(self) -> None:
        self.progress.finish()
        await self.inner.close()
