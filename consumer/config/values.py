"""Setting values: their parsers and the rules a single value must follow.

Each parser raises ValueError with the sentence an operator reads after the variable's name; ``ctsync
check`` calls the same functions, so a rule is written once.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Final, Literal, NamedTuple
from urllib.parse import SplitResult, urlsplit

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

from consumer.subscription import PUBSUB_TOPIC

KNOWN_REGIONS: Final = frozenset(
    {"us-central1.gcp", "us-east-2.aws", "europe-west1.gcp", "eu-central-1.aws", "australia-southeast1.gcp"}
)
SETTING_PREFIXES: Final = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUSH_", "PUBSUB_")
SECRET_VARIABLES: Final = ("CTP_CLIENT_SECRET", "IPAAS_WEBHOOK_API_KEY", "KAFKA_SASL_PASSWORD")
# These URLs may carry a password in their userinfo (a managed Redis, a hook behind basic auth).
URL_VARIABLES: Final = ("IPAAS_HOOK_URL", "CTSYNC_STATE_URL")
# Variables with our prefixes that are not settings: the test suite's switch (.ci), gcloud's emulator env,
# Kafka's scripts. Reporting them as typos would train operators to ignore the warning.
FOREIGN_VARIABLES: Final = frozenset(
    {
        "CTSYNC_REQUIRE_SERVERS",
        "PUBSUB_PROJECT_ID",
        "KAFKA_HOME",
        "KAFKA_OPTS",
        "KAFKA_HEAP_OPTS",
        "KAFKA_JVM_PERFORMANCE_OPTS",
        "KAFKA_LOG4J_OPTS",
        "KAFKA_JMX_OPTS",
    }
)
# iPaaS.com publishes no per-request limit for the hook. A batch is retried, and bisected on 400/422, as one
# unit: 1000 notifications keep a request body near 100 KB and a bisection within about ten rounds, and stay
# well under the 3,000 ids iPaaS.com's own manual sync accepts per submission.
MAX_BATCH_SIZE: Final = 1000
# Commands that cannot work without these settings; the others ignore what they do not use.
COMMERCETOOLS_API: Final = (
    "CTP_PROJECT_KEY",
    "CTP_CLIENT_ID",
    "CTP_CLIENT_SECRET",
    "CTP_AUTH_URL",
    "CTP_API_URL",
)
REQUIRED_FOR: Final[Mapping[str, tuple[str, ...]]] = {
    "run": ("CTSYNC_SOURCE",),
    "subscription": COMMERCETOOLS_API,
    "backfill": COMMERCETOOLS_API,
    "reconcile": COMMERCETOOLS_API,
}
# iPaaS.com's webhook keys are long random strings; a short one is a truncated paste, and too short to be
# told apart from ordinary text when output is redacted.
MIN_WEBHOOK_KEY_LENGTH: Final = 16
EXAMPLE_REGION: Final = "europe-west1.gcp"
SECRET_MIN_SCRUB: Final = 4
MAX_ECHO: Final = 80
# A rejected value sharing this many characters in a row with a secret is not echoed: it is most likely
# the secret with a typo or a stray character.
SECRET_RUN: Final = 8

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
OffsetReset = Literal["earliest", "latest"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
AuditSwitch = Literal["on", "off"]


class ConfigError(Exception):
    """Bad configuration: ``problems`` holds one line per problem, each starting with the variable's name."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class ListenAddress(NamedTuple):
    """A ``host:port`` to listen on; port 0 asks the OS for a free port (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """Where ``run`` reads deliveries from: a broker kind, or a JSONL file (``path`` is absolute)."""

    kind: Literal["kafka", "pubsub", "push", "file"]
    path: Path | None = None


@dataclass(frozen=True, slots=True)
class StateLocation:
    """Where dedupe state lives: in memory, in a SQLite file (absolute ``path``), or in Redis."""

    kind: Literal["memory", "sqlite", "redis"]
    path: Path | None = None
    host: str | None = None
    port: int | None = None
    db: int | None = None
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # The URL as given, for a Redis client's from_url; hidden from repr because it may hold the password.
    url: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class DeadLetterTarget:
    """Where dead letters go: a JSONL file (absolute ``path``), a Kafka topic, or a Pub/Sub topic path."""

    kind: Literal["file", "kafka", "pubsub"]
    path: Path | None = None
    topic: str | None = None


# --- parsing: pure functions; their messages never repeat the value, the caller decides what to show ---

_PORT = re.compile(r"[0-9]{1,5}")
KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
PUBSUB_SUBSCRIPTION = re.compile(r"projects/[^/\s]+/subscriptions/[^/\s]+")
SPACE = re.compile(r"\s")


def port_number(text: str) -> int | None:
    if _PORT.fullmatch(text) and int(text) <= 65535:
        return int(text)
    return None


def parse_listen_address(value: str) -> ListenAddress:
    """Parse ``host:port`` (``[v6]:port`` for IPv6 hosts)."""
    host, sep, port_text = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("must be host:port; write an IPv6 host in brackets, e.g. [::]:9000")
    port = port_number(port_text)
    if not sep or not host or SPACE.search(host) or port is None:
        raise ValueError("must be host:port with a port from 0 to 65535, e.g. 0.0.0.0:9000")
    return ListenAddress(host, port)


def is_loopback_host(host: str) -> bool:
    """Return whether ``host`` is this machine: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_url(value: str) -> SplitResult:
    """Split a URL, turning a bad port into a ValueError that does not quote the URL."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - evaluated for its ValueError on a bad port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    return parts


def url_password(value: str) -> str | None:
    try:
        return urlsplit(value).password or None
    except ValueError:
        return None


def commercetools_region(url: str) -> str | None:
    """Return the region of an ``https://api|auth.<region>.commercetools.com`` URL, or None for other URLs."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return None
    suffix = ".commercetools.com"
    service, _, region = host.removesuffix(suffix).partition(".")
    if not host.endswith(suffix) or service not in ("api", "auth") or not region:
        return None
    return region


def commercetools_url(value: str, service: Literal["api", "auth"]) -> str:
    """Check a CTP_API_URL or CTP_AUTH_URL and return it without a trailing slash (clients append paths)."""
    url = value.rstrip("/")
    parts = split_url(url)
    host = parts.hostname or ""
    example = f"https://{service}.{EXAMPLE_REGION}.commercetools.com"
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"must be a URL like {example}")
    if host == "commercetools.com" or host.endswith(".commercetools.com"):
        labels = host.removesuffix("commercetools.com").rstrip(".").split(".")
        if labels in ([service], [""]):
            raise ValueError(
                f"not a regional URL; use the one for your project's region, e.g. {example} "
                f"(regions: {', '.join(sorted(KNOWN_REGIONS))})"
            )
        other = "auth" if service == "api" else "api"
        if labels[0] == other:
            raise ValueError(f"this is the {other} URL; CTP_{service.upper()}_URL must be like {example}")
        if labels[0] != service or len(labels) < 2:
            raise ValueError(f"must be https://{service}.<region>.commercetools.com, e.g. {example}")
        if parts.scheme != "https":
            raise ValueError(f"must use https, e.g. {example}")
        if parts.path or parts.query or parts.fragment:
            raise ValueError(f"must be the bare host without a path, e.g. {example}")
    elif parts.scheme != "https" and not is_loopback_host(host):
        # Any other host is a proxy or a mock server; plain http only makes sense on this machine.
        raise ValueError("must be an https:// URL (http:// is accepted only for localhost, 127.0.0.0/8, ::1)")
    return url


def hook_url(value: str) -> str:
    parts = split_url(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an https:// URL, e.g. https://hooks.ipaas.com/...")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("must be https:// (http:// is accepted only for localhost, 127.0.0.0/8, ::1)")
    return value


def absolute_path(path: Path, cwd: Path | None) -> Path:
    return path if path.is_absolute() else (cwd or Path.cwd()) / path


def file_path(rest: str, cwd: Path | None, example: str) -> Path:
    """Return the path of ``file:<path>`` or ``file:///<absolute path>``; ``rest`` follows ``file:``."""
    if rest.startswith("//"):
        host, slash, absolute = rest[2:].partition("/")
        if host not in ("", "localhost") or not slash:
            raise ValueError(f"file:// URLs need an absolute path, e.g. file:///var/lib/ctsync/{example}")
        rest = "/" + absolute
    if not rest or rest.endswith("/"):
        raise ValueError(f"needs a file path, e.g. file:{example}")
    path = absolute_path(Path(rest), cwd)
    if path.is_dir():
        raise ValueError("names a directory; give a file path")
    return path


BROKER_SOURCES: Final[Mapping[str, Literal["kafka", "pubsub", "push"]]] = {
    "kafka": "kafka",
    "pubsub": "pubsub",
    "push": "push",
}


def parse_source(value: str, cwd: Path | None = None) -> SourceSpec:
    """Parse CTSYNC_SOURCE: ``kafka``, ``pubsub``, ``push`` or ``file:<path>`` (relative to ``cwd``)."""
    text = value.strip()
    broker = BROKER_SOURCES.get(text.lower())
    if broker is not None:
        return SourceSpec(broker)
    scheme, sep, rest = text.partition(":")
    if sep and scheme.lower() == "file":
        return SourceSpec("file", file_path(rest, cwd, "payloads.jsonl"))
    raise ValueError("must be kafka, pubsub, push or file:<path>")


def parse_state_url(value: str, cwd: Path | None = None) -> StateLocation:
    """Parse CTSYNC_STATE_URL; a relative SQLite path resolves against ``cwd``.

    Accepted: ``memory://``, ``sqlite:///<relative path>``, ``sqlite:////<absolute path>``,
    ``redis://[user:password@]host[:port][/db]`` and ``rediss://`` (TLS).
    """
    url = value.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "memory" and not rest:
        return StateLocation("memory")
    if sep and scheme == "sqlite":
        # SQLAlchemy's convention: the path starts after the third slash, so a fourth makes it absolute.
        if not rest.startswith("/") or len(rest) < 2 or rest.endswith("/"):
            raise ValueError(
                "must be sqlite:///<relative path> or sqlite:////<absolute path>, e.g. sqlite:///ctsync-state.db"
            )
        path = absolute_path(Path(rest[1:]), cwd)
        if path.is_dir():
            raise ValueError("names a directory; give a database file path")
        return StateLocation("sqlite", path=path)
    if sep and scheme in ("redis", "rediss"):
        parts = split_url(url)
        db_text = parts.path.strip("/") or "0"
        if not parts.hostname or not db_text.isascii() or not db_text.isdigit():
            raise ValueError("must be redis://host:port/db, e.g. redis://127.0.0.1:6379/0")
        return StateLocation(
            "redis",
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(db_text),
            tls=scheme == "rediss",
            username=parts.username or None,
            password=parts.password or None,
            url=url,
        )
    raise ValueError("must be memory://, sqlite:///<path> or redis://host:port/db (rediss:// for TLS)")


def parse_dead_letter_url(value: str, cwd: Path | None = None) -> DeadLetterTarget:
    """Parse CTSYNC_DEAD_LETTER_URL; a relative file path resolves against ``cwd``.

    Accepted: ``file:<path>``, ``file:///<absolute path>``, ``kafka://<topic>``,
    ``pubsub://projects/<project>/topics/<topic>``.
    """
    url = value.strip()
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "file":
        return DeadLetterTarget("file", path=file_path(rest, cwd, "ctsync-dead-letters.jsonl"))
    if scheme == "kafka" and rest.startswith("//"):
        topic = rest[2:]
        if not is_kafka_topic(topic):
            raise ValueError("must be kafka://<topic>; a topic name uses letters, digits, '.', '_' and '-'")
        return DeadLetterTarget("kafka", topic=topic)
    if scheme == "pubsub" and rest.startswith("//"):
        topic = rest[2:]
        if not PUBSUB_TOPIC.fullmatch(topic):
            raise ValueError("must be pubsub://projects/<project>/topics/<topic>")
        return DeadLetterTarget("pubsub", topic=topic)
    raise ValueError("must be file:<path>, kafka://<topic> or pubsub://projects/<project>/topics/<topic>")


def is_kafka_topic(name: str) -> bool:
    return bool(KAFKA_TOPIC.fullmatch(name)) and name not in (".", "..")


def split_list(value: str | None, separator: str | None) -> list[str]:
    if value is None:
        return []
    return [item.strip() for item in value.split(separator) if item.strip()]


def upper_case(value: object) -> object:
    return value.strip().upper() if isinstance(value, str) else value


def lower_case(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def listen_address(value: object) -> object:
    return parse_listen_address(value) if isinstance(value, str) else value


# NoDecode: pydantic-settings would otherwise read a tuple-typed variable as JSON and fail on "0.0.0.0:9000".
Listen = Annotated[ListenAddress, NoDecode, BeforeValidator(listen_address)]
