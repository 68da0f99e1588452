"""Settings: every environment variable of the contract, parsed and checked, every problem reported at once.

``load_settings`` is the entry point: it reads an optional ``.env`` file and the environment (the environment
wins), validates each variable, then checks the settings that only make sense together, and raises one
``ConfigError`` listing every problem, one line each, starting with the variable's name. Problem lines never
contain a secret, not even when a secret was pasted into the wrong variable.

An empty or blank value counts as unset. A dry run is only ever explicit (``CTSYNC_DRY_RUN=true`` or
``ctsync run --dry-run``): ``run`` with a source and no ``IPAAS_HOOK_URL`` is a configuration error, because a
misspelt or forgotten hook URL would otherwise consume the stream without sending anything.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from difflib import SequenceMatcher, get_close_matches
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple, get_args, get_origin
from urllib.parse import SplitResult, urlsplit

import annotated_types
from dotenv import dotenv_values
from pydantic import BeforeValidator, Field, PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, InitSettingsSource, NoDecode, SettingsConfigDict

KNOWN_REGIONS: Final = frozenset(
    {"us-central1.gcp", "us-east-2.aws", "europe-west1.gcp", "eu-central-1.aws", "australia-southeast1.gcp"}
)
SETTING_PREFIXES: Final = ("CTSYNC_", "IPAAS_", "CTP_", "KAFKA_", "PUSH_", "PUBSUB_")
SECRET_VARIABLES: Final = ("CTP_CLIENT_SECRET", "IPAAS_WEBHOOK_API_KEY", "KAFKA_SASL_PASSWORD")
# These URLs may carry a password in their userinfo (a managed Redis, a hook behind basic auth).
_URL_VARIABLES: Final = ("IPAAS_HOOK_URL", "CTSYNC_STATE_URL")
# Variables with our prefixes that are not settings: the test suite's switch (.ci), gcloud's emulator env,
# Kafka's scripts. Reporting them as typos would train operators to ignore the warning.
_FOREIGN_VARIABLES: Final = frozenset(
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
_COMMERCETOOLS_API: Final = (
    "CTP_PROJECT_KEY",
    "CTP_CLIENT_ID",
    "CTP_CLIENT_SECRET",
    "CTP_AUTH_URL",
    "CTP_API_URL",
)
_REQUIRED_FOR: Final[Mapping[str, tuple[str, ...]]] = {
    "run": ("CTSYNC_SOURCE",),
    "subscription": _COMMERCETOOLS_API,
    "backfill": _COMMERCETOOLS_API,
    "reconcile": _COMMERCETOOLS_API,
}
# iPaaS.com's webhook keys are long random strings; a short one is a truncated paste, and too short to be
# told apart from ordinary text when output is redacted.
MIN_WEBHOOK_KEY_LENGTH: Final = 16
_EXAMPLE_REGION: Final = "europe-west1.gcp"
_SECRET_MIN_SCRUB: Final = 4
_MAX_ECHO: Final = 80
# A rejected value sharing this many characters in a row with a secret is not echoed: it is most likely
# the secret with a typo or a stray character.
_SECRET_RUN: Final = 8

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
_KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_PUBSUB_SUBSCRIPTION = re.compile(r"projects/[^/\s]+/subscriptions/[^/\s]+")
_PUBSUB_TOPIC = re.compile(r"projects/[^/\s]+/topics/[^/\s]+")
_SPACE = re.compile(r"\s")


def _port(text: str) -> int | None:
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
    port = _port(port_text)
    if not sep or not host or _SPACE.search(host) or port is None:
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


def _split_url(value: str) -> SplitResult:
    """Split a URL, turning a bad port into a ValueError that does not quote the URL."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - evaluated for its ValueError on a bad port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    return parts


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


def _url_password(value: str) -> str | None:
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


def _commercetools_url(value: str, service: Literal["api", "auth"]) -> str:
    """Check a CTP_API_URL or CTP_AUTH_URL and return it without a trailing slash (clients append paths)."""
    url = value.rstrip("/")
    parts = _split_url(url)
    host = parts.hostname or ""
    example = f"https://{service}.{_EXAMPLE_REGION}.commercetools.com"
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


def _hook_url(value: str) -> str:
    parts = _split_url(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an https:// URL, e.g. https://hooks.ipaas.com/...")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError("must be https:// (http:// is accepted only for localhost, 127.0.0.0/8, ::1)")
    return value


def _absolute(path: Path, cwd: Path | None) -> Path:
    return path if path.is_absolute() else (cwd or Path.cwd()) / path


def _file_path(rest: str, cwd: Path | None, example: str) -> Path:
    """Return the path of ``file:<path>`` or ``file:///<absolute path>``; ``rest`` follows ``file:``."""
    if rest.startswith("//"):
        host, slash, absolute = rest[2:].partition("/")
        if host not in ("", "localhost") or not slash:
            raise ValueError(f"file:// URLs need an absolute path, e.g. file:///var/lib/ctsync/{example}")
        rest = "/" + absolute
    if not rest or rest.endswith("/"):
        raise ValueError(f"needs a file path, e.g. file:{example}")
    path = _absolute(Path(rest), cwd)
    if path.is_dir():
        raise ValueError("names a directory; give a file path")
    return path


_BROKER_SOURCES: Final[Mapping[str, Literal["kafka", "pubsub", "push"]]] = {
    "kafka": "kafka",
    "pubsub": "pubsub",
    "push": "push",
}


def parse_source(value: str, cwd: Path | None = None) -> SourceSpec:
    """Parse CTSYNC_SOURCE: ``kafka``, ``pubsub``, ``push`` or ``file:<path>`` (relative to ``cwd``)."""
    text = value.strip()
    broker = _BROKER_SOURCES.get(text.lower())
    if broker is not None:
        return SourceSpec(broker)
    scheme, sep, rest = text.partition(":")
    if sep and scheme.lower() == "file":
        return SourceSpec("file", _file_path(rest, cwd, "payloads.jsonl"))
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
        path = _absolute(Path(rest[1:]), cwd)
        if path.is_dir():
            raise ValueError("names a directory; give a database file path")
        return StateLocation("sqlite", path=path)
    if sep and scheme in ("redis", "rediss"):
        parts = _split_url(url)
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
        return DeadLetterTarget("file", path=_file_path(rest, cwd, "ctsync-dead-letters.jsonl"))
    if scheme == "kafka" and rest.startswith("//"):
        topic = rest[2:]
        if not _is_kafka_topic(topic):
            raise ValueError("must be kafka://<topic>; a topic name uses letters, digits, '.', '_' and '-'")
        return DeadLetterTarget("kafka", topic=topic)
    if scheme == "pubsub" and rest.startswith("//"):
        topic = rest[2:]
        if not _PUBSUB_TOPIC.fullmatch(topic):
            raise ValueError("must be pubsub://projects/<project>/topics/<topic>")
        return DeadLetterTarget("pubsub", topic=topic)
    raise ValueError("must be file:<path>, kafka://<topic> or pubsub://projects/<project>/topics/<topic>")


def _is_kafka_topic(name: str) -> bool:
    return bool(_KAFKA_TOPIC.fullmatch(name)) and name not in (".", "..")


def _split_list(value: str | None, separator: str | None) -> list[str]:
    if value is None:
        return []
    return [item.strip() for item in value.split(separator) if item.strip()]


def _upper(value: object) -> object:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


def _listen_address(value: object) -> object:
    return parse_listen_address(value) if isinstance(value, str) else value


# NoDecode: pydantic-settings would otherwise read a tuple-typed variable as JSON and fail on "0.0.0.0:9000".
Listen = Annotated[ListenAddress, NoDecode, BeforeValidator(_listen_address)]


class Settings(BaseSettings):
    """Every setting of the contract; the Python name is the variable's name in lower case.

    Constructing ``Settings()`` reads the process environment and checks each variable alone; use
    ``load_settings`` for the checks across variables and for a report of every problem at once.
    """

    # case_sensitive: the variables are upper case, as the contract names them; a lower-case
    # "ipaas_batch_size" is a typo that unknown_variables reports, not a setting.
    model_config = SettingsConfigDict(
        case_sensitive=True,
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        # pydantic's own messages quote the input, which may be a secret; load_settings words its own.
        hide_input_in_errors=True,
        env_file=None,
    )

    ctp_project_key: str | None = Field(None, validation_alias="CTP_PROJECT_KEY")
    ctp_client_id: str | None = Field(None, validation_alias="CTP_CLIENT_ID")
    ctp_client_secret: SecretStr | None = Field(None, validation_alias="CTP_CLIENT_SECRET")
    ctp_auth_url: str | None = Field(None, validation_alias="CTP_AUTH_URL")
    ctp_api_url: str | None = Field(None, validation_alias="CTP_API_URL")
    ctp_scopes: str | None = Field(None, validation_alias="CTP_SCOPES")

    ipaas_hook_url: str | None = Field(None, validation_alias="IPAAS_HOOK_URL")
    ipaas_webhook_api_key: SecretStr | None = Field(None, validation_alias="IPAAS_WEBHOOK_API_KEY")
    # Only ever explicit: a dry run sends nothing and, on a broker or push source, acks and records nothing.
    ctsync_dry_run: bool = Field(False, validation_alias="CTSYNC_DRY_RUN")
    ipaas_throttle_limit: int = Field(500, ge=1, validation_alias="IPAAS_THROTTLE_LIMIT")
    ipaas_throttle_seconds: float = Field(
        60, gt=0, allow_inf_nan=False, validation_alias="IPAAS_THROTTLE_SECONDS"
    )
    ipaas_concurrent_connections: int = Field(5, ge=1, le=10, validation_alias="IPAAS_CONCURRENT_CONNECTIONS")
    ipaas_concurrent_batch_executions: int = Field(
        5, ge=1, le=10, validation_alias="IPAAS_CONCURRENT_BATCH_EXECUTIONS"
    )
    ipaas_batch_size: int = Field(100, ge=1, le=MAX_BATCH_SIZE, validation_alias="IPAAS_BATCH_SIZE")
    ipaas_debug: bool = Field(False, validation_alias="IPAAS_DEBUG")
    ipaas_scope_map: Path | None = Field(None, validation_alias="IPAAS_SCOPE_MAP")
    ipaas_ignore_client_ids: str = Field("", validation_alias="IPAAS_IGNORE_CLIENT_IDS")

    ctsync_source: str | None = Field(None, validation_alias="CTSYNC_SOURCE")
    kafka_bootstrap_servers: str | None = Field(None, validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    kafka_topics: str | None = Field(None, validation_alias="KAFKA_TOPICS")
    kafka_group_id: str = Field("ctsync", validation_alias="KAFKA_GROUP_ID")
    kafka_security_protocol: Annotated[SecurityProtocol, BeforeValidator(_upper)] = Field(
        "PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: Annotated[SaslMechanism, BeforeValidator(_upper)] = Field(
        "PLAIN", validation_alias="KAFKA_SASL_MECHANISM"
    )
    kafka_sasl_username: str | None = Field(None, validation_alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(None, validation_alias="KAFKA_SASL_PASSWORD")
    # Only for a private CA: Confluent Cloud's certificates chain to public CAs in the system store.
    kafka_ssl_cafile: Path | None = Field(None, validation_alias="KAFKA_SSL_CAFILE")
    # earliest: a new consumer group must not skip what is already waiting on the topic.
    kafka_auto_offset_reset: Annotated[OffsetReset, BeforeValidator(_lower)] = Field(
        "earliest", validation_alias="KAFKA_AUTO_OFFSET_RESET"
    )
    pubsub_subscription: str | None = Field(None, validation_alias="PUBSUB_SUBSCRIPTION")
    pubsub_emulator_host: str | None = Field(None, validation_alias="PUBSUB_EMULATOR_HOST")
    push_listen: Listen = Field(ListenAddress("0.0.0.0", 8080), validation_alias="PUSH_LISTEN")
    push_audience: str | None = Field(None, validation_alias="PUSH_AUDIENCE")
    push_service_account: str | None = Field(None, validation_alias="PUSH_SERVICE_ACCOUNT")
    push_allow_unauthenticated: bool = Field(False, validation_alias="PUSH_ALLOW_UNAUTHENTICATED")
    # Bounds of the push endpoint (README "Security"): open connections, time to send the request headers,
    # idle time between requests on one connection.
    push_max_connections: int = Field(256, ge=1, le=10000, validation_alias="PUSH_MAX_CONNECTIONS")
    push_header_timeout_seconds: float = Field(
        10, gt=0, le=600, allow_inf_nan=False, validation_alias="PUSH_HEADER_TIMEOUT_SECONDS"
    )
    push_keep_alive_seconds: int = Field(5, ge=1, le=600, validation_alias="PUSH_KEEP_ALIVE_SECONDS")

    ctsync_state_url: str = Field("sqlite:///ctsync-state.db", validation_alias="CTSYNC_STATE_URL")
    ctsync_dead_letter_url: str = Field(
        "file:ctsync-dead-letters.jsonl", validation_alias="CTSYNC_DEAD_LETTER_URL"
    )
    ctsync_dedupe_ttl_seconds: int = Field(604800, gt=0, validation_alias="CTSYNC_DEDUPE_TTL_SECONDS")
    ctsync_max_in_flight: int = Field(10000, ge=1, validation_alias="CTSYNC_MAX_IN_FLIGHT")
    ctsync_http_listen: Listen = Field(ListenAddress("0.0.0.0", 9000), validation_alias="CTSYNC_HTTP_LISTEN")
    ctsync_log_format: Annotated[LogFormat, BeforeValidator(_lower)] = Field(
        "json", validation_alias="CTSYNC_LOG_FORMAT"
    )
    ctsync_log_level: Annotated[LogLevel, BeforeValidator(_upper)] = Field(
        "INFO", validation_alias="CTSYNC_LOG_LEVEL"
    )
    # The audit trail (every message's fate) is written whatever CTSYNC_LOG_LEVEL says, unless this is off.
    ctsync_audit: Annotated[AuditSwitch, BeforeValidator(_lower)] = Field(
        "on", validation_alias="CTSYNC_AUDIT"
    )
    # Not in the contract's table: how long a stop waits for in-flight work before handing it back.
    ctsync_drain_timeout_seconds: float = Field(
        30, gt=0, allow_inf_nan=False, validation_alias="CTSYNC_DRAIN_TIMEOUT_SECONDS"
    )

    # Parsed once, at load: relative paths resolve against the directory ctsync started in.
    _source: SourceSpec | None = PrivateAttr(None)
    _state: StateLocation = PrivateAttr()
    _dead_letter: DeadLetterTarget = PrivateAttr()

    @field_validator(
        "ctp_project_key",
        "ctp_client_id",
        "ctp_scopes",
        "ipaas_hook_url",
        "ipaas_scope_map",
        "ctsync_source",
        "kafka_bootstrap_servers",
        "kafka_topics",
        "kafka_group_id",
        "kafka_sasl_username",
        "kafka_ssl_cafile",
        "pubsub_subscription",
        "pubsub_emulator_host",
        "push_audience",
        "push_service_account",
        "ctsync_state_url",
        "ctsync_dead_letter_url",
        # Bearer tokens and client secrets never hold surrounding spaces; a secret store's trailing
        # newline would otherwise break the Authorization header. The SASL password is left exact.
        "ctp_client_secret",
        "ipaas_webhook_api_key",
        mode="before",
    )
    @classmethod
    def _strip(cls, value: object) -> object:
        return value.strip() if isinstance(value, str) else value

    @field_validator("ctp_client_secret", "ipaas_webhook_api_key")
    @classmethod
    def _check_credential(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(c.isspace() or not c.isprintable() for c in value.get_secret_value()):
            raise ValueError("must not contain spaces or control characters")
        return value

    @field_validator("ctp_api_url")
    @classmethod
    def _check_api_url(cls, value: str | None) -> str | None:
        return None if value is None else _commercetools_url(value, "api")

    @field_validator("ctp_auth_url")
    @classmethod
    def _check_auth_url(cls, value: str | None) -> str | None:
        return None if value is None else _commercetools_url(value, "auth")

    @field_validator("ctp_scopes")
    @classmethod
    def _check_scopes(cls, value: str | None) -> str | None:
        scopes = _split_list(value, None)
        if value is not None and not all(_scope_project(scope) for scope in scopes):
            raise ValueError("each scope must be <permission>:<projectKey>, e.g. view_products:acme")
        return value

    @field_validator("ipaas_hook_url")
    @classmethod
    def _check_hook_url(cls, value: str | None) -> str | None:
        return None if value is None else _hook_url(value)

    @field_validator("ipaas_scope_map")
    @classmethod
    def _check_scope_map(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.exists():
            raise ValueError("file does not exist")
        if not value.is_file():
            raise ValueError("is not a file")
        if not os.access(value, os.R_OK):
            raise ValueError("file is not readable")
        return value

    @field_validator("kafka_ssl_cafile")
    @classmethod
    def _check_ssl_cafile(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file() or not os.access(value, os.R_OK):
            raise ValueError("file does not exist or is not readable")
        try:
            ssl.create_default_context(cafile=value)
        except ssl.SSLError:
            raise ValueError("holds no PEM certificate (of the CA that signed the brokers')") from None
        return value

    @field_validator("ctsync_source")
    @classmethod
    def _check_source(cls, value: str | None) -> str | None:
        if value is not None:
            parse_source(value)
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap_servers(cls, value: str | None) -> str | None:
        servers = _split_list(value, ",")
        if value is not None and (not servers or not all(_is_server(server) for server in servers)):
            raise ValueError(
                "must be host:port entries separated by commas, e.g. broker-1:9092,broker-2:9092"
            )
        return value

    @field_validator("kafka_topics")
    @classmethod
    def _check_topics(cls, value: str | None) -> str | None:
        topics = _split_list(value, ",")
        if value is not None and (not topics or not all(_is_kafka_topic(topic) for topic in topics)):
            raise ValueError(
                "must be topic names separated by commas; a name uses letters, digits, '.', '_' and '-'"
            )
        return value

    @field_validator("pubsub_subscription")
    @classmethod
    def _check_subscription(cls, value: str | None) -> str | None:
        if value is not None and not _PUBSUB_SUBSCRIPTION.fullmatch(value):
            raise ValueError("must be projects/<project>/subscriptions/<subscription>")
        return value

    @field_validator("pubsub_emulator_host")
    @classmethod
    def _check_emulator_host(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen_address(value)
        return value

    @field_validator("push_service_account")
    @classmethod
    def _check_service_account(cls, value: str | None) -> str | None:
        if value is not None and ("@" not in value or _SPACE.search(value)):
            raise ValueError(
                "must be the push service account's email, e.g. push@my-project.iam.gserviceaccount.com"
            )
        return value

    @field_validator("ctsync_state_url")
    @classmethod
    def _check_state_url(cls, value: str) -> str:
        parse_state_url(value)
        return value

    @field_validator("ctsync_dead_letter_url")
    @classmethod
    def _check_dead_letter_url(cls, value: str) -> str:
        parse_dead_letter_url(value)
        return value

    def model_post_init(self, context: Any, /) -> None:
        cwd = Path.cwd()
        self._source = None if self.ctsync_source is None else parse_source(self.ctsync_source, cwd)
        self._state = parse_state_url(self.ctsync_state_url, cwd)
        self._dead_letter = parse_dead_letter_url(self.ctsync_dead_letter_url, cwd)

    @property
    def source(self) -> SourceSpec | None:
        """Return the parsed CTSYNC_SOURCE, or None when unset (only ``run`` needs one)."""
        return self._source

    @property
    def state(self) -> StateLocation:
        """Return the parsed CTSYNC_STATE_URL."""
        return self._state

    @property
    def dead_letter(self) -> DeadLetterTarget:
        """Return the parsed CTSYNC_DEAD_LETTER_URL."""
        return self._dead_letter

    @property
    def http_listen(self) -> ListenAddress:
        """Return CTSYNC_HTTP_LISTEN, where /healthz, /readyz and /metrics are served."""
        return self.ctsync_http_listen

    @property
    def scopes(self) -> list[str]:
        """Return CTP_SCOPES as a list (the variable is space-separated)."""
        return _split_list(self.ctp_scopes, None)

    @property
    def ignore_client_ids(self) -> frozenset[str]:
        """Return IPAAS_IGNORE_CLIENT_IDS as a set: the API clients whose changes are not notified."""
        return frozenset(_split_list(self.ipaas_ignore_client_ids, ","))

    @property
    def kafka_topic_list(self) -> list[str]:
        """Return KAFKA_TOPICS as a list."""
        return _split_list(self.kafka_topics, ",")

    @property
    def kafka_bootstrap_server_list(self) -> list[str]:
        """Return KAFKA_BOOTSTRAP_SERVERS as a list; aiokafka would read the raw string as one host."""
        return _split_list(self.kafka_bootstrap_servers, ",")

    def problems(self, command: str = "run") -> list[str]:
        """Return the problems across settings and those of settings ``command`` needs; empty when fine."""
        return [text for _, text in self._problems(command)]

    def _problems(self, command: str) -> list[tuple[tuple[str, ...], str]]:
        """Return (variables involved, problem line) pairs; the line starts with the first variable.

        load_settings drops a pair that involves a variable it already reported invalid.
        """
        found: list[tuple[tuple[str, ...], str]] = []

        def problem(text: str, *variables: str) -> None:
            found.append((variables, text))

        words = command.split()
        for name in _REQUIRED_FOR.get(words[0] if words else "", ()):
            if getattr(self, name.lower()) is None:
                hint = " (kafka, pubsub, push or file:<path>)" if name == "CTSYNC_SOURCE" else ""
                problem(f"{name}: required for {command}{hint}", name)

        api_region, auth_region = _region(self.ctp_api_url), _region(self.ctp_auth_url)
        if api_region and auth_region and api_region != auth_region:
            problem(
                f"CTP_AUTH_URL: region {auth_region} differs from CTP_API_URL's region {api_region}; "
                f"use https://auth.{api_region}.commercetools.com",
                "CTP_AUTH_URL",
                "CTP_API_URL",
            )
        key = self.ctp_project_key
        if self.ctp_scopes is not None and key is not None and key not in map(_scope_project, self.scopes):
            problem(
                f"CTP_SCOPES: no scope names the project {key!r} (CTP_PROJECT_KEY); each scope is "
                f"<permission>:<projectKey>, e.g. view_products:{key}",
                "CTP_SCOPES",
                "CTP_PROJECT_KEY",
            )

        # Without a hook these would take what they read as sent and settle it for good.
        consumes = (words[:1] == ["run"] and self.ctsync_source is not None) or words[:1] == ["dead-letters"]
        if consumes and self.ipaas_hook_url is None and not self.ctsync_dry_run:
            problem(
                f"IPAAS_HOOK_URL: required for {command} (the iPaaS.com subscription's hook URL); for a dry "
                "run, which sends, acks and records nothing, set CTSYNC_DRY_RUN=true (run: --dry-run)",
                "IPAAS_HOOK_URL",
            )
        if self.ipaas_hook_url is not None and self.ipaas_webhook_api_key is None:
            problem(
                "IPAAS_WEBHOOK_API_KEY: required when IPAAS_HOOK_URL is set (the hook's Bearer token, "
                "from the iPaaS.com subscription's settings)",
                "IPAAS_WEBHOOK_API_KEY",
                "IPAAS_HOOK_URL",
            )

        webhook_key = self.ipaas_webhook_api_key
        if webhook_key is not None and len(webhook_key.get_secret_value()) < MIN_WEBHOOK_KEY_LENGTH:
            problem(
                f"IPAAS_WEBHOOK_API_KEY: is shorter than {MIN_WEBHOOK_KEY_LENGTH} characters; copy the whole "
                "key from the iPaaS.com subscription's settings page",
                "IPAAS_WEBHOOK_API_KEY",
                "IPAAS_HOOK_URL",
            )

        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL_"):
            for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
                if getattr(self, name.lower()) is None:
                    problem(
                        f"{name}: required when KAFKA_SECURITY_PROTOCOL is {protocol}",
                        name,
                        "KAFKA_SECURITY_PROTOCOL",
                    )
        elif self.kafka_sasl_username is not None or self.kafka_sasl_password is not None:
            # Credentials that the protocol ignores mean a forgotten SASL_SSL, which shows up later as
            # an opaque connection failure.
            problem(
                f"KAFKA_SECURITY_PROTOCOL: is {protocol} but KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD "
                "are set; use SASL_SSL (Confluent Cloud) or SASL_PLAINTEXT",
                "KAFKA_SECURITY_PROTOCOL",
                "KAFKA_SASL_USERNAME",
                "KAFKA_SASL_PASSWORD",
            )
        if self.kafka_ssl_cafile is not None and protocol not in ("SSL", "SASL_SSL"):
            problem(
                f"KAFKA_SSL_CAFILE: set, but KAFKA_SECURITY_PROTOCOL is {protocol}, which uses no TLS; "
                "use SASL_SSL or SSL",
                "KAFKA_SSL_CAFILE",
                "KAFKA_SECURITY_PROTOCOL",
            )

        kind = self.source.kind if self.source is not None else None
        if kind == "kafka":
            for name in ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPICS"):
                if getattr(self, name.lower()) is None:
                    problem(f"{name}: required when CTSYNC_SOURCE=kafka", name, "CTSYNC_SOURCE")
        if kind == "pubsub" and self.pubsub_subscription is None:
            problem(
                "PUBSUB_SUBSCRIPTION: required when CTSYNC_SOURCE=pubsub",
                "PUBSUB_SUBSCRIPTION",
                "CTSYNC_SOURCE",
            )
        serves_push = kind == "push" and bool(words) and words[0] in ("run", "check")
        if serves_push and not self.push_allow_unauthenticated:
            # Without both, anyone (no audience) or any Google account (no service account) can push.
            for name, what in (
                ("PUSH_AUDIENCE", "the audience of the push subscription's OIDC token"),
                ("PUSH_SERVICE_ACCOUNT", "the push subscription's service account email"),
            ):
                if getattr(self, name.lower()) is None:
                    problem(
                        f"{name}: required when CTSYNC_SOURCE=push ({what}); to accept pushes that are not "
                        "verified, set PUSH_ALLOW_UNAUTHENTICATED=true",
                        name,
                        "CTSYNC_SOURCE",
                    )
        if kind == "push" and self.push_service_account is not None and self.push_audience is None:
            # Without an audience no token is verified at all, so the account would silently check nothing.
            problem(
                "PUSH_SERVICE_ACCOUNT: set, but tokens are verified only when PUSH_AUDIENCE is set too",
                "PUSH_SERVICE_ACCOUNT",
                "PUSH_AUDIENCE",
            )
        if kind == "push" and _same_socket(self.push_listen, self.ctsync_http_listen):
            problem(
                f"PUSH_LISTEN: {self.push_listen} is also CTSYNC_HTTP_LISTEN's address "
                f"({self.ctsync_http_listen}); give them different ports",
                "PUSH_LISTEN",
                "CTSYNC_HTTP_LISTEN",
                "CTSYNC_SOURCE",
            )

        letters = self.dead_letter
        if letters.kind == "kafka":
            if self.kafka_bootstrap_servers is None:
                problem(
                    "KAFKA_BOOTSTRAP_SERVERS: required when CTSYNC_DEAD_LETTER_URL is kafka://",
                    "KAFKA_BOOTSTRAP_SERVERS",
                    "CTSYNC_DEAD_LETTER_URL",
                )
            if kind == "kafka" and letters.topic in self.kafka_topic_list:
                problem(
                    f"CTSYNC_DEAD_LETTER_URL: topic {letters.topic} is also in KAFKA_TOPICS; dead letters "
                    "would be consumed again",
                    "CTSYNC_DEAD_LETTER_URL",
                    "KAFKA_TOPICS",
                    "CTSYNC_SOURCE",
                )
        return found

    def secret_values(self) -> list[str]:
        """Return the value of every secret that is set, for the log redactor to scrub wherever it appears."""
        secrets = [
            secret.get_secret_value()
            for secret in (self.ctp_client_secret, self.ipaas_webhook_api_key, self.kafka_sasl_password)
            if secret is not None
        ]
        secrets += [p for p in (self.state.password, _url_password(self.ipaas_hook_url or "")) if p]
        if self.ctp_client_id is not None and self.ctp_client_secret is not None:
            # The Basic credential of the token request, should an auth server echo it.
            pair = f"{self.ctp_client_id}:{self.ctp_client_secret.get_secret_value()}"
            secrets.append(base64.b64encode(pair.encode()).decode())
        return [s for s in secrets if s]

    def summary(self) -> dict[str, object]:
        """Return every setting in a form safe to log: secrets as "set"/"unset", URLs without credentials."""
        summary: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in _SECRET_FIELDS:
                # "_set" suffix: the audit redactor blanks any field named after a secret, set or not.
                summary[f"{name}_set"] = value is not None
            elif isinstance(value, ListenAddress | Path):
                summary[name] = str(value)
            else:
                summary[name] = value
        summary["ipaas_hook_url"] = None if self.ipaas_hook_url is None else display_url(self.ipaas_hook_url)
        summary["ctsync_state_url"] = display_url(self.ctsync_state_url)
        summary["dry_run"] = self.ctsync_dry_run or self.ipaas_hook_url is None
        return summary


_SECRET_FIELDS: Final = frozenset(name.lower() for name in SECRET_VARIABLES)


def _alias(info: FieldInfo) -> str:
    assert isinstance(info.validation_alias, str)
    return info.validation_alias


# The variables in the contract's order; problems are reported in this order.
SETTING_VARIABLES: Final = tuple(_alias(info) for info in Settings.model_fields.values())
_FIELD_BY_VARIABLE: Final = {_alias(info): info for info in Settings.model_fields.values()}


def _scope_project(scope: str) -> str | None:
    # Store-scoped permissions add a third part: manage_orders:<projectKey>:<storeKey>.
    parts = scope.split(":")
    return parts[1] if len(parts) >= 2 and parts[0] and parts[1] else None


def _is_server(server: str) -> bool:
    host, sep, port = server.rpartition(":")
    if not sep:
        host, port = server, "9092"
    return bool(host) and not _SPACE.search(host) and _port(port) is not None


def _region(url: str | None) -> str | None:
    return None if url is None else commercetools_region(url)


def _same_socket(a: ListenAddress, b: ListenAddress) -> bool:
    wildcard = {"0.0.0.0", "::"}
    return a.port == b.port != 0 and (a.host == b.host or a.host in wildcard or b.host in wildcard)


# --- loading and reporting ---


def _requirement(info: FieldInfo) -> str | None:
    """Describe what a typed field accepts, from its type and bounds: "an integer from 1 to 10"."""
    annotation = info.annotation
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(arg) for arg in get_args(annotation))
    if annotation is bool:
        return "true or false"
    nouns: dict[object, str] = {int: "an integer", float: "a number"}
    noun = nouns.get(annotation)
    if noun is None:
        return None
    lower = upper = ""
    for bound in info.metadata:
        if isinstance(bound, annotated_types.Ge):
            lower = f">= {bound.ge}"
        elif isinstance(bound, annotated_types.Gt):
            lower = f"> {bound.gt}"
        elif isinstance(bound, annotated_types.Le):
            upper = f"<= {bound.le}"
    if lower.startswith(">=") and upper:
        return f"{noun} from {lower[3:]} to {upper[3:]}"
    return " ".join(part for part in (noun, lower, upper) if part)


def _echo(variable: str, value: object, secrets: Iterable[str]) -> str:
    """Return " (got '...')" for a rejected value; never a secret, whole or in part, nor a secret's field."""
    if variable in SECRET_VARIABLES or not isinstance(value, str):
        return ""
    if variable in _URL_VARIABLES:
        value = display_url(value)
    if _shares_secret(value, secrets):
        return " (value not shown: it contains a secret)"
    if len(value) > _MAX_ECHO:
        value = value[: _MAX_ECHO - 3] + "..."
    return f" (got {value!r})"


def _shares_secret(value: str, secrets: Iterable[str]) -> bool:
    """Return whether ``value`` holds a secret, or a run of it long enough to give it away."""
    for secret in secrets:
        if not secret:
            continue
        if secret in value:
            return True
        match = SequenceMatcher(None, value, secret, autojunk=False).find_longest_match()
        if match.size >= min(_SECRET_RUN, len(secret)):
            return True
    return False


def _describe(error: ErrorDetails, given: Mapping[str, str], secrets: Iterable[str]) -> tuple[str, str]:
    """Return (variable, problem line) for one pydantic error, built from its loc, type and our own text.

    pydantic's own rendering quotes ``input_value``, which may be a secret, so it is never used.
    """
    variable = str(error["loc"][0]) if error["loc"] else "configuration"
    info = _FIELD_BY_VARIABLE.get(variable)
    if error["type"] == "value_error":
        ctx = error.get("ctx") or {}
        reason = str(ctx.get("error", "is not valid"))
    elif error["type"] == "missing":
        return variable, f"{variable}: required"
    else:
        requirement = _requirement(info) if info is not None else None
        reason = f"must be {requirement}" if requirement else error["msg"]
    # The value as given: the input pydantic reports may already be normalised (upper-cased, stripped).
    return variable, f"{variable}: {reason}{_echo(variable, given.get(variable), secrets)}"


def _scrub(text: str, secrets: Iterable[str]) -> str:
    # A last line of defence: no path above should put a secret in a problem line.
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _SECRET_MIN_SCRUB:
            text = text.replace(secret, "[redacted]")
    return text


def _settings_values(environ: Mapping[str, str | None]) -> dict[str, str]:
    return {
        name: value
        for name, value in environ.items()
        if name in _FIELD_BY_VARIABLE and value and value.strip()
    }


def _read_env_file(env_file: Path) -> tuple[dict[str, str | None], str | None]:
    if not env_file.is_file():
        return {}, f"--env-file: {env_file} does not exist or is not a file"
    try:
        return dict(dotenv_values(env_file, encoding="utf-8")), None
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"--env-file: cannot read {env_file}: {type(exc).__name__}"


def _build(values: Mapping[str, str]) -> Settings:
    # _build_sources makes pydantic-settings read exactly these values: Settings(**values) would still
    # fill the remaining fields from os.environ, which a given ``environ`` must replace entirely.
    # mypy derives __init__ from the fields (dataclass_transform) and so misses BaseSettings' own arguments.
    source = InitSettingsSource(Settings, init_kwargs=dict(values))
    return Settings(_build_sources=((source,), {}))  # type: ignore[call-arg]


def load_settings(
    env_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    for_command: str = "run",
) -> Settings:
    """Load and check the settings for ``for_command``; raise ConfigError listing every problem.

    Values come from ``env_file`` (if given) and then the environment, which wins: ``environ`` when given,
    replacing ``os.environ`` entirely, else ``os.environ``.
    """
    settings, problems = load_settings_with_problems(env_file, environ, for_command=for_command)
    if problems:
        raise ConfigError(problems)
    assert settings is not None, "a failed build always leaves a problem"
    return settings


def load_settings_with_problems(
    env_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    for_command: str = "run",
) -> tuple[Settings | None, list[str]]:
    """Load the settings as far as they are valid, and list every problem (``load_settings``' lines).

    The settings are built without the variables that are invalid on their own; problems across variables
    (a hook URL without its key) leave them built, so ``ctsync check`` can still run every other check.
    None only when not even that could be built.
    """
    values: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    if env_file is not None:
        file_values, file_problem = _read_env_file(Path(env_file))
        values.update(_settings_values(file_values))
        if file_problem is not None:
            problems.append(("--env-file", file_problem))
    values.update(_settings_values(os.environ if environ is None else environ))

    secrets = [values[name] for name in SECRET_VARIABLES if name in values]
    secrets += [p for p in (_url_password(values[name]) for name in _URL_VARIABLES if name in values) if p]
    secrets += [secret.strip() for secret in secrets]

    invalid: set[str] = set()
    settings: Settings | None = None
    try:
        settings = _build(values)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_context=True, include_input=False):
            variable, line = _describe(error, values, secrets)
            if variable not in invalid:
                invalid.add(variable)
                problems.append((variable, line))
        # Rebuilt without the invalid variables, the rest can still be checked together; a check
        # involving an invalid variable is skipped, as it would judge a default nobody chose.
        try:
            settings = _build({name: value for name, value in values.items() if name not in invalid})
        except ValidationError:
            settings = None
    for variables, line in settings._problems(for_command) if settings is not None else ():
        if invalid.isdisjoint(variables):
            problems.append((variables[0], line))
    problems.sort(key=lambda item: _order(item[0]))
    return settings, [_scrub(line, secrets) for _, line in problems]


def _order(variable: str) -> int:
    return SETTING_VARIABLES.index(variable) if variable in SETTING_VARIABLES else -1


def did_you_mean(name: str) -> str | None:
    """Return the setting an unknown variable most likely meant (IPAAS_HOOKURL -> IPAAS_HOOK_URL), if any."""
    matches = get_close_matches(name.upper(), SETTING_VARIABLES, n=1, cutoff=0.8)
    return matches[0] if matches else None


def unknown_variables(environ: Mapping[str, str], env_file: str | Path | None = None) -> list[str]:
    """Return the variables that look like ctsync settings but are not (typos such as IPAAS_THROTLE_LIMIT)."""
    names = set(environ)
    if env_file is not None and Path(env_file).is_file():
        names |= set(_read_env_file(Path(env_file))[0])
    return sorted(
        name
        for name in names
        if name.upper().startswith(SETTING_PREFIXES)
        and name not in _FIELD_BY_VARIABLE
        and name not in _FOREIGN_VARIABLES
    )
