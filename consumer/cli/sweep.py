"""Initial load and reconciliation: ``backfill`` and ``reconcile``."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from consumer import audit
from consumer import sweep as bf
from consumer.cli import sweep_text, wiring
from consumer.cli.lifecycle import build_or_report, run_app
from consumer.cli.startup import (
    ENV_FILE,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    config_failure,
    describe_error,
    settings_for,
    usage_failure,
)
from consumer.config import Settings
from consumer.dry_run import ReadOnlyStateStore
from consumer.ports import CursorStore, HookResponse, Sink, StateStore, ThrottleStore
from consumer.routing import Notification, ScopeMapError
from consumer.throttle import (
    LocalThrottleStore,
    ShareThrottleStore,
    ThrottleLimits,
    ceiling_per_minute,
    share_limits,
)

if TYPE_CHECKING:
    from consumer.cli.wiring import CommercetoolsClient

TYPES_OPTION = click.option(
    "--type",
    "types",
    multiple=True,
    help="Resource type ids, comma-separated or repeated (product,category,...); default: every routed type.",
)
UNTIL_OPTION = click.option(
    "--until", help="Only resources last modified before this time: ISO 8601 or an age (15m, 2h, 7d)."
)
SHARE_OPTION = click.option(
    "--budget-share",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.5,
    show_default=True,
    help="The share of IPAAS_THROTTLE_LIMIT per window the sweep may use, so live traffic keeps the rest.",
)
DRY_RUN_OPTION = click.option(
    "--dry-run",
    is_flag=True,
    help="Page and print what would be notified (scope, external id) on stdout; no hook call, no state "
    "or cursor write.",
)
RESTART_OPTION = click.option(
    "--restart", is_flag=True, help="Forget this sweep's saved cursors and start again from the first id."
)


def _as_option(default: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return click.option(
        "--as",
        "as_",
        type=click.Choice(["created", "updated"]),
        default=default,
        show_default=True,
        help="Notify <family>/created (an initial load) or <family>/updated (a catch-up).",
    )


@click.command()
@ENV_FILE
@TYPES_OPTION
@click.option(
    "--since", help="Only resources last modified from this time: ISO 8601 or an age (15m, 2h, 7d)."
)
@UNTIL_OPTION
@_as_option("created")
@SHARE_OPTION
@DRY_RUN_OPTION
@RESTART_OPTION
def backfill(
    env_file: Path | None,
    types: tuple[str, ...],
    since: str | None,
    until: str | None,
    as_: str,
    budget_share: float,
    dry_run: bool,
    restart: bool,
) -> None:
    """Notify iPaaS.com of what already exists in commercetools (an initial load), resumably.

    Pages through the API a type at a time (by id, 500 per page) and feeds one notification per resource
    through the same dedupe, outbox, throttle and audit log as `ctsync run`. A stopped or killed backfill
    continues where it stopped when run again with the same options.
    """
    _sweep_command(env_file, "backfill", types, since, until, as_, budget_share, dry_run, restart)


@click.command()
@ENV_FILE
@TYPES_OPTION
@click.option(
    "--since",
    required=True,
    help="Resources last modified from this time (e.g. when the subscription turned unhealthy): ISO 8601 "
    "or an age (15m, 2h, 7d).",
)
@UNTIL_OPTION
@_as_option("updated")
@SHARE_OPTION
@DRY_RUN_OPTION
@RESTART_OPTION
def reconcile(
    env_file: Path | None,
    types: tuple[str, ...],
    since: str,
    until: str | None,
    as_: str,
    budget_share: float,
    dry_run: bool,
    restart: bool,
) -> None:
    """Catch up on what a subscription missed: report its health, then notify what changed since a time."""
    _sweep_command(env_file, "reconcile", types, since, until, as_, budget_share, dry_run, restart)


def _sweep_command(
    env_file: Path | None,
    command: str,
    types: tuple[str, ...],
    since: str | None,
    until: str | None,
    as_: str,
    share: float,
    dry_run: bool,
    restart: bool,
) -> None:
    from consumer.audit_query import parse_bound

    try:
        start = parse_bound(since) if since else None
        end = parse_bound(until) if until else None
    except ValueError as exc:
        usage_failure(f"--since/--until: {exc}")
    if start is not None and end is not None and start >= end:
        usage_failure("--since must be before --until")
    # A dry run prints what would be notified on stdout, so the audit log goes to stderr.
    settings = settings_for(env_file, command, log_to_stderr=dry_run)
    try:
        routed = wiring.router(settings).scope_map.types
    except ScopeMapError as exc:
        config_failure([f"IPAAS_SCOPE_MAP: {p}" for p in exc.problems])
    wanted = [t.strip() for group in types for t in group.split(",") if t.strip()]
    if wanted:
        problems = [
            f"--type {t}: no sweep can read this resource type" for t in wanted if t not in bf.RESOURCE_PATHS
        ]
        problems += [
            f"--type {t}: not routed by the scope map (IPAAS_SCOPE_MAP), so nothing would be notified"
            for t in wanted
            if t in bf.RESOURCE_PATHS and t not in routed
        ]
        if problems:
            for problem in problems:
                click.echo(f"ctsync: {problem}", err=True)
            sys.exit(EXIT_CONFIG)
        chosen = list(dict.fromkeys(wanted))
    else:
        chosen = [t for t in routed if t in bf.RESOURCE_PATHS]
    plan = _SweepPlan(command, chosen, start, end, bf.Mode(as_), share, dry_run, restart)
    sys.exit(asyncio.run(_sweep(settings, plan)))


@dataclass(frozen=True, slots=True)
class _SweepPlan:
    command: str
    types: list[str]
    since: datetime | None
    until: datetime | None
    mode: bf.Mode
    share: float
    dry_run: bool
    restart: bool


class _PrintSink:
    """The dry run's sink: print each notification as ``scope<TAB>external_id`` on stdout, accept all."""

    async def send(self, notifications: Sequence[Notification], correlation_id: str) -> HookResponse:
        for notification in notifications:
            click.echo(f"{notification.scope}\t{notification.external_id}")
        return HookResponse(status=200, detail="dry-run")

    async def close(self) -> None:
        return None


async def _subscription_health(client: CommercetoolsClient) -> None:
    try:
        found = [s async for page in client.query_pages("subscriptions") for s in page]
    except wiring.commercetools_error() as exc:
        click.echo(f"warning: cannot read the subscriptions' health: {exc}", err=True)
        return
    for line, _warning in sweep_text.subscription_report(found):
        click.echo(line, err=True)


async def _sweep(settings: Settings, plan: _SweepPlan) -> int:
    log = audit.get_logger()
    try:
        client = wiring.commercetools_client(settings)
    except ValueError as exc:
        config_failure([str(exc)])
    try:
        if plan.command == "reconcile":
            await _subscription_health(client)
        try:
            cursors = await wiring.cursor_store(settings)
        except (OSError, ImportError) as exc:
            click.echo(f"ctsync: cannot open the cursor store: {describe_error(exc)}", err=True)
            return EXIT_FAILURE
        try:
            return await _sweep_with(settings, plan, client, cursors, log)
        finally:
            await cursors.close()
    finally:
        await client.aclose()


async def _sweep_with(
    settings: Settings, plan: _SweepPlan, client: CommercetoolsClient, cursors: CursorStore, log: Any
) -> int:
    key = bf.run_key(plan.command, plan.mode, plan.since, plan.until)
    source = wiring.backfill_source(
        client,
        plan.types,
        mode=plan.mode,
        cursors=cursors,
        key=key,
        since=plan.since,
        until=plan.until,
        restart=plan.restart,
        save=not plan.dry_run,
    )
    await source.open()
    if not source.trackers:
        click.echo(
            f"{plan.command}: {', '.join(plan.types)} already swept completely for these options "
            "(pass --restart to sweep again)",
            err=True,
        )
        await source.close()
        return EXIT_OK
    for type_id, cursor in source.resumed.items():
        click.echo(f"{plan.command}: resuming {type_id} after id {cursor}", err=True)
    if plan.dry_run:
        limits = ThrottleLimits(limit=1_000_000, window_seconds=1.0, connections=10, batch_executions=10)
        throttle: ThrottleStore = LocalThrottleStore(limits)
        state: StateStore | None = ReadOnlyStateStore(await wiring.state_store(settings))
        sink: Sink | None = _PrintSink()
    else:
        limits = share_limits(wiring.configured_limits(settings), plan.share)
        throttle = ShareThrottleStore(await wiring.throttle_store(settings), limits)
        state = sink = None
    built = await build_or_report(
        settings,
        source,
        command=plan.command,
        finite=True,
        sink=sink,
        state=state,
        throttle=throttle,
        throttle_limits=limits,
    )
    if built is None:
        return EXIT_FAILURE
    pipeline = built.pipeline
    ceiling = 0.0 if plan.dry_run else ceiling_per_minute(limits, settings.ipaas_batch_size)

    started = time.monotonic()
    summary = settings.summary()
    summary["dry_run"] = plan.dry_run or bool(summary.get("dry_run"))

    def line() -> str:
        return sweep_text.progress_line(
            type_id=source.current_type,
            counts=source.counts,
            types_total=len(plan.types),
            notified=pipeline.counts.notifications_sent,
            queued=len(pipeline.outbox),
            elapsed=time.monotonic() - started,
            ceiling_per_min=ceiling,
        )

    progress = asyncio.ensure_future(_draw_progress(line)) if sys.stderr.isatty() else None

    async def stop_progress() -> None:
        if progress is not None:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
            sys.stderr.write("\r\x1b[K")

    outcome = await run_app(
        built,
        command=plan.command,
        source_name=source.name,
        started_fields={"types": plan.types, "budget_share": plan.share, **summary},
        stopped_fields=lambda: {"pages": source.counts.pages, "resources": source.counts.resources},
        on_close=stop_progress,
    )
    code, elapsed, counts = outcome.code, outcome.elapsed, outcome.counts
    lines = sweep_text.summary_lines(
        types=plan.types,
        counts=source.counts,
        per_type=source.per_type,
        notified=pipeline.counts.notifications_sent,
        elapsed=elapsed,
        ceiling_per_min=ceiling,
    )
    for text in lines + wiring.summary_lines(counts)[1:]:
        click.echo(text, err=True)
    complete = [t for t, tracker in source.trackers.items() if tracker.complete] + source.already_complete
    left = [t for t in plan.types if t not in complete]
    if left and not plan.dry_run:
        click.echo(f"  not complete: {', '.join(left)}; run the same command again to resume", err=True)
        for type_id in left:
            resume_after = source.trackers[type_id].value if type_id in source.trackers else None
            where = f"after id {resume_after}" if resume_after is not None else "from the start"
            click.echo(f"  {type_id} resumes {where}", err=True)
    if left and code == EXIT_OK:
        # The sweep did not finish (stopped by a signal): not a success, whatever was delivered.
        click.echo(f"{plan.command}: interrupted before it finished (exit {EXIT_FAILURE})", err=True)
        code = EXIT_FAILURE
    return code


async def _draw_progress(line: Callable[[], str], interval: float = 0.5) -> None:
    while True:
        await asyncio.sleep(interval)
        sys.stderr.write(f"\r{line()}\x1b[K")
        sys.stderr.flush()
