"""Operator commands: ``check``, ``subscription ensure``, ``audit`` and ``dead-letters replay``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from consumer.cli import wiring
from consumer.cli.run import FilteringSource, Progress, serve
from consumer.cli.startup import (
    ENV_FILE,
    EXIT_FAILURE,
    EXIT_OK,
    config_failure,
    configure_stderr_audit,
    settings_for,
    usage_failure,
)
from consumer.config import Settings, load
from consumer.ports import Envelope, Source
from consumer.routing import ScopeMapError

# --- operator commands: check, subscription ensure, audit, dead-letters replay ---


@click.command()
@ENV_FILE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for tools) instead of lines.")
def check(env_file: Path | None, as_json: bool) -> None:
    """Verify an installation: settings, region, token, scopes, project, hook, source. Exit 0 if all pass."""
    import orjson

    from consumer.cli import checks
    from consumer.config import SECRET_VARIABLES

    if env_file is not None and not env_file.is_file():
        config_failure([f"--env-file: {env_file} does not exist or is not a file"])
    loaded = load(env_file, for_command="check")
    settings, problems, values, unknown = loaded.settings, loaded.problems, loaded.values, loaded.unknown
    configure_stderr_audit(settings, [values[name] for name in SECRET_VARIABLES if name in values])
    results = asyncio.run(checks.run_checks(settings, values, problems, unknown))
    if as_json:
        click.echo(orjson.dumps(checks.render_json(results), option=orjson.OPT_INDENT_2).decode())
    else:
        for line in checks.render_text(results):
            click.echo(line)
    sys.exit(checks.exit_code(results))


@click.group()
def subscription() -> None:
    """Manage the commercetools Subscription that feeds ctsync."""


def _destination(
    settings: Settings,
    kind: str | None,
    pubsub_topic: str | None,
    kafka_topic: str | None,
    kafka_key: str | None,
) -> dict[str, Any]:
    from consumer.subscription import confluent_destination, pubsub_destination

    if kind is None:
        source = settings.source.kind if settings.source is not None else None
        kind = "confluent" if pubsub_topic is None and source == "kafka" else "pubsub"
    if kind == "pubsub":
        if pubsub_topic is None:
            pubsub_topic = _topic_of_subscription(settings)
        return pubsub_destination(pubsub_topic)
    problems = []
    servers, topics = settings.kafka_bootstrap_server_list, settings.kafka_topic_list
    if not servers:
        problems.append("KAFKA_BOOTSTRAP_SERVERS: required for a Confluent Cloud destination")
    if kafka_topic is None and not topics:
        problems.append("KAFKA_TOPICS: required for a Confluent Cloud destination (or give --kafka-topic)")
    if settings.kafka_sasl_username is None or settings.kafka_sasl_password is None:
        problems.append(
            "KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD: required for a Confluent Cloud destination "
            "(the cluster API key and secret commercetools produces with)"
        )
    if problems:
        config_failure(problems)
    assert settings.kafka_sasl_username is not None and settings.kafka_sasl_password is not None
    return confluent_destination(
        servers[0],
        kafka_topic or topics[0],
        settings.kafka_sasl_username,
        settings.kafka_sasl_password.get_secret_value(),
        kafka_key,
    )


def _topic_of_subscription(settings: Settings) -> str:
    """Read the topic PUBSUB_SUBSCRIPTION is attached to from Pub/Sub; exit 2 asking for --pubsub-topic
    when there is no subscription to read or Pub/Sub does not answer."""
    needed = (
        "--pubsub-topic: required for a Pub/Sub destination when the topic cannot be read from "
        "PUBSUB_SUBSCRIPTION: projects/<project>/topics/<topic>, the topic PUBSUB_SUBSCRIPTION is "
        "attached to (or use --destination confluent)"
    )
    if settings.pubsub_subscription is None:
        config_failure([needed])

    async def read() -> str:
        async with asyncio.timeout(30):
            return await wiring.pubsub_subscription_topic(settings)

    try:
        topic = asyncio.run(read())
    except (TimeoutError, ConnectionError, LookupError, OSError) as exc:
        config_failure([needed, str(exc) or "PUBSUB_SUBSCRIPTION: Pub/Sub did not answer within 30s"])
    click.echo(f"Pub/Sub topic {topic} (the topic of {settings.pubsub_subscription})", err=True)
    return topic


@subscription.command("ensure")
@ENV_FILE
@click.option("--key", default="ctsync", show_default=True, help="The subscription's key.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["Platform", "CloudEvents"]),
    default="Platform",
    show_default=True,
    help="The payload format commercetools delivers.",
)
@click.option(
    "--destination",
    "kind",
    type=click.Choice(["pubsub", "confluent"]),
    help="Where commercetools delivers; default: confluent when CTSYNC_SOURCE=kafka, else pubsub.",
)
@click.option("--pubsub-topic", help="projects/<project>/topics/<topic> for a Pub/Sub destination.")
@click.option("--kafka-topic", help="Confluent Cloud topic (default: the first of KAFKA_TOPICS).")
@click.option("--kafka-key", help="The fixed record key commercetools sets on Confluent Cloud (optional).")
@click.option("--dry-run", is_flag=True, help="Print the draft (credentials masked) and change nothing.")
def subscription_ensure(
    env_file: Path | None,
    key: str,
    fmt: str,
    kind: str | None,
    pubsub_topic: str | None,
    kafka_topic: str | None,
    kafka_key: str | None,
    dry_run: bool,
) -> None:
    """Create the commercetools Subscription for the routed types, or update it when it differs."""
    import orjson

    from consumer import subscription as sub

    settings = settings_for(env_file, "dry-run" if dry_run else "subscription ensure", log_to_stderr=True)
    try:
        types = list(wiring.router(settings).scope_map.types)
        destination = _destination(settings, kind, pubsub_topic, kafka_topic, kafka_key)
        draft = sub.build_draft(
            types, destination, key=key, fmt="CloudEvents" if fmt == "CloudEvents" else "Platform"
        )
    except ScopeMapError as exc:
        config_failure([f"IPAAS_SCOPE_MAP: {p}" for p in exc.problems])
    except sub.SubscriptionError as exc:
        config_failure([str(exc)])
    if dry_run:
        click.echo(orjson.dumps(sub.masked(draft), option=orjson.OPT_INDENT_2).decode())
        return
    sys.exit(asyncio.run(_ensure(settings, draft)))


async def _ensure(settings: Settings, draft: dict[str, Any]) -> int:
    from consumer import subscription as sub

    key = str(draft["key"])
    try:
        async with wiring.commercetools_client(settings) as client:
            existing = await client.get_subscription(key)
            if existing is None:
                result = await client.create_subscription(draft)
                click.echo(
                    f"created subscription {key} (id {result.get('id')}, version {result.get('version')})"
                )
            else:
                actions = sub.update_actions(existing, draft)
                if actions:
                    result = await client.update_subscription(key, int(existing["version"]), actions)
                    names = ", ".join(a["action"] for a in actions)
                    click.echo(f"updated subscription {key} ({names}); now version {result.get('version')}")
                else:
                    result = existing
                    click.echo(f"subscription {key} is up to date (version {result.get('version')})")
    except wiring.commercetools_error() as exc:
        click.echo(f"ctsync: {exc}", err=True)
        if exc.status == 403 or "insufficient_scope" in exc.codes:
            click.echo(f"  the API client needs manage_subscriptions:{settings.ctp_project_key}", err=True)
        return EXIT_FAILURE
    except sub.SubscriptionError as exc:
        click.echo(f"ctsync: {exc}", err=True)
        return EXIT_FAILURE
    status = result.get("status")
    click.echo(f"status: {status}")
    hint = sub.status_hint(status)
    if hint:
        click.echo(f"  {hint}", err=True)
    messages = ", ".join(m["resourceTypeId"] for m in draft["messages"])
    changes = ", ".join(c["resourceTypeId"] for c in draft["changes"])
    click.echo(f"messages: {messages}")
    click.echo(f"changes: {changes}")
    return EXIT_FAILURE if sub.is_broken(status) else EXIT_OK


@click.command("audit")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--resource", "resource_id", help="The whole story of a resource id.")
@click.option("--message-key", help="The whole story of a message key.")
@click.option("--correlation-id", help="The whole story of a hook request.")
@click.option("--since", help="From this time: ISO 8601 (2026-01-31T12:00:00Z) or an age (15m, 2h, 7d).")
@click.option("--until", help="Before this time: ISO 8601 or an age.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for tools instead of a table.")
def audit_command(
    files: tuple[Path, ...],
    resource_id: str | None,
    message_key: str | None,
    correlation_id: str | None,
    since: str | None,
    until: str | None,
    as_json: bool,
) -> None:
    """Query audit logs (JSON lines; FILES, or stdin): a story, or counts by event and reason."""
    import contextlib

    import orjson

    from consumer import audit_query as q

    chosen = [
        name
        for name, value in (
            ("--resource", resource_id),
            ("--message-key", message_key),
            ("--correlation-id", correlation_id),
        )
        if value
    ]
    if len(chosen) > 1:
        usage_failure(f"give at most one of {', '.join(chosen)}")
    try:
        start = q.parse_bound(since) if since else None
        end = q.parse_bound(until) if until else None
    except ValueError as exc:
        usage_failure(f"--since/--until: {exc}")
    # Streamed: memory stays bounded whatever the logs' size; progress on stderr when it is a terminal.
    story_query = resource_id or message_key or correlation_id
    with contextlib.ExitStack() as stack:
        try:
            logs = q.open_logs(files, 3 if story_query else 1, stack)
        except OSError as exc:
            usage_failure(f"cannot read {exc.filename}: {exc.strerror}")
        progress = q.Progress(logs.total_bytes)
        if not story_query:
            counts, skipped = q.stream_counts(logs, start, end, progress)
        else:
            story = q.stream_story(
                logs,
                resource_id=resource_id,
                message_key=message_key,
                correlation_id=correlation_id,
                since=start,
                until=end,
                progress=progress,
            )
    if story_query:
        if resource_id:
            query = {"resource_id": resource_id}
        elif message_key:
            query = {"message_key": message_key}
        else:
            assert correlation_id is not None
            query = {"correlation_id": correlation_id}
        if as_json:
            payload = {"query": query, "count": len(story), "events": q.events_json(story)}
            click.echo(orjson.dumps(payload, default=str).decode())
        elif story:
            for line in q.story_lines(story):
                click.echo(line)
        else:
            click.echo(f"no events for {next(iter(query.values()))}", err=True)
        return
    if as_json:
        click.echo(orjson.dumps({**counts.as_json(), "skipped_lines": skipped}).decode())
    else:
        for line in q.count_lines(counts):
            click.echo(line)
        if skipped:
            click.echo(f"({skipped} lines were not audit events)", err=True)


@click.group("dead-letters")
def dead_letters() -> None:
    """Work with dead letters after a fix."""


def _dead_letter_filter(
    reasons: tuple[str, ...], since: datetime | None, until: datetime | None, started: datetime
) -> Callable[[Envelope], bool]:
    """Return whether a dead letter is to be replayed: it matches the filters and is not this replay's own
    output (a letter dead-lettered again may land where the replay reads, e.g. the same Kafka topic)."""
    from consumer.audit_query import parse_timestamp

    wanted = [r.lower() for r in reasons]

    def keep(envelope: Envelope) -> bool:
        fields = envelope.source_fields
        written = fields.get("dead_letter_time")
        written_at = parse_timestamp(written) if isinstance(written, str) else None
        if written_at is not None and written_at >= started:
            return False
        if wanted:
            reason = str(fields.get("dead_letter_reason") or "").lower()
            if not any(w in reason for w in wanted):
                return False
        if since is not None or until is not None:
            text = fields.get("dead_letter_time")
            when = parse_timestamp(text) if isinstance(text, str) else None
            if when is None or (since is not None and when < since) or (until is not None and when >= until):
                return False
        return True

    return keep


def _dead_letter_location(location: str) -> tuple[str, str]:
    """Return (kind, name): ("file", path), ("kafka", topic) or ("pubsub", subscription path)."""
    if location.startswith("kafka://"):
        return "kafka", location.removeprefix("kafka://")
    name = location.removeprefix("pubsub://")
    if name.startswith("projects/") and "/subscriptions/" in name:
        return "pubsub", name
    if name.startswith("projects/") and "/topics/" in name:
        raise ValueError(
            f"{location}: give a Pub/Sub subscription attached to the dead-letter topic "
            "(projects/<project>/subscriptions/<subscription>), not the topic"
        )
    if location.startswith("file:"):
        from consumer.config import parse_source

        spec = parse_source(location)
        return "file", str(spec.path)
    return "file", location


FAILED_AGAIN_FILE = "ctsync-dead-letters-failed-again.jsonl"
DEFAULT_DEAD_LETTER_URL: str = Settings.model_fields["ctsync_dead_letter_url"].default


def _failed_again_target(
    failed_to: str | None, kind: str, name: str, configured: str, configured_is_file: bool
) -> str:
    """Return where letters that fail again are written (a CTSYNC_DEAD_LETTER_URL value).

    Never the topic the replay reads: they would be read again, and the replay would not end. A file
    replay stops at the size the file had when it started, so it may append to the file it reads.
    """
    if failed_to is None:
        if kind == "file" or configured_is_file:
            return configured
        return f"file:{FAILED_AGAIN_FILE}"
    if kind == "kafka" and failed_to == f"kafka://{name}":
        raise ValueError(f"--failed-to: {failed_to} is the topic this replay reads; give another target")
    return failed_to


@dead_letters.command("replay")
@ENV_FILE
@click.option(
    "--reason",
    "reasons",
    multiple=True,
    help="Only dead letters whose reason contains this text (case-insensitive); repeat for any of several.",
)
@click.option("--since", help="Only dead letters written from this time: ISO 8601 or an age (15m, 2h, 7d).")
@click.option("--until", help="Only dead letters written before this time: ISO 8601 or an age.")
@click.option(
    "--failed-to",
    help="Where letters that fail again go (file:<path>, kafka://<topic>, pubsub://projects/<p>/topics/<t>); "
    f"default: CTSYNC_DEAD_LETTER_URL when it is a file, else file:{FAILED_AGAIN_FILE}. Never the topic "
    "the replay reads.",
)
@click.argument("location")
def dead_letters_replay(
    env_file: Path | None,
    reasons: tuple[str, ...],
    since: str | None,
    until: str | None,
    failed_to: str | None,
    location: str,
) -> None:
    """Feed dead letters through the pipeline again, up to those there when it started; exit 1 when some
    fail again (they are written to --failed-to) or a line of a dead-letter file is malformed.

    LOCATION is a file (what CTSYNC_DEAD_LETTER_URL=file:... wrote), kafka://<topic>, or a Pub/Sub
    subscription projects/<project>/subscriptions/<subscription> on the dead-letter topic.
    """
    from consumer.audit_query import parse_bound
    from consumer.config import parse_dead_letter_url

    try:
        start = parse_bound(since) if since else None
        end = parse_bound(until) if until else None
        kind, name = _dead_letter_location(location)
        if failed_to is not None:
            try:
                parse_dead_letter_url(failed_to)
            except ValueError as exc:
                raise ValueError(f"--failed-to: {exc}") from None
    except ValueError as exc:
        usage_failure(f"{exc}")
    if kind == "file" and not Path(name).is_file():
        usage_failure(f"{location}: no such file")
    configured = load(env_file).values.get("CTSYNC_DEAD_LETTER_URL", DEFAULT_DEAD_LETTER_URL).strip()
    try:
        configured_is_file = parse_dead_letter_url(configured).kind == "file"
    except ValueError:
        configured_is_file = True  # reported as a configuration error when the settings load
    try:
        target = _failed_again_target(failed_to, kind, name, configured, configured_is_file)
    except ValueError as exc:
        usage_failure(f"{exc}")
    # Through the environment, so the target is loaded and checked like the setting it stands for.
    os.environ["CTSYNC_DEAD_LETTER_URL"] = target
    settings = settings_for(env_file, "dead-letters replay")
    progress = Progress("dead letters")
    started = datetime.now(UTC)
    keep = _dead_letter_filter(reasons, start, end, started)
    opened: list[Source] = []

    async def open_source() -> Source:
        try:
            inner, attached_to = await wiring.dead_letter_source(settings, kind, name, snapshot=started)
            if attached_to is not None and target == f"pubsub://{attached_to}":
                await inner.close()
                usage_failure(
                    f"--failed-to: {target} is the topic {name} is attached to; give another target"
                )
        except LookupError as exc:
            raise ConnectionError(str(exc)) from None
        opened.append(inner)
        return FilteringSource(inner, keep, progress)

    outcome = asyncio.run(serve(settings, open_source, command="dead-letters replay", finite=True))
    code, counts = outcome.code, outcome.counts
    filters = [f"reason contains {' or '.join(map(repr, reasons))}"] if reasons else []
    filters += [f"since {start.isoformat()}"] if start else []
    filters += [f"until {end.isoformat()}"] if end else []
    line = f"dead letters: read {progress.read}, replayed {progress.matched}"
    if filters:
        line += f" ({'; '.join(filters)}), left alone {progress.read - progress.matched}"
    click.echo(line, err=True)
    failed_again = int(counts.get("dead_lettered", 0))
    malformed: list[tuple[int, str]] = list(getattr(opened[0], "malformed", [])) if opened else []
    if failed_again:
        click.echo(f"  failed again: {failed_again}, written to {target}", err=True)
    for number, reason in malformed:
        click.echo(f"  {name}:{number}: malformed, not replayed: {reason}", err=True)
    if kind == "file":
        click.echo(f"  {name} is unchanged", err=True)
    if code == EXIT_OK and (failed_again or malformed):
        code = EXIT_FAILURE
    if counts:
        verdict = "every letter replayed was delivered" if code == EXIT_OK else "some letters were not"
        click.echo(f"dead-letters replay ended: {verdict} (exit {code})", err=True)
    sys.exit(code)
