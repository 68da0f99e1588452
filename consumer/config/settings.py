"""The settings model: every variable of the contract, checked alone (by field) and together (``problems``).

Problems are typed values (``Problem``: the variables involved and the line an operator reads), never parsed
back out of text.
"""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Final, NamedTuple

from pydantic import BeforeValidator, Field, PrivateAttr, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.audit import display_url
from consumer.config.values import (
    MAX_BATCH_SIZE,
    MIN_WEBHOOK_KEY_LENGTH,
    PUBSUB_SUBSCRIPTION,
    REQUIRED_FOR,
    SECRET_VARIABLES,
    SPACE,
    AuditSwitch,
    DeadLetterTarget,
    Listen,
    ListenAddress,
    LogFormat,
    LogLevel,
    OffsetReset,
    SaslMechanism,
    SecurityProtocol,
    SourceSpec,
    StateLocation,
    commercetools_region,
    commercetools_url,
    hook_url,
    is_kafka_topic,
    lower_case,
    parse_dead_letter_url,
    parse_listen_address,
    parse_source,
    parse_state_url,
    port_number,
    split_list,
    upper_case,
    url_password,
)


class Problem(NamedTuple):
    """One configuration problem: the variables involved (the first one leads) and the line an operator
    reads, which starts with that variable's name."""

    variables: tuple[str, ...]
    text: str

    @property
    def variable(self) -> str:
        return self.variables[0]


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
    kafka_security_protocol: Annotated[SecurityProtocol, BeforeValidator(upper_case)] = Field(
        "PLAINTEXT", validation_alias="KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: Annotated[SaslMechanism, BeforeValidator(upper_case)] = Field(
        "PLAIN", validation_alias="KAFKA_SASL_MECHANISM"
    )
    kafka_sasl_username: str | None = Field(None, validation_alias="KAFKA_SASL_USERNAME")
    kafka_sasl_password: SecretStr | None = Field(None, validation_alias="KAFKA_SASL_PASSWORD")
    # Only for a private CA: Confluent Cloud's certificates chain to public CAs in the system store.
    kafka_ssl_cafile: Path | None = Field(None, validation_alias="KAFKA_SSL_CAFILE")
    # earliest: a new consumer group must not skip what is already waiting on the topic.
    kafka_auto_offset_reset: Annotated[OffsetReset, BeforeValidator(lower_case)] = Field(
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
    ctsync_log_format: Annotated[LogFormat, BeforeValidator(lower_case)] = Field(
        "json", validation_alias="CTSYNC_LOG_FORMAT"
    )
    ctsync_log_level: Annotated[LogLevel, BeforeValidator(upper_case)] = Field(
        "INFO", validation_alias="CTSYNC_LOG_LEVEL"
    )
    # The audit trail (every message's fate) is written whatever CTSYNC_LOG_LEVEL says, unless this is off.
    ctsync_audit: Annotated[AuditSwitch, BeforeValidator(lower_case)] = Field(
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
        return None if value is None else commercetools_url(value, "api")

    @field_validator("ctp_auth_url")
    @classmethod
    def _check_auth_url(cls, value: str | None) -> str | None:
        return None if value is None else commercetools_url(value, "auth")

    @field_validator("ctp_scopes")
    @classmethod
    def _check_scopes(cls, value: str | None) -> str | None:
        scopes = split_list(value, None)
        if value is not None and not all(_scope_project(scope) for scope in scopes):
            raise ValueError("each scope must be <permission>:<projectKey>, e.g. view_products:acme")
        return value

    @field_validator("ipaas_hook_url")
    @classmethod
    def _check_hook_url(cls, value: str | None) -> str | None:
        return None if value is None else hook_url(value)

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
        servers = split_list(value, ",")
        if value is not None and (not servers or not all(_is_server(server) for server in servers)):
            raise ValueError(
                "must be host:port entries separated by commas, e.g. broker-1:9092,broker-2:9092"
            )
        return value

    @field_validator("kafka_topics")
    @classmethod
    def _check_topics(cls, value: str | None) -> str | None:
        topics = split_list(value, ",")
        if value is not None and (not topics or not all(is_kafka_topic(topic) for topic in topics)):
            raise ValueError(
                "must be topic names separated by commas; a name uses letters, digits, '.', '_' and '-'"
            )
        return value

    @field_validator("pubsub_subscription")
    @classmethod
    def _check_subscription(cls, value: str | None) -> str | None:
        if value is not None and not PUBSUB_SUBSCRIPTION.fullmatch(value):
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
        if value is not None and ("@" not in value or SPACE.search(value)):
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
        return split_list(self.ctp_scopes, None)

    @property
    def ignore_client_ids(self) -> frozenset[str]:
        """Return IPAAS_IGNORE_CLIENT_IDS as a set: the API clients whose changes are not notified."""
        return frozenset(split_list(self.ipaas_ignore_client_ids, ","))

    @property
    def kafka_topic_list(self) -> list[str]:
        """Return KAFKA_TOPICS as a list."""
        return split_list(self.kafka_topics, ",")

    @property
    def kafka_bootstrap_server_list(self) -> list[str]:
        """Return KAFKA_BOOTSTRAP_SERVERS as a list; aiokafka would read the raw string as one host."""
        return split_list(self.kafka_bootstrap_servers, ",")

    def problems(self, command: str = "run") -> list[str]:
        """Return the problems across settings and those of settings ``command`` needs; empty when fine."""
        return [found.text for found in self.problems_found(command)]

    def problems_found(self, command: str) -> list[Problem]:
        """Return (variables involved, problem line) pairs; the line starts with the first variable.

        load_settings drops a pair that involves a variable it already reported invalid.
        """
        found: list[Problem] = []

        def problem(text: str, *variables: str) -> None:
            found.append(Problem(variables, text))

        words = command.split()
        for name in REQUIRED_FOR.get(words[0] if words else "", ()):
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
        secrets += [p for p in (self.state.password, url_password(self.ipaas_hook_url or "")) if p]
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
FIELD_BY_VARIABLE: Final = {_alias(info): info for info in Settings.model_fields.values()}


def _scope_project(scope: str) -> str | None:
    # Store-scoped permissions add a third part: manage_orders:<projectKey>:<storeKey>.
    parts = scope.split(":")
    return parts[1] if len(parts) >= 2 and parts[0] and parts[1] else None


def _is_server(server: str) -> bool:
    host, sep, port = server.rpartition(":")
    if not sep:
        host, port = server, "9092"
    return bool(host) and not SPACE.search(host) and port_number(port) is not None


def _region(url: str | None) -> str | None:
    return None if url is None else commercetools_region(url)


def _same_socket(a: ListenAddress, b: ListenAddress) -> bool:
    wildcard = {"0.0.0.0", "::"}
    return a.port == b.port != 0 and (a.host == b.host or a.host in wildcard or b.host in wildcard)


# --- loading and reporting ---
