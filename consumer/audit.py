"""The audit log: structlog set up for one JSON object per line, the event vocabulary, and redaction.

Every message's fate is one of the events below, so the log answers "what happened to this order?".
Event names are the contract's fixed strings; context is passed as fields, never formatted into text.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, BinaryIO, Final

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

MESSAGE_RECEIVED: Final = "message.received"
MESSAGE_INVALID: Final = "message.invalid"
MESSAGE_IGNORED: Final = "message.ignored"
MESSAGE_DUPLICATE: Final = "message.duplicate"
MESSAGE_STALE: Final = "message.stale"
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
DEAD_LETTER_RETRYING: Final = "dead_letter.retrying"
CONFIG_WARNING: Final = "config.warning"

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
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
# Shorter secret values would scrub innocent text; such values are still covered by field names.
_MIN_SCRUBBED_LENGTH = 4


class Redactor:
    """A structlog processor that removes secrets: by field name, by known value, and Bearer/Basic tokens.

    ``secrets`` are the actual values of the secret settings; any string field containing one has it
    replaced, so a secret that leaked into an exception message or a URL is still not written.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SCRUBBED_LENGTH}, key=len, reverse=True)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if key.lower() in SECRET_FIELDS and value is not None:
                event_dict[key] = REDACTED
            else:
                event_dict[key] = self._clean(value)
        return event_dict

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {
                k: REDACTED if isinstance(k, str) and k.lower() in SECRET_FIELDS else self._clean(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def scrub(self, text: str) -> str:
        """Return ``text`` with every known secret value and Bearer/Basic credential replaced."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "earer" in text or "asic" in text:
            text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
        return text


def _orjson_dumps(event_dict: MutableMapping[str, Any], **_: Any) -> bytes:
    return orjson.dumps(event_dict, default=str)


def configure(
    *,
    level: str = "INFO",
    log_format: str = "json",
    secrets: Iterable[str] = (),
    stream: BinaryIO | None = None,
) -> Redactor:
    """Set up structlog: JSON lines (or console text) on stdout, redacted; return the redactor."""
    redactor = Redactor(secrets)
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.format_exc_info,
        redactor,
    ]
    if log_format == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
        factory = structlog.BytesLoggerFactory(stream or sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    return redactor


def get_logger(name: str = "ctsync") -> Any:
    """Return the audit logger (a structlog bound logger)."""
    return structlog.get_logger(name)
