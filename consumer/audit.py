"""The audit log: structlog set up for one JSON object per line, the event vocabulary, and redaction.

Every message's fate is one of the events below, so the log answers "what happened to this order?".
Event names are the contract's fixed strings; context is passed as fields, never formatted into text.

Every line starts with ``timestamp``, ``severity`` (Cloud Logging's names: DEBUG, INFO, WARNING, ERROR,
CRITICAL), ``level`` (the contract's lower-case name, kept for the filters already written on it), ``event``
and ``message`` (the event name, or for a warning or an error the event name and its
reason), so Cloud Logging and the common shippers classify and summarise lines without configuration.
The audit events (``AUDIT_EVENTS``) have their own switch (``CTSYNC_AUDIT``): on, they are written
whatever ``CTSYNC_LOG_LEVEL`` says; off, those below WARNING are not written at all.

Secrets are removed once per written chunk of lines, by value (``Redactor.scrub_lines``): the per-message
events carry only field names ctsync chose, so nothing walks their names; the other events, whose fields
may hold foreign structures (headers, response bodies), also have secret-named fields blanked.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import re
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, BinaryIO, Final
from urllib.parse import urlsplit

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

MESSAGE_RECEIVED: Final = "message.received"
MESSAGE_INVALID: Final = "message.invalid"
MESSAGE_IGNORED: Final = "message.ignored"
MESSAGE_DUPLICATE: Final = "message.duplicate"
MESSAGE_STALE: Final = "message.stale"
# An entity's notification waits: another replica holds the claim on its resource.
NOTIFICATION_CLAIM_WAIT: Final = "notification.claim_wait"
# A claim this process held was taken by another replica (its lease lapsed, e.g. the state store was down).
CLAIM_LOST: Final = "claim.lost"
NOTIFICATION_COALESCED: Final = "notification.coalesced"
BATCH_SENT: Final = "batch.sent"
BATCH_RETRYING: Final = "batch.retrying"
MESSAGE_DEAD_LETTERED: Final = "message.dead_lettered"
MESSAGE_ACKED: Final = "message.acked"
MESSAGE_HANDED_BACK: Final = "message.handed_back"
SERVICE_STARTED: Final = "service.started"
SERVICE_STOPPING: Final = "service.stopping"
SERVICE_STOPPED: Final = "service.stopped"
SINK_UNUSABLE: Final = "sink.unusable"
SINK_RECOVERED: Final = "sink.recovered"
STATE_RETRYING: Final = "state.retrying"
STATE_RECOVERED: Final = "state.recovered"
DEAD_LETTER_RETRYING: Final = "dead_letter.retrying"
CONFIG_WARNING: Final = "config.warning"
PUSH_REJECTED: Final = "push.rejected"
PUSH_UNAUTHORIZED: Final = "push.unauthorized"
BACKFILL_STARTED: Final = "backfill.started"
BACKFILL_PAGE: Final = "backfill.page"
BACKFILL_CURSOR_SAVED: Final = "backfill.cursor_saved"
BACKFILL_TYPE_DONE: Final = "backfill.type_done"
BACKFILL_FINISHED: Final = "backfill.finished"
# A dry run's batch, logged instead of sent (consumer/cli/wiring.py).
DRY_RUN_WOULD_SEND: Final = "dry_run.would_send"

# The events that make the audit trail: a message's fate, a hook request's, the service's life. They are
# written whatever CTSYNC_LOG_LEVEL says while CTSYNC_AUDIT is on.
AUDIT_EVENTS: Final = frozenset(
    {
        MESSAGE_RECEIVED,
        MESSAGE_INVALID,
        MESSAGE_IGNORED,
        MESSAGE_DUPLICATE,
        MESSAGE_STALE,
        NOTIFICATION_CLAIM_WAIT,
        CLAIM_LOST,
        NOTIFICATION_COALESCED,
        BATCH_SENT,
        BATCH_RETRYING,
        MESSAGE_DEAD_LETTERED,
        MESSAGE_ACKED,
        MESSAGE_HANDED_BACK,
        SERVICE_STARTED,
        SERVICE_STOPPING,
        SERVICE_STOPPED,
        SINK_UNUSABLE,
        SINK_RECOVERED,
        BACKFILL_STARTED,
        BACKFILL_PAGE,
        BACKFILL_CURSOR_SAVED,
        BACKFILL_TYPE_DONE,
        BACKFILL_FINISHED,
        DRY_RUN_WOULD_SEND,
    }
)

REDACTED: Final = "[redacted]"

# Field names whose values are secrets wherever they appear, in any letter case.
SECRET_FIELDS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "client_secret",
        "ctp_client_secret",
        "api_key",
        "webhook_api_key",
        "ipaas_webhook_api_key",
        "password",
        "sasl_password",
        "kafka_sasl_password",
        "sasl_plain_password",
        "token",
        "access_token",
        "refresh_token",
        "secret",
    }
)
# A credential after "Bearer"/"Basic" that is not a configured secret (an access token the auth server
# issued, say) is recognised by its shape: long, and holding a digit or very long. Ordinary words after the
# scheme ("no Bearer token", "Basic authentication failed") stay readable.
_CREDENTIAL_AFTER_SCHEME = re.compile(
    r"(?i)\b(bearer|basic)(\s+)((?=[A-Za-z0-9._~+/=-]*\d)[A-Za-z0-9._~+/=-]{20,}|[A-Za-z0-9._~+/=-]{32,})"
)
# Secrets at least this long are scrubbed from the rendered line, a few C-level scans; shorter ones could
# match inside field names or JSON syntax, so they are scrubbed from each string value before rendering.
_RENDERED_SCRUB_LENGTH = 8
_process_secrets: tuple[str, ...] = ()


def display_url(value: str) -> str:
    """Return ``value`` without userinfo, query and fragment, the parts that may carry credentials."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return "<unparseable URL>"
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return value
    # Rebuilt by hand: urlunsplit drops the "//" of an empty host, turning sqlite:///x into sqlite:/x.
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """Return ``text`` with every secret value, of any length, and every credential-shaped word after
    ``Bearer``/``Basic`` replaced by ``[redacted]``.

    The one redaction of free text: log lines, dead-letter reasons, ``/readyz``, ``check`` output and error
    messages all go through it. ``secrets`` defaults to those the process configured (``configure``).
    """
    ordered = _process_secrets if secrets is None else _longest_first(secrets)
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "earer" in text or "asic" in text or "EARER" in text or "ASIC" in text:
        text = _CREDENTIAL_AFTER_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return text


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    # Longest first: a secret that contains another is replaced whole.
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


class Redactor:
    """Remove secrets from log lines: by field name before rendering, by value after it.

    Before rendering (``__call__``, a structlog processor for the events logged through structlog, whose
    fields may hold foreign structures) every field named like a secret, at any depth, is blanked. After
    rendering, every known secret value and Bearer/Basic credential is replaced, so a secret that leaked
    into an exception message, a URL or a response body is still not written: JSON lines by
    ``scrub_lines`` where ``AuditLines`` writes them (a few C-level scans per chunk of lines), console
    text by ``scrub_rendered``.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = _longest_first(secrets)
        self._short = tuple(s for s in self.secrets if len(s) < _RENDERED_SCRUB_LENGTH)
        long = [s for s in self.secrets if len(s) >= _RENDERED_SCRUB_LENGTH]
        # Both the raw form and the JSON-escaped form (a secret holding a quote or backslash is escaped).
        self._secret_bytes = sorted(
            {form for s in long for form in (s.encode(), orjson.dumps(s)[1:-1])},
            key=len,
            reverse=True,
        )
        self._redacted_bytes = REDACTED.encode()
        self._short_bytes = tuple({form for s in self._short for form in (s.encode(), orjson.dumps(s)[1:-1])})

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        # Top-level keys are our own keyword arguments: a set intersection finds secret names in any of
        # the usual spellings without lower-casing every key of every event.
        for key in event_dict.keys() & _SECRET_TOP_LEVEL:
            if event_dict[key] is not None:
                event_dict[key] = REDACTED
        for key, value in event_dict.items():
            if type(value) in _CONTAINERS:
                event_dict[key] = self._names(value)
        return event_dict

    def _short_values(self, value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, self._short) if any(s in value for s in self._short) else value
        if isinstance(value, dict):
            return {k: self._short_values(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._short_values(v) for v in value]
        return value

    def _names(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: REDACTED
                if isinstance(k, str) and k.lower() in SECRET_FIELDS
                else (self._names(v) if type(v) in _CONTAINERS else v)
                for k, v in value.items()
            }
        return [self._names(v) if type(v) in _CONTAINERS else v for v in value]

    def scrub(self, text: str) -> str:
        """Return ``text`` with every known secret value and Bearer/Basic credential replaced."""
        return redact(text, self.secrets)

    def scrub_rendered(self, logger: WrappedLogger, method_name: str, rendered: Any) -> Any:
        """Scrub a rendered line (bytes from the JSON renderer, str from the console one)."""
        if isinstance(rendered, str):
            return self.scrub(rendered)
        for secret in self._secret_bytes:
            if secret in rendered:
                rendered = rendered.replace(secret, self._redacted_bytes)
        if b"earer" in rendered or b"asic" in rendered or b"EARER" in rendered or b"ASIC" in rendered:
            rendered = redact(rendered.decode("utf-8", "replace"), ()).encode()
        return rendered

    def scrub_lines(self, chunk: bytes) -> bytes:
        """Return JSON lines with every known secret value and Bearer/Basic credential replaced.

        One C-level scan per secret over the whole chunk, however many lines it holds. A secret shorter
        than 8 characters could match inside a field name or the JSON syntax, so a line that holds one is
        parsed and only its values are scrubbed (the header's ``timestamp``, ``severity`` and ``event`` are
        ctsync's own words); that costs a parse, but only for lines where such a secret shows up.
        """
        for secret in self._secret_bytes:
            if secret in chunk:
                chunk = chunk.replace(secret, self._redacted_bytes)
        if self._short_bytes and any(secret in chunk for secret in self._short_bytes):
            chunk = b"".join(self._short_scrubbed(line) for line in chunk.splitlines(keepends=True))
        if _scheme_before_a_space(chunk):
            chunk = redact(chunk.decode("utf-8", "replace"), ()).encode()
        return chunk

    def _short_scrubbed(self, line: bytes) -> bytes:
        if not any(secret in line for secret in self._short_bytes):
            return line
        try:
            fields = orjson.loads(line)
        except orjson.JSONDecodeError:
            return redact(line.decode("utf-8", "replace"), self._short).encode()
        if type(fields) is not dict:
            return redact(line.decode("utf-8", "replace"), self._short).encode()
        for key, value in fields.items():
            if key not in _OWN_HEADER and not (key == "message" and value == fields.get("event")):
                fields[key] = self._short_values(value)
        return orjson.dumps(fields, option=_NEWLINE) if line.endswith(b"\n") else orjson.dumps(fields)


def _scheme_before_a_space(chunk: bytes) -> bool:
    """Return whether "Bearer " or "Basic " (any case) occurs in rendered JSON lines.

    In JSON every whitespace inside a string but the space is escaped, and orjson writes no space of its
    own, so a credential after its scheme always follows a space: the spaces are found with memchr, and
    only the few words before them are looked at. Scanning the whole chunk for "earer" and "asic" in four
    spellings cost about 1.2 µs per line.
    """
    find = chunk.find
    at = find(b" ")
    while at != -1:
        word = chunk[max(at - 6, 0) : at].lower()
        if word == b"bearer" or word.endswith(b"basic"):
            return True
        at = find(b" ", at + 1)
    return False


_CONTAINERS = (dict, list, tuple)
# Header fields whose values are ctsync's own words, never scrubbed (a short secret may match inside them).
_OWN_HEADER: Final = frozenset({"timestamp", "severity", "level", "event"})
_SECRET_TOP_LEVEL: Final = frozenset(
    form for name in SECRET_FIELDS for form in (name, name.upper(), name.title(), name.capitalize())
)


# structlog's method names -> Cloud Logging's severities (and the numbers of Python's levels).
_SEVERITY: Final = {
    "debug": "DEBUG",
    "info": "INFO",
    "msg": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "err": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
    "fatal": "CRITICAL",
}
_LEVEL_NUMBER: Final = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}
# A warning's or an error's message names its cause, from the first of these fields that is text.
_CAUSE_FIELDS: Final = ("reason", "error", "detail", "problem")


def iso_timestamp(nanoseconds: int) -> str:
    """Return ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` for a Unix time in nanoseconds.

    The part up to the second is formatted once per second: every event is stamped, and this is about
    a third cheaper than ``datetime.now(UTC).isoformat()``.
    """
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    global _stamped_second, _stamped_prefix
    if seconds != _stamped_second:
        _stamped_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds))
        _stamped_second = seconds
    return f"{_stamped_prefix}{rest // 1000:06d}Z"


_stamped_second = -1
_stamped_prefix = ""


def _severity(method_name: str) -> str:
    return _SEVERITY.get(method_name, "INFO")


def _message(event: str, severity: str, fields: MutableMapping[str, Any]) -> str:
    """The event name; for a warning or an error, followed by its cause when a field gives one."""
    if severity in ("DEBUG", "INFO"):
        return event
    for name in _CAUSE_FIELDS:
        cause = fields.get(name)
        if isinstance(cause, str) and cause:
            return f"{event}: {cause}"
    return event


def _gate(threshold: int, audit: bool) -> Processor:
    """Drop what is not written: audit events below WARNING follow the audit switch alone, everything
    else ``CTSYNC_LOG_LEVEL``."""

    def gate(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        level = _LEVEL_NUMBER[_severity(method_name)]
        if level < logging.WARNING and event_dict.get("event") in AUDIT_EVENTS:
            if audit:
                return event_dict
            raise structlog.DropEvent
        if level < threshold:
            raise structlog.DropEvent
        return event_dict

    return gate


def _header(console: bool) -> Processor:
    """Put ``timestamp``, ``severity``, ``event`` and ``message`` first, as the hot-path writer does (on the
    console: ``timestamp``, ``level`` and ``event``, the renderer's columns)."""

    def header(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        severity = _severity(method_name)
        event = str(event_dict.pop("event", ""))
        message = event_dict.pop("message", None)
        line: EventDict
        if console:
            # For people at a terminal: the renderer shows the level and the event as its own columns.
            line = {"timestamp": iso_timestamp(time.time_ns()), "level": severity.lower(), "event": event}
        else:
            line = {
                "timestamp": iso_timestamp(time.time_ns()),
                "severity": severity,
                "level": severity.lower(),
                "event": event,
                "message": message if isinstance(message, str) else _message(event, severity, event_dict),
            }
        line.update(event_dict)
        return line

    return header


def _orjson_dumps(event_dict: MutableMapping[str, Any], **_: Any) -> bytes:
    return orjson.dumps(event_dict, default=str)


def configure(
    *,
    level: str = "INFO",
    log_format: str = "json",
    secrets: Iterable[str] = (),
    stream: BinaryIO | None = None,
    audit: bool = True,
) -> Redactor:
    """Set up structlog: JSON lines (or console text) on stdout, redacted; return the redactor.

    ``level`` filters the log lines; ``audit`` says whether the audit events (``AUDIT_EVENTS``) are
    written: on, whatever ``level`` says; off, only those at WARNING and above, and only if ``level``
    lets them through.
    """
    global _audit_enabled, _info_writer, _process_secrets
    secrets = tuple(secrets)
    _process_secrets = _longest_first(secrets)
    threshold = _LEVEL_NUMBER[level.upper()]
    _audit_enabled = audit
    redactor = Redactor(secrets)
    _info_writer = None
    # No contextvars merging: ctsync binds context explicitly, and the processor costs every event.
    processors: list[Processor] = [
        _gate(threshold, audit),
        _header(log_format == "console"),
        structlog.processors.format_exc_info,
        redactor,
    ]
    if log_format == "console":
        processors += [structlog.dev.ConsoleRenderer(colors=False), redactor.scrub_rendered]
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        # The lines' values are scrubbed where they are written (AuditLines), once per chunk.
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
        lines = AuditLines(stream or sys.stdout.buffer, redactor)
        factory = lines.logger
        if audit:
            _info_writer = lines.write
    structlog.configure(
        processors=processors,
        # Audit events at INFO pass the bound logger's own filter; the gate decides.
        wrapper_class=structlog.make_filtering_bound_logger(
            min(threshold, logging.INFO) if audit else threshold
        ),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    return redactor


class AuditLines:
    """Write JSON lines to the audit stream: the hot path's INFO audit events straight from their fields,
    structlog's lines as rendered, in the order they were written.

    The per-message events (received, coalesced, acked) are most of the log's volume. ``write`` renders
    one with a single ``orjson.dumps`` of its fields behind a header prepared once per event name; it
    neither walks field names (they are ctsync's own, none names a secret) nor scans for secrets. Lines
    wait in a queue until the end of the event loop's turn (or until a structlog line comes, or at once
    outside a loop); then the whole chunk is scrubbed of secret values in one pass per secret
    (``Redactor.scrub_lines``), written and flushed. A burst of lines costs one scrub and one flush.
    """

    def __init__(self, stream: BinaryIO, redactor: Redactor) -> None:
        self._stream = stream
        self._redactor = redactor
        self._pending: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._flush_on: asyncio.AbstractEventLoop | None = None
        self._heads: dict[str, bytes] = {}
        _open_lines.add(self)

    def write(self, event: str, fields: dict[str, Any]) -> None:
        """Queue one INFO audit event; the function takes ownership of ``fields``, whose names must be
        ctsync's own (the values may be anything: they are scrubbed)."""
        head = self._heads.get(event)
        if head is None:
            head = self._heads[event] = _head(event)
        body = orjson.dumps(fields, default=str, option=_NEWLINE)
        pending = self._pending
        pending.append(b"".join((_OPEN, _stamp_bytes(), head, b"," + body[1:] if len(body) > 3 else b"}\n")))
        flush_on = self._flush_on
        if flush_on is not None and not flush_on.is_closed() and len(pending) < _MAX_PENDING:
            return  # this loop turn's flush is scheduled already
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if len(pending) >= _MAX_PENDING:
            self.flush()
        # Compared by identity, not a flag: a loop closed before its flush ran must not stall later ones.
        if loop is not flush_on:
            self._flush_on = loop
            loop.call_soon(self._flush_turn)

    def write_rendered(self, line: bytes) -> None:
        """Write a line structlog rendered, after the lines already queued."""
        self._pending.append(line + b"\n")
        self.flush()

    def logger(self, *args: Any) -> _RenderedLineLogger:
        """structlog's logger factory: loggers that write through this object."""
        return _RenderedLineLogger(self)

    def _flush_turn(self) -> None:
        self._flush_on = None
        self.flush()

    def flush(self) -> None:
        """Scrub, write and flush every queued line."""
        with self._lock:
            pending = self._pending
            count = len(pending)
            if not count:
                return
            chunk = b"".join([pending.popleft() for _ in range(count)])
            self._stream.write(self._redactor.scrub_lines(chunk))
            self._stream.flush()


class _RenderedLineLogger:
    """A structlog logger whose every method writes a rendered line through ``AuditLines``."""

    def __init__(self, lines: AuditLines) -> None:
        self._lines = lines

    def msg(self, message: bytes) -> None:
        self._lines.write_rendered(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def _head(event: str) -> bytes:
    name = orjson.dumps(event)
    return b'","severity":"INFO","level":"info","event":' + name + b',"message":' + name


def _stamp_bytes(time_ns: Callable[[], int] = time.time_ns) -> bytes:
    """The current time as ``iso_timestamp`` writes it, as bytes, without the quotes around it: the part
    up to the second formatted once per second, the microseconds from two table lookups."""
    micros = time_ns() // 1000
    seconds = micros // 1_000_000
    if seconds != _second[0]:
        _second[0] = seconds
        _second_prefix[0] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds)).encode()
    high, low = divmod(micros - seconds * 1_000_000, 1000)
    return _second_prefix[0] + _DIGITS[high] + _DIGITS_Z[low]


_OPEN: Final = b'{"timestamp":"'
_DIGITS: Final = tuple(b"%03d" % n for n in range(1000))
_DIGITS_Z: Final = tuple(b"%03dZ" % n for n in range(1000))
_second = [-1]
_second_prefix = [b""]
# Lines queued in one loop turn at most before they are written (bounds memory in a long turn).
_MAX_PENDING: Final = 4096
_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE
_audit_enabled = True
_info_writer: Callable[[str, dict[str, Any]], None] | None = None
# Lines still queued when the process exits (a loop closed before its turn ended) are written then.
_open_lines: weakref.WeakSet[AuditLines] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for lines in list(_open_lines):
        with contextlib.suppress(OSError, ValueError):  # the stream is closed already
            lines.flush()


def info_writer() -> Callable[[str, dict[str, Any]], None] | None:
    """Return a function writing one INFO audit event (name, fields) as a JSON line, for hot paths; None
    when audit events are off or lines are not JSON (then log through ``get_logger`` as usual). The
    function takes ownership of the fields dict; the field names must be ctsync's own."""
    return _info_writer


def info_enabled() -> bool:
    """Return whether INFO audit events are written (``CTSYNC_AUDIT``), so a hot path can skip building
    the ones that are not."""
    return _audit_enabled


def get_logger(name: str = "ctsync") -> Any:
    """Return the audit logger (a structlog bound logger)."""
    return structlog.get_logger(name)
