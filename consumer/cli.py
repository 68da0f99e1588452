"""The ``ctsync`` command line. Exit codes: 0 success (a clean stop included), 1 runtime failure, 2 bad
configuration or usage."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from consumer import app, audit
from consumer.config import ConfigError, Settings, did_you_mean, load_settings, unknown_variables
from consumer.pipeline import Pipeline, SinkUnusable
from consumer.ports import Envelope, Fetched, Source
from consumer.routing import ScopeMapError

if TYPE_CHECKING:
    pass

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

ENV_FILE = click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read settings from this .env file too (the process environment wins).",
)


def _config_failure(problems: list[str]) -> NoReturn:
    click.echo("ctsync: configuration error:", err=True)
    for problem in problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(EXIT_CONFIG)


def _settings(env_file: Path | None, command: str, *, log_to_stderr: bool = False) -> Settings:
    """Load and check the settings (exit 2 on a problem) and set up the audit log.

    ``log_to_stderr``: the command prints its own results on stdout, so the log goes to stderr.
    """
    if env_file is not None and not env_file.is_file():
        _config_failure([f"--env-file: {env_file} does not exist or is not a file"])
    unknown = {name: did_you_mean(name) for name in unknown_variables(os.environ, env_file)}
    try:
        settings = load_settings(env_file, for_command=command)
    except ConfigError as exc:
        # A misspelt variable is often why a required one is missing: name it with the problems.
        hints = [
            f"{name}: not a ctsync setting; did you mean {meant}?" for name, meant in unknown.items() if meant
        ]
        _config_failure(exc.problems + hints)
    audit.configure(
        level=settings.ctsync_log_level,
        log_format=settings.ctsync_log_format,
        secrets=settings.secret_values(),
        stream=sys.stderr.buffer if log_to_stderr else None,
        audit=settings.ctsync_audit == "on",
    )
    for name, meant in unknown.items():
        reason = "not a ctsync setting" + (f"; did you mean {meant}?" if meant else " (typo?)")
        where = "environment" if name in os.environ else f"--env-file {env_file}"
        audit.get_logger().warning(
            audit.CONFIG_WARNING, variable=name, reason=reason, did_you_mean=meant, where=where
        )
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctsync")
def main() -> None:
    """Keep iPaaS.com in step with commercetools: Subscription deliveries in, hook notifications out."""


@main.command()
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
    settings = _settings(env_file, "run")
    if settings.source is None:
        _config_failure(["CTSYNC_SOURCE: required for run (kafka, pubsub, push or file:<path>)"])
    finite = settings.source.kind == "file" and not follow
    sys.exit(asyncio.run(_serve(settings, _configured(settings, follow), command="run", finite=finite)))


@main.command()
@ENV_FILE
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def replay(env_file: Path | None, file: Path) -> None:
    """Push a JSONL file of payloads (or of dead letters) through the pipeline and print a summary."""
    settings = _settings(env_file, "replay")

    async def open_file() -> Source:
        # Wrapped only for the progress line a person at a terminal sees on stderr.
        return _FilteringSource(app.file_source(file), lambda envelope: True, _Progress("replay"))

    sys.exit(asyncio.run(_serve(settings, open_file, command="replay", finite=True)))


def _configured(settings: Settings, follow: bool) -> Callable[[], Awaitable[Source]]:
    async def open_configured() -> Source:
        return await app.configured_source(settings, follow=follow)

    return open_configured


def _describe_runtime(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _describe(exc: BaseException, variable: str) -> str:
    if isinstance(exc, OSError):
        return f"{variable}: cannot open {exc.filename}: {exc.strerror}"
    return str(exc)


class SignalStop:
    """SIGTERM/SIGINT while a pipeline runs: the first asks it to stop (drain, then hand back the rest); a
    second stops waiting for the drain."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.stop = asyncio.Event()
        self.seen: list[int] = []

    def __enter__(self) -> SignalStop:
        loop = asyncio.get_running_loop()
        for signum in self.SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for signum in self.SIGNALS:
            loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        self.seen.append(signum)
        name = signal.Signals(signum).name
        # On stderr, for the person who pressed Ctrl-C: what happens now, and how to cut it short.
        if len(self.seen) == 1:
            self.stop.set()
            click.echo(
                f"ctsync: {name}: stopping; waiting up to {self.pipeline.options.drain_timeout:g}s "
                "(CTSYNC_DRAIN_TIMEOUT_SECONDS) for in-flight work to land, then handing back the rest. "
                "Send it again (Ctrl-C) to stop at once.",
                err=True,
            )
        else:
            if len(self.seen) == 2:
                click.echo(
                    f"ctsync: {name} again: stopping at once; what has not landed is handed back", err=True
                )
            self.pipeline.abandon()

    @property
    def first(self) -> str | None:
        """The name of the first signal received, if any."""
        return signal.Signals(self.seen[0]).name if self.seen else None


async def _serve(
    settings: Settings, open_source: Callable[[], Awaitable[Source]], *, command: str, finite: bool
) -> int:
    code, _ = await _serve_counted(settings, open_source, command=command, finite=finite)
    return code


async def _serve_counted(
    settings: Settings, open_source: Callable[[], Awaitable[Source]], *, command: str, finite: bool
) -> tuple[int, dict[str, Any]]:
    """Run a pipeline from ``open_source``; return the exit code and the run's counts (empty when it never
    started)."""
    log = audit.get_logger()
    try:
        source = await open_source()
    except app.UnsupportedSetting as exc:
        _config_failure([str(exc)])
    except OSError as exc:
        if settings.source is not None and settings.source.kind == "file" and command == "run":
            _config_failure([_describe(exc, "CTSYNC_SOURCE")])
        log.error(audit.SERVICE_STOPPED, command=command, error=_describe_runtime(exc))
        click.echo(f"ctsync: cannot open the source: {_describe_runtime(exc)}", err=True)
        return EXIT_FAILURE, {}
    try:
        built = await app.build(settings, source, finite=finite)
    except (app.UnsupportedSetting, ScopeMapError) as exc:
        problems = getattr(exc, "problems", None)
        if problems:
            _config_failure([f"IPAAS_SCOPE_MAP: {p}" for p in problems])
        _config_failure([str(exc)])
    except OSError as exc:
        await source.close()
        log.error(audit.SERVICE_STOPPED, command=command, error=_describe_runtime(exc))
        click.echo(f"ctsync: {_describe_runtime(exc)}", err=True)
        return EXIT_FAILURE, {}
    endpoints = None
    if command == "run" and not finite:
        from adapters.endpoints import open_endpoints

        app.mark_state_unchecked(built)
        try:
            endpoints = await open_endpoints(settings.http_listen, built.pipeline, source)
        except OSError as exc:
            await built.aclose()
            log.error(audit.SERVICE_STOPPED, command=command, error=str(exc))
            click.echo(f"ctsync: {exc}", err=True)
            return EXIT_FAILURE, {}
    started = time.monotonic()
    log.info(audit.SERVICE_STARTED, command=command, source=source.name, **settings.summary())
    code = EXIT_OK
    error: str | None = None
    signals = SignalStop(built.pipeline)
    try:
        with signals:
            async with (
                app.garbage_collected_on_a_clock(),
                app.state_probed(built, enabled=endpoints is not None),
            ):
                await built.pipeline.run(signals.stop)
    except SinkUnusable as exc:
        code, error = EXIT_FAILURE, str(exc)
    except Exception as exc:
        code, error = EXIT_FAILURE, f"{type(exc).__name__}: {exc}"
    finally:
        if endpoints is not None:
            await endpoints.close()
        await built.aclose()
    counts_dict = built.pipeline.counts.as_dict()
    fields: dict[str, Any] = {
        "command": command,
        "duration_s": round(time.monotonic() - started, 3),
        "signal": signals.first,
        **counts_dict,
    }
    if error is not None:
        log.error(audit.SERVICE_STOPPED, error=error, **fields)
        click.echo(f"ctsync: {error}", err=True)
    else:
        log.info(audit.SERVICE_STOPPED, **fields)
    if command == "replay" or finite:
        for line in app.summary_lines(counts_dict):
            click.echo(line, err=True)
    return code, counts_dict


def _configure_stderr_audit(settings: Settings | None, secrets: list[str]) -> None:
    # These commands print their own output on stdout (and JSON with --json), so the adapters' log lines go
    # to stderr instead.
    audit.configure(
        level=settings.ctsync_log_level if settings is not None else "WARNING",
        log_format=settings.ctsync_log_format if settings is not None else "json",
        secrets=secrets,
        stream=sys.stderr.buffer,
        audit=settings is not None and settings.ctsync_audit == "on",
    )


def _usage_failure(message: str) -> NoReturn:
    click.echo(f"ctsync: {message}", err=True)
    sys.exit(EXIT_CONFIG)


class _Progress:
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


class _FilteringSource:
    """Pass on the envelopes ``keep`` accepts, counting for the progress line; the rest are handed back
    (nacked) and never reach the pipeline, so they stay where they are."""

    def __init__(self, inner: Source, keep: Callable[[Envelope], bool], progress: _Progress) -> None:
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


# The other commands register themselves on ``main`` (they import it from here).
from consumer import _operator_cli, _sweep_cli  # noqa: E402, F401

if __name__ == "__main__":
    # ``python -m consumer.cli`` runs this file as ``__main__``; the other commands registered themselves on
    # the group of the importable ``consumer.cli``, so that is the one to run.
    from consumer.cli import main as registered_main

    registered_main()
