"""One run of a pipeline, for every command that runs one (``run``, ``replay``, ``dead-letters replay``,
``backfill``, ``reconcile``): build it, serve it until its source ends or a signal stops it, log its start and
stop, and turn what went wrong into an exit code.

The collector runs under ``consumer.collector``'s regime. Signals: the first SIGTERM/SIGINT asks the
pipeline to drain and hand back the rest; a second stops waiting.
Every error echoed on the terminal goes through the audit redactor first.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from consumer import audit
from consumer.cli import wiring
from consumer.cli.startup import EXIT_FAILURE, EXIT_OK, config_failure, describe_error
from consumer.collector import garbage_collected
from consumer.config import Settings
from consumer.pipeline import Pipeline, SinkUnusable
from consumer.ports import Sink, Source, StateStore, ThrottleStore
from consumer.routing import ScopeMapError
from consumer.throttle import ThrottleLimits


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


def _moved(pipeline: Pipeline) -> Callable[[], bool]:
    """Whether the pipeline took in or settled anything since the last call (the collector's ``busy``)."""
    last = [-1]

    def moved() -> bool:
        counts = pipeline.counts
        now = counts.received + counts.acked + counts.requests
        changed, last[0] = now != last[0], now
        return changed

    return moved


def first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (a task group's failure), or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def echo_error(text: str) -> None:
    """Say what went wrong on stderr, for the person at the terminal, never with a secret in it."""
    click.echo(f"ctsync: {audit.redact(text)}", err=True)


async def build_or_report(
    settings: Settings,
    source: Source,
    *,
    command: str,
    finite: bool,
    sink: Sink | None = None,
    state: StateStore | None = None,
    throttle: ThrottleStore | None = None,
    throttle_limits: ThrottleLimits | None = None,
) -> wiring.App | None:
    """Build the pipeline for ``source`` (closing it if that fails): exit 2 on a setting this build cannot
    serve, None (logged, echoed) when a server or file refused, so the caller exits 1."""
    try:
        return await wiring.build(
            settings,
            source,
            finite=finite,
            sink=sink,
            state=state,
            throttle=throttle,
            throttle_limits=throttle_limits,
        )
    except (wiring.UnsupportedSetting, ScopeMapError) as exc:
        await source.close()
        problems = getattr(exc, "problems", None)
        config_failure([f"IPAAS_SCOPE_MAP: {p}" for p in problems] if problems else [str(exc)])
    except OSError as exc:
        await source.close()
        audit.get_logger().error(audit.SERVICE_STOPPED, command=command, error=describe_error(exc))
        echo_error(describe_error(exc))
        return None


@dataclass
class Outcome:
    """How a run ended: its exit code, its counts, and the fields of its ``service.stopped`` line."""

    code: int
    counts: dict[str, Any]
    elapsed: float = 0.0
    error: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


async def run_app(
    built: wiring.App,
    *,
    command: str,
    source_name: str,
    started_fields: Mapping[str, object],
    stopped_fields: Callable[[], Mapping[str, object]] = dict,
    probe_state: bool = False,
    on_close: Callable[[], Any] | None = None,
) -> Outcome:
    """Serve ``built`` until its source ends or a signal stops it; close it; log ``service.started`` and
    ``service.stopped`` (with ``stopped_fields()`` and the counts); return how it ended.

    ``probe_state``: report not-ready until the state store answered (a long-lived service with /readyz).
    ``on_close``: awaited before the pipeline's resources close (the HTTP endpoints, a progress line).
    """
    log = audit.get_logger()
    pipeline = built.pipeline
    started = time.monotonic()
    log.info(audit.SERVICE_STARTED, command=command, source=source_name, **started_fields)
    code, error = EXIT_OK, None
    signals = SignalStop(pipeline)
    try:
        with signals:
            async with (
                garbage_collected(busy=_moved(pipeline)),
                wiring.state_probed(built, enabled=probe_state),
            ):
                await pipeline.run(signals.stop)
    except SinkUnusable as exc:
        code, error = EXIT_FAILURE, str(exc)
    except Exception as exc:
        first = first_error(exc)
        code, error = EXIT_FAILURE, f"{type(first).__name__}: {first}"
    finally:
        if on_close is not None:
            result = on_close()
            if asyncio.iscoroutine(result):
                await result
        await built.aclose()
    elapsed = time.monotonic() - started
    counts = pipeline.counts.as_dict()
    fields: dict[str, Any] = {
        "command": command,
        "duration_s": round(elapsed, 3),
        "signal": signals.first,
        **stopped_fields(),
        **counts,
    }
    if error is not None:
        log.error(audit.SERVICE_STOPPED, error=error, **fields)
        echo_error(error)
    else:
        log.info(audit.SERVICE_STOPPED, **fields)
    return Outcome(code, counts, elapsed, error, fields)
