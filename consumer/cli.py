"""The ``ctsync`` command line. Exit codes: 0 success (a clean stop included), 1 runtime failure, 2 bad
configuration or usage."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from consumer import app, audit
from consumer import backfill as bf
from consumer.config import ConfigError, Settings, load_settings, unknown_variables
from consumer.pipeline import SinkUnusable
from consumer.ports import Envelope, Fetched, HookResponse, Source, StateStore, StateView
from consumer.routing import Notification, ScopeMapError

if TYPE_CHECKING:
    from adapters.commercetools import CommercetoolsClient

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


def _settings(env_file: Path | None, command: str) -> Settings:
    if env_file is not None and not env_file.is_file():
        _config_failure([f"--env-file: {env_file} does not exist or is not a file"])
    try:
        settings = load_settings(env_file, for_command=command)
    except ConfigError as exc:
        _config_failure(exc.problems)
    audit.configure(
        level=settings.ctsync_log_level,
        log_format=settings.ctsync_log_format,
        secrets=settings.secret_values(),
    )
    for name in unknown_variables(os.environ):
        audit.get_logger().warning(audit.CONFIG_WARNING, variable=name, reason="not a ctsync setting (typo?)")
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctsync")
def main() -> None:
    """Keep iPaaS.com in step with commercetools: Subscription deliveries in, hook notifications out."""


@main.command()
@ENV_FILE
@click.option("--follow", is_flag=True, help="With a file: source, keep reading lines appended later.")
def run(env_file: Path | None, follow: bool) -> None:
    """Run the service: consume, deliver, ack, until SIGTERM/SIGINT; then drain and stop."""
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


async def _serve(
    settings: Settings, open_source: Callable[[], Awaitable[Source]], *, command: str, finite: bool
) -> int:
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
        return EXIT_FAILURE
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
        return EXIT_FAILURE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            stop.set()
        else:
            # A second signal: stop waiting for the drain; what is in flight is handed back.
            built.pipeline.abandon()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    endpoints = None
    if command == "run" and not finite:
        from adapters.endpoints import open_endpoints

        try:
            endpoints = await open_endpoints(settings.http_listen, built.pipeline, source)
        except OSError as exc:
            await built.aclose()
            log.error(audit.SERVICE_STOPPED, command=command, error=str(exc))
            click.echo(f"ctsync: {exc}", err=True)
            return EXIT_FAILURE
    started = time.monotonic()
    log.info(audit.SERVICE_STARTED, command=command, source=source.name, **settings.summary())
    code = EXIT_OK
    error: str | None = None
    try:
        await built.pipeline.run(stop)
    except SinkUnusable as exc:
        code, error = EXIT_FAILURE, str(exc)
    except Exception as exc:
        code, error = EXIT_FAILURE, f"{type(exc).__name__}: {exc}"
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if endpoints is not None:
            await endpoints.close()
        await built.aclose()
    counts_dict = built.pipeline.counts.as_dict()
    fields: dict[str, Any] = {
        "command": command,
        "duration_s": round(time.monotonic() - started, 3),
        "signal": signal.Signals(signals_seen[0]).name if signals_seen else None,
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
    return code


# --- operator commands: check, subscription ensure, audit, dead-letters replay ---


def _configure_stderr_audit(settings: Settings | None, secrets: list[str]) -> None:
    # These commands print their own output on stdout (and JSON with --json), so the adapters' log lines go
    # to stderr instead.
    audit.configure(
        level=settings.ctsync_log_level if settings is not None else "WARNING",
        log_format=settings.ctsync_log_format if settings is not None else "json",
        secrets=secrets,
        stream=sys.stderr.buffer,
    )


def _raw_values(env_file: Path | None) -> dict[str, str]:
    """Return the settings' values as given (env file, then the environment), without checking them."""
    from dotenv import dotenv_values

    from consumer.config import SETTING_VARIABLES

    values: dict[str, str] = {}
    if env_file is not None:
        values.update({k: v for k, v in dotenv_values(env_file).items() if k in SETTING_VARIABLES and v})
    values.update({k: v for k, v in os.environ.items() if k in SETTING_VARIABLES and v.strip()})
    return values


def _load_for_check(values: dict[str, str]) -> tuple[Settings | None, list[str]]:
    """Load settings, collecting problems instead of exiting; retry without each variable reported bad."""
    try:
        return load_settings(environ=values, for_command="check"), []
    except ConfigError as exc:
        problems = exc.problems
    bad = {problem.split(":", 1)[0] for problem in problems}
    try:
        return load_settings(
            environ={k: v for k, v in values.items() if k not in bad}, for_command="check"
        ), problems
    except ConfigError:
        return None, problems


@main.command()
@ENV_FILE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for tools) instead of lines.")
def check(env_file: Path | None, as_json: bool) -> None:
    """Verify an installation: settings, region, token, scopes, project, hook, source. Exit 0 if all pass."""
    import orjson

    from consumer import checks
    from consumer.config import SECRET_VARIABLES

    if env_file is not None and not env_file.is_file():
        _config_failure([f"--env-file: {env_file} does not exist or is not a file"])
    values = _raw_values(env_file)
    settings, problems = _load_for_check(values)
    _configure_stderr_audit(settings, [values[name] for name in SECRET_VARIABLES if name in values])
    unknown = unknown_variables(os.environ, env_file)
    results = asyncio.run(checks.run_checks(settings, values, problems, unknown))
    if as_json:
        click.echo(orjson.dumps(checks.render_json(results), option=orjson.OPT_INDENT_2).decode())
    else:
        for line in checks.render_text(results):
            click.echo(line)
    sys.exit(checks.exit_code(results))


@main.group()
def subscription() -> None:
    """Manage the commercetools Subscription that feeds ctsync."""


def _operator_settings(env_file: Path | None, command: str) -> Settings:
    if env_file is not None and not env_file.is_file():
        _config_failure([f"--env-file: {env_file} does not exist or is not a file"])
    try:
        settings = load_settings(env_file, for_command=command)
    except ConfigError as exc:
        _config_failure(exc.problems)
    _configure_stderr_audit(settings, settings.secret_values())
    return settings


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
            _config_failure(
                [
                    "--pubsub-topic: required for a Pub/Sub destination: projects/<project>/topics/<topic>, "
                    "the topic PUBSUB_SUBSCRIPTION is attached to (or use --destination confluent)"
                ]
            )
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
        _config_failure(problems)
    assert settings.kafka_sasl_username is not None and settings.kafka_sasl_password is not None
    return confluent_destination(
        servers[0],
        kafka_topic or topics[0],
        settings.kafka_sasl_username,
        settings.kafka_sasl_password.get_secret_value(),
        kafka_key,
    )


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

    settings = _operator_settings(env_file, "dry-run" if dry_run else "subscription ensure")
    try:
        types = list(app.router(settings).scope_map.types)
        destination = _destination(settings, kind, pubsub_topic, kafka_topic, kafka_key)
        draft = sub.build_draft(
            types, destination, key=key, fmt="CloudEvents" if fmt == "CloudEvents" else "Platform"
        )
    except ScopeMapError as exc:
        _config_failure([f"IPAAS_SCOPE_MAP: {p}" for p in exc.problems])
    except sub.SubscriptionError as exc:
        _config_failure([str(exc)])
    if dry_run:
        click.echo(orjson.dumps(sub.masked(draft), option=orjson.OPT_INDENT_2).decode())
        return
    sys.exit(asyncio.run(_ensure(settings, draft)))


async def _ensure(settings: Settings, draft: dict[str, Any]) -> int:
    from adapters.commercetools import CommercetoolsClient, CommercetoolsError
    from consumer import subscription as sub

    key = str(draft["key"])
    try:
        async with CommercetoolsClient.from_settings(settings) as client:
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
    except CommercetoolsError as exc:
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


@main.command("audit")
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
        _usage_failure(f"give at most one of {', '.join(chosen)}")
    try:
        start = q.parse_bound(since) if since else None
        end = q.parse_bound(until) if until else None
    except ValueError as exc:
        _usage_failure(f"--since/--until: {exc}")
    reading = q.Reading()
    for path in files or (Path("-"),):
        if str(path) == "-":
            q.read_events(sys.stdin.buffer, "<stdin>", reading)
            continue
        try:
            with path.open("rb") as file:
                q.read_events(file, str(path), reading)
        except OSError as exc:
            _usage_failure(f"cannot read {path}: {exc.strerror}")
    events = q.in_range(reading.events, start, end)
    if resource_id or message_key or correlation_id:
        if resource_id:
            story, query = q.story_of_resource(events, resource_id), {"resource_id": resource_id}
        elif message_key:
            story, query = q.story_of_message_key(events, message_key), {"message_key": message_key}
        else:
            assert correlation_id is not None
            story, query = (
                q.story_of_correlation_id(events, correlation_id),
                {"correlation_id": correlation_id},
            )
        if as_json:
            payload = {"query": query, "count": len(story), "events": q.events_json(story)}
            click.echo(orjson.dumps(payload, default=str).decode())
        elif story:
            for line in q.story_lines(story):
                click.echo(line)
        else:
            click.echo(f"no events for {next(iter(query.values()))}", err=True)
        return
    counts = q.count(events)
    if as_json:
        click.echo(orjson.dumps({**counts.as_json(), "skipped_lines": reading.skipped}).decode())
    else:
        for line in q.count_lines(counts):
            click.echo(line)
        if reading.skipped:
            click.echo(f"({reading.skipped} lines were not audit events)", err=True)


def _usage_failure(message: str) -> NoReturn:
    click.echo(f"ctsync: {message}", err=True)
    sys.exit(EXIT_CONFIG)


@main.group("dead-letters")
def dead_letters() -> None:
    """Work with dead letters after a fix."""


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


class _DeadLetterFile:
    """Read a dead-letter (or payload) file up to the size it had when opened.

    New dead letters of this very replay may be appended to the same file; stopping at the snapshot size
    keeps the replay finite instead of reading its own output forever.
    """

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("rb")
        self._end = os.fstat(self._file.fileno()).st_size
        self._line = 0

    def _read(self, max_count: int) -> list[Envelope]:
        from adapters.files import original_payload

        envelopes: list[Envelope] = []
        while len(envelopes) < max_count:
            left = self._end - self._file.tell()
            if left <= 0:
                break
            raw = self._file.readline(left)
            if not raw:
                break
            self._line += 1
            line = raw.strip()
            if not line:
                continue
            body, record = original_payload(line)
            fields: dict[str, object] = {"file": str(self.path), "line": self._line}
            if record is not None:
                fields["dead_letter_reason"] = record.get("reason")
                fields["dead_letter_time"] = record.get("time")
                fields["original_position"] = record.get("position")
            envelopes.append(Envelope(body=body, position=f"{self.path}:{self._line}", source_fields=fields))
        return envelopes

    async def fetch(self, max_count: int) -> Fetched:
        envelopes = await asyncio.to_thread(self._read, max_count)
        done = self._file.tell() >= self._end
        return Fetched(envelopes, more_ready=not done, exhausted=done)

    async def close(self) -> None:
        self._file.close()


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
@click.argument("location")
def dead_letters_replay(
    env_file: Path | None, reasons: tuple[str, ...], since: str | None, until: str | None, location: str
) -> None:
    """Feed dead letters through the pipeline again; what fails again is dead-lettered again.

    LOCATION is a file (what CTSYNC_DEAD_LETTER_URL=file:... wrote), kafka://<topic>, or a Pub/Sub
    subscription projects/<project>/subscriptions/<subscription> on the dead-letter topic.
    """
    from consumer.audit_query import parse_bound

    try:
        start = parse_bound(since) if since else None
        end = parse_bound(until) if until else None
        kind, name = _dead_letter_location(location)
    except ValueError as exc:
        _usage_failure(f"{exc}")
    if kind == "file" and not Path(name).is_file():
        _usage_failure(f"{location}: no such file")
    settings = _settings(env_file, "dead-letters replay")
    progress = _Progress("dead letters")
    keep = _dead_letter_filter(reasons, start, end, datetime.now(UTC))

    async def open_source() -> Source:
        inner: Source
        try:
            if kind == "file":
                inner = _DeadLetterFile(Path(name))
            elif kind == "kafka":
                from adapters import kafka

                inner = await kafka.open_dead_letter_source(settings, name)
            else:
                from adapters import pubsub

                inner = await pubsub.open_dead_letter_source(settings, name)
        except LookupError as exc:
            raise ConnectionError(str(exc)) from None
        return _FilteringSource(inner, keep, progress)

    code = asyncio.run(_serve(settings, open_source, command="dead-letters replay", finite=True))
    filters = [f"reason contains {' or '.join(map(repr, reasons))}"] if reasons else []
    filters += [f"since {start.isoformat()}"] if start else []
    filters += [f"until {end.isoformat()}"] if end else []
    line = f"dead letters: read {progress.read}, replayed {progress.matched}"
    if filters:
        line += f" ({'; '.join(filters)}), left alone {progress.read - progress.matched}"
    click.echo(line, err=True)
    if kind == "file":
        click.echo(
            f"  {name} is unchanged; dead letters that failed again were appended to "
            f"{settings.ctsync_dead_letter_url}",
            err=True,
        )
    sys.exit(code)


# --- initial load and reconciliation: backfill, reconcile ---

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


@main.command()
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


@main.command()
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
        _usage_failure(f"--since/--until: {exc}")
    if start is not None and end is not None and start >= end:
        _usage_failure("--since must be before --until")
    settings = _settings(env_file, command)
    if dry_run:
        # stdout carries what would be notified; the audit log goes to stderr.
        _configure_stderr_audit(settings, settings.secret_values())
    try:
        routed = app.router(settings).scope_map.types
    except ScopeMapError as exc:
        _config_failure([f"IPAAS_SCOPE_MAP: {p}" for p in exc.problems])
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


class _ReadOnlyState:
    """The dry run's state: the real delivered state is read (so it shows what would really be skipped) and
    never written."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner

    async def lookup(self, message_keys: Collection[str], resource_keys: Collection[str]) -> StateView:
        return await self.inner.lookup(message_keys, resource_keys)

    async def record_delivered(
        self, message_keys: Collection[str], watermarks: Mapping[str, int], ttl_seconds: float
    ) -> None:
        return None

    async def close(self) -> None:
        return None


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _subscription_health(client: CommercetoolsClient) -> None:
    from adapters.commercetools import CommercetoolsError

    try:
        found = [s async for page in client.query_pages("subscriptions") for s in page]
    except CommercetoolsError as exc:
        click.echo(f"warning: cannot read the subscriptions' health: {exc}", err=True)
        return
    for line, _warning in bf.subscription_report(found):
        click.echo(line, err=True)


async def _sweep(settings: Settings, plan: _SweepPlan) -> int:
    from adapters.commercetools import CommercetoolsClient
    from adapters.cursor_store import open_cursor_store

    log = audit.get_logger()
    try:
        client = CommercetoolsClient.from_settings(settings)
    except ValueError as exc:
        _config_failure([str(exc)])
    try:
        if plan.command == "reconcile":
            await _subscription_health(client)
        try:
            cursors = await open_cursor_store(settings)
        except (OSError, ImportError) as exc:
            click.echo(f"ctsync: cannot open the cursor store: {_describe_runtime(exc)}", err=True)
            return EXIT_FAILURE
        try:
            return await _sweep_with(settings, plan, client, cursors, log)
        finally:
            await cursors.close()
    finally:
        await client.aclose()


async def _sweep_with(
    settings: Settings, plan: _SweepPlan, client: CommercetoolsClient, cursors: bf.CursorStore, log: Any
) -> int:
    from adapters.backfill import BackfillSource
    from consumer.dedupe import Deduplicator
    from consumer.throttle import LocalThrottleStore, Throttle, ThrottleLimits

    key = bf.run_key(plan.command, plan.mode, plan.since, plan.until)
    source = BackfillSource(
        client.query_pages,
        plan.types,
        project_key=client.project_key,
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
    try:
        built = await app.build(settings, source, finite=True)
    except (app.UnsupportedSetting, ScopeMapError) as exc:
        await source.close()
        problems = getattr(exc, "problems", None)
        _config_failure([f"IPAAS_SCOPE_MAP: {p}" for p in problems] if problems else [str(exc)])
    except OSError as exc:
        await source.close()
        click.echo(f"ctsync: {_describe_runtime(exc)}", err=True)
        return EXIT_FAILURE
    pipeline = built.pipeline
    if plan.dry_run:
        limits = ThrottleLimits(limit=1_000_000, window_seconds=1.0, connections=10, batch_executions=10)
        pipeline.throttle = Throttle(LocalThrottleStore(limits), limits)
        pipeline.sink = _PrintSink()
        dedupe = pipeline.deduplicator
        pipeline.deduplicator = Deduplicator(_ReadOnlyState(dedupe.store), dedupe.ttl_seconds)
    else:
        limits = bf.share_limits(app.throttle_limits(settings), plan.share)
        pipeline.throttle = Throttle(bf.ShareThrottleStore(pipeline.throttle.store, limits), limits)
    ceiling = 0.0 if plan.dry_run else bf.ceiling_per_minute(limits, settings.ipaas_batch_size)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            stop.set()
        else:
            pipeline.abandon()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    started = time.monotonic()
    summary = settings.summary()
    summary["dry_run"] = plan.dry_run or bool(summary.get("dry_run"))
    log.info(
        audit.SERVICE_STARTED,
        command=plan.command,
        source=source.name,
        types=plan.types,
        budget_share=plan.share,
        **summary,
    )

    def line() -> str:
        return bf.progress_line(
            type_id=source.current_type,
            counts=source.counts,
            types_total=len(plan.types),
            notified=pipeline.counts.notifications_sent,
            queued=len(pipeline.outbox),
            elapsed=time.monotonic() - started,
            ceiling_per_min=ceiling,
        )

    progress = asyncio.ensure_future(_draw_progress(line)) if sys.stderr.isatty() else None
    code, error = EXIT_OK, None
    try:
        await pipeline.run(stop)
    except SinkUnusable as exc:
        code, error = EXIT_FAILURE, str(exc)
    except Exception as exc:
        first = _first_error(exc)
        code, error = EXIT_FAILURE, f"{type(first).__name__}: {first}"
    finally:
        if progress is not None:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
            sys.stderr.write("\r\x1b[K")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await built.aclose()
    elapsed = time.monotonic() - started
    counts = pipeline.counts.as_dict()
    fields: dict[str, Any] = {
        "command": plan.command,
        "duration_s": round(elapsed, 3),
        "signal": signal.Signals(signals_seen[0]).name if signals_seen else None,
        "pages": source.counts.pages,
        "resources": source.counts.resources,
        **counts,
    }
    if error is not None:
        log.error(audit.SERVICE_STOPPED, error=error, **fields)
        click.echo(f"ctsync: {error}", err=True)
    else:
        log.info(audit.SERVICE_STOPPED, **fields)
    lines = bf.summary_lines(
        types=plan.types,
        counts=source.counts,
        per_type=source.per_type,
        notified=pipeline.counts.notifications_sent,
        elapsed=elapsed,
        ceiling_per_min=ceiling,
    )
    for text in lines + app.summary_lines(counts)[1:]:
        click.echo(text, err=True)
    complete = [t for t, tracker in source.trackers.items() if tracker.complete] + source.already_complete
    left = [t for t in plan.types if t not in complete]
    if left and not plan.dry_run:
        click.echo(f"  not complete: {', '.join(left)}; run the same command again to resume", err=True)
    return code


async def _draw_progress(line: Callable[[], str], interval: float = 0.5) -> None:
    while True:
        await asyncio.sleep(interval)
        sys.stderr.write(f"\r{line()}\x1b[K")
        sys.stderr.flush()


if __name__ == "__main__":
    main()
