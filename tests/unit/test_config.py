import json
from pathlib import Path

import pytest

from consumer.config import (
    KNOWN_REGIONS,
    SECRET_VARIABLES,
    SETTING_VARIABLES,
    ConfigError,
    DeadLetterTarget,
    ListenAddress,
    Settings,
    SourceSpec,
    StateLocation,
    commercetools_region,
    did_you_mean,
    load_settings,
    unknown_variables,
)
from tests import REPO_ROOT

CLIENT_SECRET = "Zq8-ctp-client-secret-4Kd"
WEBHOOK_KEY = "wh-key-7b1d4d8e9a550c1f2b3a"
# Quotes, a dollar, a backslash, spaces, a newline, non-ASCII: all legal in a SASL password.
SASL_PASSWORD = "p@ss 'w\"o$rd\\\n ünï"

COMMERCETOOLS = {
    "CTP_PROJECT_KEY": "acme",
    "CTP_CLIENT_ID": "client-1",
    "CTP_CLIENT_SECRET": CLIENT_SECRET,
    "CTP_AUTH_URL": "https://auth.europe-west1.gcp.commercetools.com",
    "CTP_API_URL": "https://api.europe-west1.gcp.commercetools.com",
    "CTP_SCOPES": "view_products:acme manage_subscriptions:acme",
}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative paths resolve against the working directory; give each test its own.
    monkeypatch.chdir(tmp_path)


def load(command: str = "replay", **env: str) -> Settings:
    return load_settings(environ=env, for_command=command)


def problems_of(env: dict[str, str], command: str = "replay") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env, for_command=command)
    return info.value.problems


def test_defaults(tmp_path: Path) -> None:
    s = load()
    assert (s.ctp_project_key, s.ctp_client_id, s.ctp_client_secret) == (None, None, None)
    assert (s.ctp_auth_url, s.ctp_api_url, s.ctp_scopes, s.scopes) == (None, None, None, [])
    assert s.ipaas_hook_url is None and s.ipaas_webhook_api_key is None
    assert s.ipaas_throttle_limit == 500 and s.ipaas_throttle_seconds == 60
    assert s.ipaas_concurrent_connections == 5 and s.ipaas_concurrent_batch_executions == 5
    assert s.ipaas_batch_size == 100 and s.ipaas_debug is False and s.ipaas_scope_map is None
    assert s.ignore_client_ids == frozenset()
    assert s.ctsync_source is None and s.source is None
    assert s.kafka_bootstrap_servers is None and s.kafka_topics is None and s.kafka_topic_list == []
    assert s.kafka_group_id == "ctsync"
    assert s.kafka_security_protocol == "PLAINTEXT" and s.kafka_sasl_mechanism == "PLAIN"
    assert s.kafka_sasl_username is None and s.kafka_sasl_password is None
    assert s.kafka_auto_offset_reset == "earliest"
    assert s.pubsub_subscription is None and s.pubsub_emulator_host is None
    assert s.push_listen == ("0.0.0.0", 8080) and s.push_audience is None and s.push_service_account is None
    assert s.ctsync_state_url == "sqlite:///ctsync-state.db"
    assert s.state == StateLocation("sqlite", path=tmp_path / "ctsync-state.db")
    assert s.ctsync_dead_letter_url == "file:ctsync-dead-letters.jsonl"
    assert s.dead_letter == DeadLetterTarget("file", path=tmp_path / "ctsync-dead-letters.jsonl")
    assert s.ctsync_dedupe_ttl_seconds == 604800 and s.ctsync_max_in_flight == 10000
    assert s.http_listen == ListenAddress("0.0.0.0", 9000) == s.ctsync_http_listen
    assert s.ctsync_log_format == "json" and s.ctsync_log_level == "INFO" and s.ctsync_audit == "on"
    assert s.ctsync_drain_timeout_seconds == 30


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("CTP_PROJECT_KEY", " acme ", "ctp_project_key", "acme"),
        ("CTP_CLIENT_ID", "client-1", "ctp_client_id", "client-1"),
        (
            "CTP_AUTH_URL",
            "https://auth.us-east-2.aws.commercetools.com/",
            "ctp_auth_url",
            "https://auth.us-east-2.aws.commercetools.com",
        ),
        (
            "CTP_API_URL",
            "https://api.us-east-2.aws.commercetools.com",
            "ctp_api_url",
            "https://api.us-east-2.aws.commercetools.com",
        ),
        (
            "CTP_SCOPES",
            "view_products:acme  view_orders:acme",
            "scopes",
            ["view_products:acme", "view_orders:acme"],
        ),
        ("IPAAS_THROTTLE_LIMIT", "5", "ipaas_throttle_limit", 5),
        ("IPAAS_THROTTLE_SECONDS", "0.5", "ipaas_throttle_seconds", 0.5),
        ("IPAAS_CONCURRENT_CONNECTIONS", "10", "ipaas_concurrent_connections", 10),
        ("IPAAS_CONCURRENT_BATCH_EXECUTIONS", "1", "ipaas_concurrent_batch_executions", 1),
        ("IPAAS_BATCH_SIZE", "1000", "ipaas_batch_size", 1000),
        ("IPAAS_DEBUG", "true", "ipaas_debug", True),
        ("IPAAS_DEBUG", "0", "ipaas_debug", False),
        ("IPAAS_IGNORE_CLIENT_IDS", " a , b,,c ", "ignore_client_ids", frozenset({"a", "b", "c"})),
        ("CTSYNC_SOURCE", "Push", "source", SourceSpec("push")),
        ("CTSYNC_SOURCE", "file:/data/in.jsonl", "source", SourceSpec("file", Path("/data/in.jsonl"))),
        (
            "KAFKA_BOOTSTRAP_SERVERS",
            "b1:9092, b2:9093",
            "kafka_bootstrap_server_list",
            ["b1:9092", "b2:9093"],
        ),
        ("KAFKA_TOPICS", "ct.products, ct.orders", "kafka_topic_list", ["ct.products", "ct.orders"]),
        ("KAFKA_GROUP_ID", "sync-eu", "kafka_group_id", "sync-eu"),
        ("KAFKA_SECURITY_PROTOCOL", "ssl", "kafka_security_protocol", "SSL"),
        ("KAFKA_SASL_MECHANISM", "scram-sha-512", "kafka_sasl_mechanism", "SCRAM-SHA-512"),
        ("KAFKA_AUTO_OFFSET_RESET", "Latest", "kafka_auto_offset_reset", "latest"),
        (
            "PUBSUB_SUBSCRIPTION",
            "projects/p-1/subscriptions/ct",
            "pubsub_subscription",
            "projects/p-1/subscriptions/ct",
        ),
        ("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085", "pubsub_emulator_host", "127.0.0.1:8085"),
        ("PUSH_LISTEN", "127.0.0.1:0", "push_listen", ListenAddress("127.0.0.1", 0)),
        ("PUSH_LISTEN", "[::1]:8443", "push_listen", ListenAddress("::1", 8443)),
        ("PUSH_AUDIENCE", "https://ctsync.example/push", "push_audience", "https://ctsync.example/push"),
        (
            "PUSH_SERVICE_ACCOUNT",
            "push@p.iam.gserviceaccount.com",
            "push_service_account",
            "push@p.iam.gserviceaccount.com",
        ),
        ("CTSYNC_DEDUPE_TTL_SECONDS", "3600", "ctsync_dedupe_ttl_seconds", 3600),
        ("CTSYNC_MAX_IN_FLIGHT", "1", "ctsync_max_in_flight", 1),
        ("CTSYNC_HTTP_LISTEN", "localhost:9100", "http_listen", ("localhost", 9100)),
        ("CTSYNC_LOG_FORMAT", "Console", "ctsync_log_format", "console"),
        ("CTSYNC_LOG_LEVEL", "debug", "ctsync_log_level", "DEBUG"),
        ("CTSYNC_AUDIT", "OFF", "ctsync_audit", "off"),
        ("CTSYNC_AUDIT", "on", "ctsync_audit", "on"),
        ("CTSYNC_DRAIN_TIMEOUT_SECONDS", "2.5", "ctsync_drain_timeout_seconds", 2.5),
    ],
)
def test_each_variable_is_parsed(variable: str, raw: str, attribute: str, expected: object) -> None:
    assert getattr(load(**{variable: raw}), attribute) == expected


def test_secrets_are_kept_exactly_apart_from_surrounding_space_on_tokens() -> None:
    s = load(
        CTP_CLIENT_SECRET=f" {CLIENT_SECRET}\n",
        IPAAS_WEBHOOK_API_KEY=WEBHOOK_KEY,
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_USERNAME="key",
        KAFKA_SASL_PASSWORD=f" {SASL_PASSWORD} ",
    )
    assert s.ctp_client_secret is not None and s.ctp_client_secret.get_secret_value() == CLIENT_SECRET
    assert s.ipaas_webhook_api_key is not None and s.ipaas_webhook_api_key.get_secret_value() == WEBHOOK_KEY
    assert (
        s.kafka_sasl_password is not None and s.kafka_sasl_password.get_secret_value() == f" {SASL_PASSWORD} "
    )


def test_scope_map_path(tmp_path: Path) -> None:
    (tmp_path / "scopes.toml").write_text("")
    assert load(IPAAS_SCOPE_MAP="scopes.toml").ipaas_scope_map == Path("scopes.toml")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory://", StateLocation("memory")),
        ("sqlite:///state/ct.db", StateLocation("sqlite", path=Path("state/ct.db"))),
        ("sqlite:////var/lib/ctsync/ct.db", StateLocation("sqlite", path=Path("/var/lib/ctsync/ct.db"))),
        ("redis://127.0.0.1:6379/3", StateLocation("redis", host="127.0.0.1", port=6379, db=3)),
        ("redis://cache", StateLocation("redis", host="cache", port=6379, db=0)),
        (
            "rediss://default:pw-123456@cache.example:6380/1",
            StateLocation(
                "redis",
                host="cache.example",
                port=6380,
                db=1,
                tls=True,
                username="default",
                password="pw-123456",
            ),
        ),
    ],
)
def test_state_url(url: str, expected: StateLocation, tmp_path: Path) -> None:
    state = load(CTSYNC_STATE_URL=url).state
    want_path = None if expected.path is None else tmp_path / expected.path
    assert (state.kind, state.path, state.host, state.port, state.db, state.tls) == (
        expected.kind,
        want_path,
        expected.host,
        expected.port,
        expected.db,
        expected.tls,
    )
    assert (state.username, state.password) == (expected.username, expected.password)
    assert state.url == (url if state.kind == "redis" else "")


def test_redis_password_stays_out_of_repr() -> None:
    state = load(CTSYNC_STATE_URL="redis://:pw-123456@cache:6379/0").state
    assert "pw-123456" not in repr(state)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:dead/letters.jsonl", DeadLetterTarget("file", path=Path("dead/letters.jsonl"))),
        ("file:/var/ctsync/dl.jsonl", DeadLetterTarget("file", path=Path("/var/ctsync/dl.jsonl"))),
        ("file:///var/ctsync/dl.jsonl", DeadLetterTarget("file", path=Path("/var/ctsync/dl.jsonl"))),
        ("kafka://ctsync.dead-letters", DeadLetterTarget("kafka", topic="ctsync.dead-letters")),
        ("pubsub://projects/p/topics/dl", DeadLetterTarget("pubsub", topic="projects/p/topics/dl")),
    ],
)
def test_dead_letter_url(url: str, expected: DeadLetterTarget, tmp_path: Path) -> None:
    env = {"CTSYNC_DEAD_LETTER_URL": url, "KAFKA_BOOTSTRAP_SERVERS": "b:9092"}
    target = load(**env).dead_letter
    if expected.path is not None:
        expected = DeadLetterTarget("file", path=tmp_path / expected.path)
    assert target == expected
    assert target.path is None or target.path.is_absolute()


def test_broker_sources() -> None:
    kafka = load(CTSYNC_SOURCE="kafka", KAFKA_BOOTSTRAP_SERVERS="b:9092", KAFKA_TOPICS="ct")
    assert kafka.source == SourceSpec("kafka")
    pubsub = load(CTSYNC_SOURCE="PubSub", PUBSUB_SUBSCRIPTION="projects/p/subscriptions/s")
    assert pubsub.source == SourceSpec("pubsub")


def test_file_source_resolves_against_the_start_directory(tmp_path: Path) -> None:
    assert load(CTSYNC_SOURCE="file:in/payloads.jsonl").source == SourceSpec(
        "file", tmp_path / "in/payloads.jsonl"
    )


@pytest.mark.parametrize("region", [*sorted(KNOWN_REGIONS), "asia-northeast1.gcp"])
def test_regional_urls_accepted_including_unknown_future_regions(region: str) -> None:
    s = load(
        CTP_API_URL=f"https://api.{region}.commercetools.com/",
        CTP_AUTH_URL=f"https://auth.{region}.commercetools.com",
    )
    assert s.ctp_api_url == f"https://api.{region}.commercetools.com"
    assert commercetools_region(s.ctp_api_url) == commercetools_region(s.ctp_auth_url or "") == region


def test_loopback_mock_servers_accepted_over_http() -> None:
    s = load(
        CTP_API_URL="http://127.0.0.1:18080", CTP_AUTH_URL="http://localhost:18080", CTP_PROJECT_KEY="demo"
    )
    assert s.ctp_api_url == "http://127.0.0.1:18080"
    assert load(IPAAS_HOOK_URL="http://[::1]:8000/hook", IPAAS_WEBHOOK_API_KEY="k" * 16).ipaas_hook_url


def test_store_scoped_permissions_name_the_project() -> None:
    assert load(CTP_PROJECT_KEY="acme", CTP_SCOPES="manage_orders:acme:eu-store").scopes == [
        "manage_orders:acme:eu-store"
    ]


def test_complete_commercetools_settings_pass_for_subscription() -> None:
    assert load("subscription ensure", **COMMERCETOOLS).ctp_project_key == "acme"


# Each case: the environment, then the variable its single problem line must start with, and a fragment.
PROBLEMS = [
    ({"IPAAS_THROTTLE_LIMIT": "abc"}, "IPAAS_THROTTLE_LIMIT", "must be an integer >= 1 (got 'abc')"),
    ({"IPAAS_THROTTLE_LIMIT": "0"}, "IPAAS_THROTTLE_LIMIT", ">= 1"),
    ({"IPAAS_THROTTLE_SECONDS": "0"}, "IPAAS_THROTTLE_SECONDS", "must be a number > 0"),
    ({"IPAAS_THROTTLE_SECONDS": "nan"}, "IPAAS_THROTTLE_SECONDS", "must be a number > 0"),
    (
        {"IPAAS_CONCURRENT_CONNECTIONS": "11"},
        "IPAAS_CONCURRENT_CONNECTIONS",
        "integer from 1 to 10 (got '11')",
    ),
    ({"IPAAS_CONCURRENT_BATCH_EXECUTIONS": "0"}, "IPAAS_CONCURRENT_BATCH_EXECUTIONS", "from 1 to 10"),
    ({"IPAAS_BATCH_SIZE": "1001"}, "IPAAS_BATCH_SIZE", "from 1 to 1000"),
    ({"IPAAS_DEBUG": "maybe"}, "IPAAS_DEBUG", "true or false"),
    ({"IPAAS_SCOPE_MAP": "missing.toml"}, "IPAAS_SCOPE_MAP", "does not exist"),
    ({"IPAAS_SCOPE_MAP": "."}, "IPAAS_SCOPE_MAP", "not a file"),
    ({"CTSYNC_DEDUPE_TTL_SECONDS": "0"}, "CTSYNC_DEDUPE_TTL_SECONDS", "> 0"),
    ({"CTSYNC_MAX_IN_FLIGHT": "-5"}, "CTSYNC_MAX_IN_FLIGHT", ">= 1"),
    ({"CTSYNC_DRAIN_TIMEOUT_SECONDS": "0"}, "CTSYNC_DRAIN_TIMEOUT_SECONDS", "> 0"),
    ({"CTSYNC_LOG_FORMAT": "xml"}, "CTSYNC_LOG_FORMAT", "one of json, console"),
    ({"CTSYNC_LOG_LEVEL": "trace"}, "CTSYNC_LOG_LEVEL", "one of DEBUG, INFO, WARNING, ERROR (got 'trace')"),
    ({"CTSYNC_AUDIT": "no"}, "CTSYNC_AUDIT", "one of on, off (got 'no')"),
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
    ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
    ({"KAFKA_AUTO_OFFSET_RESET": "none"}, "KAFKA_AUTO_OFFSET_RESET", "earliest, latest"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "b1:port"}, "KAFKA_BOOTSTRAP_SERVERS", "host:port"),
    ({"KAFKA_TOPICS": "ct products"}, "KAFKA_TOPICS", "topic names"),
    ({"CTSYNC_SOURCE": "sqs"}, "CTSYNC_SOURCE", "kafka, pubsub, push or file:<path>"),
    ({"CTSYNC_SOURCE": "file:"}, "CTSYNC_SOURCE", "needs a file path"),
    (
        {"PUBSUB_SUBSCRIPTION": "ct-sub"},
        "PUBSUB_SUBSCRIPTION",
        "projects/<project>/subscriptions/<subscription>",
    ),
    ({"PUBSUB_EMULATOR_HOST": "localhost"}, "PUBSUB_EMULATOR_HOST", "host:port"),
    ({"PUSH_LISTEN": "8080"}, "PUSH_LISTEN", "host:port"),
    ({"PUSH_LISTEN": "::1:8080"}, "PUSH_LISTEN", "brackets"),
    ({"CTSYNC_HTTP_LISTEN": "0.0.0.0:65536"}, "CTSYNC_HTTP_LISTEN", "0 to 65535"),
    ({"PUSH_SERVICE_ACCOUNT": "push-sa"}, "PUSH_SERVICE_ACCOUNT", "email"),
    ({"CTSYNC_STATE_URL": "sqlite://ct.db"}, "CTSYNC_STATE_URL", "sqlite:///<relative path>"),
    ({"CTSYNC_STATE_URL": "postgres://db/ct"}, "CTSYNC_STATE_URL", "memory://"),
    ({"CTSYNC_STATE_URL": "redis://cache/x"}, "CTSYNC_STATE_URL", "redis://host:port/db"),
    ({"CTSYNC_STATE_URL": "sqlite:///."}, "CTSYNC_STATE_URL", "directory"),
    ({"CTSYNC_DEAD_LETTER_URL": "s3://bucket"}, "CTSYNC_DEAD_LETTER_URL", "file:<path>, kafka://<topic>"),
    ({"CTSYNC_DEAD_LETTER_URL": "file://host/x.jsonl"}, "CTSYNC_DEAD_LETTER_URL", "absolute path"),
    ({"CTSYNC_DEAD_LETTER_URL": "kafka://bad topic"}, "CTSYNC_DEAD_LETTER_URL", "kafka://<topic>"),
    (
        {"CTSYNC_DEAD_LETTER_URL": "pubsub://dl"},
        "CTSYNC_DEAD_LETTER_URL",
        "pubsub://projects/<project>/topics/",
    ),
    (
        {"CTP_API_URL": "https://api.commercetools.com"},
        "CTP_API_URL",
        "not a regional URL; use the one for your project's region, e.g. https://api.europe-west1.gcp.commercetools.com",
    ),
    ({"CTP_API_URL": "https://api.commercetools.com/"}, "CTP_API_URL", "not a regional URL"),
    (
        {"CTP_AUTH_URL": "https://auth.commercetools.com/"},
        "CTP_AUTH_URL",
        "e.g. https://auth.europe-west1.gcp.commercetools.com",
    ),
    (
        {"CTP_API_URL": "https://auth.europe-west1.gcp.commercetools.com"},
        "CTP_API_URL",
        "this is the auth URL",
    ),
    (
        {"CTP_AUTH_URL": "https://auth.europe-west1.gcp.commercetools.com/oauth/token"},
        "CTP_AUTH_URL",
        "without a path",
    ),
    ({"CTP_API_URL": "http://api.europe-west1.gcp.commercetools.com"}, "CTP_API_URL", "https"),
    ({"CTP_API_URL": "http://ctmock:8080"}, "CTP_API_URL", "https"),
    ({"CTP_API_URL": "api.europe-west1.gcp.commercetools.com"}, "CTP_API_URL", "must be a URL like"),
    (
        {
            "CTP_API_URL": "https://api.europe-west1.gcp.commercetools.com",
            "CTP_AUTH_URL": "https://auth.us-central1.gcp.commercetools.com",
        },
        "CTP_AUTH_URL",
        "region us-central1.gcp differs from CTP_API_URL's region europe-west1.gcp",
    ),
    (
        {
            "CTP_API_URL": "https://api.mars-north1.gcp.commercetools.com",
            "CTP_AUTH_URL": "https://auth.mars-south1.gcp.commercetools.com",
        },
        "CTP_AUTH_URL",
        "differs",
    ),
    (
        {"CTP_PROJECT_KEY": "acme", "CTP_SCOPES": "view_products:other manage_project:acme-dev"},
        "CTP_SCOPES",
        "no scope names the project 'acme'",
    ),
    ({"CTP_SCOPES": "view_products"}, "CTP_SCOPES", "<permission>:<projectKey>"),
    ({"IPAAS_HOOK_URL": "http://hooks.ipaas.com/x", "IPAAS_WEBHOOK_API_KEY": "k"}, "IPAAS_HOOK_URL", "https"),
    ({"IPAAS_HOOK_URL": "http://10.0.0.1/x", "IPAAS_WEBHOOK_API_KEY": "k"}, "IPAAS_HOOK_URL", "localhost"),
    ({"IPAAS_HOOK_URL": "hooks.ipaas.com/x", "IPAAS_WEBHOOK_API_KEY": "k"}, "IPAAS_HOOK_URL", "https://"),
    (
        {"IPAAS_HOOK_URL": "https://hooks.ipaas.com/x"},
        "IPAAS_WEBHOOK_API_KEY",
        "required when IPAAS_HOOK_URL is set",
    ),
    ({"IPAAS_WEBHOOK_API_KEY": "two words"}, "IPAAS_WEBHOOK_API_KEY", "spaces or control characters"),
    (
        {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_PASSWORD": "pw"},
        "KAFKA_SASL_USERNAME",
        "required when KAFKA_SECURITY_PROTOCOL is SASL_SSL",
    ),
    (
        {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u"},
        "KAFKA_SASL_PASSWORD",
        "required when KAFKA_SECURITY_PROTOCOL is SASL_PLAINTEXT",
    ),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "pw"}, "KAFKA_SECURITY_PROTOCOL", "use SASL_SSL"),
    (
        {"CTSYNC_SOURCE": "kafka", "KAFKA_TOPICS": "t"},
        "KAFKA_BOOTSTRAP_SERVERS",
        "required when CTSYNC_SOURCE=kafka",
    ),
    (
        {"CTSYNC_SOURCE": "kafka", "KAFKA_BOOTSTRAP_SERVERS": "b:9092"},
        "KAFKA_TOPICS",
        "required when CTSYNC_SOURCE=kafka",
    ),
    ({"CTSYNC_SOURCE": "pubsub"}, "PUBSUB_SUBSCRIPTION", "required when CTSYNC_SOURCE=pubsub"),
    (
        {"CTSYNC_DEAD_LETTER_URL": "kafka://dl"},
        "KAFKA_BOOTSTRAP_SERVERS",
        "required when CTSYNC_DEAD_LETTER_URL",
    ),
    (
        {
            "CTSYNC_SOURCE": "kafka",
            "KAFKA_BOOTSTRAP_SERVERS": "b:9092",
            "KAFKA_TOPICS": "ct,dl",
            "CTSYNC_DEAD_LETTER_URL": "kafka://dl",
        },
        "CTSYNC_DEAD_LETTER_URL",
        "consumed again",
    ),
    ({"CTSYNC_SOURCE": "push", "PUSH_LISTEN": "127.0.0.1:9000"}, "PUSH_LISTEN", "different ports"),
]


@pytest.mark.parametrize(("env", "variable", "fragment"), PROBLEMS)
def test_each_problem_is_one_line_naming_its_variable(
    env: dict[str, str], variable: str, fragment: str
) -> None:
    problems = problems_of(env)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{variable}: ")
    assert fragment in problems[0]
    assert "\n" not in problems[0]


def test_source_is_required_for_run_only() -> None:
    assert problems_of({}, "run") == ["CTSYNC_SOURCE: required for run (kafka, pubsub, push or file:<path>)"]
    assert load("replay").source is None
    assert load(
        "run", CTSYNC_SOURCE="push", PUSH_ALLOW_UNAUTHENTICATED="true", CTSYNC_DRY_RUN="true"
    ).source == SourceSpec("push")


def test_subscription_needs_commercetools_settings() -> None:
    problems = problems_of({"CTP_PROJECT_KEY": "acme"}, "subscription ensure")
    assert [p.split(":")[0] for p in problems] == [
        "CTP_CLIENT_ID",
        "CTP_CLIENT_SECRET",
        "CTP_AUTH_URL",
        "CTP_API_URL",
    ]


def test_hook_url_with_its_key() -> None:
    s = load(IPAAS_HOOK_URL=" https://hooks.ipaas.com/abc ", IPAAS_WEBHOOK_API_KEY=WEBHOOK_KEY)
    assert s.ipaas_hook_url == "https://hooks.ipaas.com/abc"


def test_settings_problems_checks_a_built_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTSYNC_SOURCE", "pubsub")
    s = Settings()
    assert s.problems("replay") == ["PUBSUB_SUBSCRIPTION: required when CTSYNC_SOURCE=pubsub"]


def test_every_problem_is_reported_together_in_the_contract_order() -> None:
    env = {
        "CTSYNC_LOG_LEVEL": "loud",
        "CTP_API_URL": "https://api.commercetools.com",
        "IPAAS_THROTTLE_LIMIT": "lots",
        "IPAAS_CONCURRENT_CONNECTIONS": "50",
        "IPAAS_HOOK_URL": "https://hooks.ipaas.com/x",
        "CTSYNC_SOURCE": "kafka",
        "CTP_PROJECT_KEY": "acme",
        "CTP_SCOPES": "view_products:other",
    }
    problems = problems_of(env, "run")
    assert [p.split(":")[0] for p in problems] == [
        "CTP_API_URL",
        "CTP_SCOPES",
        "IPAAS_WEBHOOK_API_KEY",
        "IPAAS_THROTTLE_LIMIT",
        "IPAAS_CONCURRENT_CONNECTIONS",
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_TOPICS",
        "CTSYNC_LOG_LEVEL",
    ]
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert str(info.value) == "\n".join(problems)


def test_a_check_across_an_invalid_variable_is_not_reported_twice() -> None:
    # The key is invalid, so "key required when the hook URL is set" would only repeat the problem.
    problems = problems_of({"IPAAS_HOOK_URL": "https://hooks.ipaas.com/x", "IPAAS_WEBHOOK_API_KEY": "a b"})
    assert problems == ["IPAAS_WEBHOOK_API_KEY: must not contain spaces or control characters"]
    # The protocol is invalid, so nothing is said about the SASL credentials it would need.
    assert problems_of({"KAFKA_SECURITY_PROTOCOL": "SASL", "KAFKA_SASL_USERNAME": "u"}) == [
        "KAFKA_SECURITY_PROTOCOL: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL (got 'SASL')"
    ]


def test_secret_values_never_appear_in_problems() -> None:
    env = {
        "CTP_CLIENT_SECRET": CLIENT_SECRET,
        "IPAAS_THROTTLE_LIMIT": CLIENT_SECRET,  # pasted into the wrong variable
        "IPAAS_CONCURRENT_CONNECTIONS": f"{WEBHOOK_KEY}\n",
        "IPAAS_WEBHOOK_API_KEY": f"{WEBHOOK_KEY}\tx",  # invalid itself
        "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "KAFKA_SASL_USERNAME": "user",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_GROUP_ID": SASL_PASSWORD,  # fine as a group id, but must not leak through another problem
        "CTSYNC_LOG_LEVEL": SASL_PASSWORD,
        "KAFKA_TOPICS": f"ct,{SASL_PASSWORD}",
        "IPAAS_HOOK_URL": "http://user:hook-pass-991@hooks.ipaas.com/x?code=q-secret-1",
        "CTSYNC_STATE_URL": "redis://:redis-pass-77@cache:6379/zero",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env, for_command="replay")
    text = f"{info.value}\n{info.value!r}\n{info.value.problems!r}"
    assert [p.split(":")[0] for p in info.value.problems] == [
        "IPAAS_HOOK_URL",
        "IPAAS_WEBHOOK_API_KEY",
        "IPAAS_THROTTLE_LIMIT",
        "IPAAS_CONCURRENT_CONNECTIONS",
        "KAFKA_TOPICS",
        "CTSYNC_STATE_URL",
        "CTSYNC_LOG_LEVEL",
    ]
    for secret in (
        CLIENT_SECRET,
        WEBHOOK_KEY,
        SASL_PASSWORD,
        "ünï",
        "o$rd",
        "hook-pass-991",
        "q-secret-1",
        "redis-pass-77",
    ):
        assert secret not in text
    assert "value not shown" in text
    assert "(got 'http://hooks.ipaas.com/x')" in text


def test_settings_constructed_directly_hide_the_input_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPAAS_THROTTLE_LIMIT", CLIENT_SECRET)
    with pytest.raises(ValueError) as info:
        Settings()
    assert CLIENT_SECRET not in str(info.value)


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "ctsync.env"
    env_file.write_text(
        "# from the Merchant Center\n"
        "CTP_PROJECT_KEY=acme\n"
        f"export CTP_CLIENT_SECRET='{CLIENT_SECRET}'\n"
        "IPAAS_THROTTLE_LIMIT=5\n"
        "IPAAS_BATCH_SIZE=50\n"
        "SOMETHING_ELSE=1\n"
    )
    s = load_settings(env_file, {"IPAAS_THROTTLE_LIMIT": "7"}, for_command="replay")
    assert (s.ctp_project_key, s.ipaas_throttle_limit, s.ipaas_batch_size) == ("acme", 7, 50)
    assert s.ctp_client_secret is not None and s.ctp_client_secret.get_secret_value() == CLIENT_SECRET


def test_an_empty_variable_counts_as_unset(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("IPAAS_THROTTLE_LIMIT=5\n")
    s = load_settings(
        env_file,
        {"IPAAS_THROTTLE_LIMIT": "", "IPAAS_HOOK_URL": "  ", "KAFKA_GROUP_ID": ""},
        for_command="replay",
    )
    assert (s.ipaas_throttle_limit, s.ipaas_hook_url, s.kafka_group_id) == (5, None, "ctsync")


def test_problems_in_the_env_file_are_reported(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"IPAAS_BATCH_SIZE=0\nCTP_CLIENT_SECRET={CLIENT_SECRET}\nIPAAS_THROTTLE_LIMIT={CLIENT_SECRET}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(env_file, {}, for_command="replay")
    assert [p.split(":")[0] for p in info.value.problems] == ["IPAAS_THROTTLE_LIMIT", "IPAAS_BATCH_SIZE"]
    assert CLIENT_SECRET not in str(info.value)


def test_a_missing_env_file_is_a_problem_alongside_the_others(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.env", {"IPAAS_BATCH_SIZE": "x"}, for_command="replay")
    assert info.value.problems[0] == f"--env-file: {tmp_path / 'nope.env'} does not exist or is not a file"
    assert info.value.problems[1].startswith("IPAAS_BATCH_SIZE: ")


def test_given_environ_replaces_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPAAS_THROTTLE_LIMIT", "not a number")
    assert load_settings(environ={}, for_command="replay").ipaas_throttle_limit == 500
    monkeypatch.setenv("IPAAS_THROTTLE_LIMIT", "9")
    assert load_settings(for_command="replay").ipaas_throttle_limit == 9


def test_variable_names_are_case_sensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(ipaas_throttle_limit="9").ipaas_throttle_limit == 500
    monkeypatch.setenv("ipaas_batch_size", "9")
    monkeypatch.setenv("IPAAS_DEBUG", "yes")
    s = Settings()
    assert (s.ipaas_batch_size, s.ipaas_debug) == (100, True)


def test_unknown_variables_catch_typos(tmp_path: Path) -> None:
    env = {
        "IPAAS_THROTLE_LIMIT": "5",
        "ctsync_source": "kafka",
        "IPAAS_THROTTLE_LIMIT": "5",
        "PUBSUB_PROJECT_ID": "p",
        "CTSYNC_REQUIRE_SERVERS": "1",
        "HOME": "/root",
        "CTP_CLIENT_SECRETS": "x",
    }
    assert unknown_variables(env) == ["CTP_CLIENT_SECRETS", "IPAAS_THROTLE_LIMIT", "ctsync_source"]
    env_file = tmp_path / ".env"
    env_file.write_text("KAFKA_TOPIC=ct\nKAFKA_TOPICS=ct\n")
    assert unknown_variables({}, env_file) == ["KAFKA_TOPIC"]


def test_every_setting_is_known() -> None:
    assert unknown_variables(dict.fromkeys(SETTING_VARIABLES, "x")) == []
    assert "CTSYNC_DRAIN_TIMEOUT_SECONDS" in SETTING_VARIABLES and len(SETTING_VARIABLES) == 45
    assert "CTSYNC_AUDIT" in SETTING_VARIABLES
    assert unknown_variables({"CTSYNC_AUDITS": "off"}) == ["CTSYNC_AUDITS"]
    assert did_you_mean("CTSYNC_AUDITS") == did_you_mean("CTSYNC_AUDT") == "CTSYNC_AUDIT"


def test_summary_is_safe_to_log() -> None:
    s = load(
        **COMMERCETOOLS,
        IPAAS_HOOK_URL="https://user:hook-pass-991@hooks.ipaas.com/x/y?code=q-secret-1#frag",
        IPAAS_WEBHOOK_API_KEY=WEBHOOK_KEY,
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_USERNAME="user",
        KAFKA_SASL_PASSWORD=SASL_PASSWORD,
        CTSYNC_STATE_URL="redis://:redis-pass-77@cache:6379/2",
    )
    summary = s.summary()
    text = json.dumps(summary)
    for secret in (CLIENT_SECRET, WEBHOOK_KEY, SASL_PASSWORD, "hook-pass-991", "q-secret-1", "redis-pass-77"):
        assert secret not in text
    assert (
        summary["ctp_client_secret_set"]
        == summary["ipaas_webhook_api_key_set"]
        == summary["kafka_sasl_password_set"]
        is True
    )
    assert summary["ipaas_hook_url"] == "https://hooks.ipaas.com/x/y"
    assert summary["ctsync_state_url"] == "redis://cache:6379/2"
    assert summary["ctsync_http_listen"] == "0.0.0.0:9000"
    assert summary["dry_run"] is False
    secret_names = {name.lower() for name in SECRET_VARIABLES}
    assert set(summary) >= {name.lower() for name in SETTING_VARIABLES} - secret_names
    assert set(summary) >= {f"{name}_set" for name in secret_names}
    assert not {"command", "source", "event"} & set(summary)  # the CLI logs these beside the summary


def test_summary_of_defaults() -> None:
    summary = load().summary()
    assert summary["ctp_client_secret_set"] is False and summary["ipaas_hook_url"] is None
    assert summary["ctsync_state_url"] == "sqlite:///ctsync-state.db" and summary["dry_run"] is True


def test_secret_values_lists_every_secret_that_is_set() -> None:
    assert load().secret_values() == []
    s = load(
        CTP_CLIENT_SECRET=CLIENT_SECRET,
        IPAAS_WEBHOOK_API_KEY=WEBHOOK_KEY,
        IPAAS_HOOK_URL="https://u:hook-pass-991@hooks.ipaas.com/x",
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_USERNAME="user",
        KAFKA_SASL_PASSWORD=SASL_PASSWORD,
        CTSYNC_STATE_URL="rediss://:redis-pass-77@cache:6380/0",
    )
    assert sorted(s.secret_values()) == sorted(
        [CLIENT_SECRET, WEBHOOK_KEY, SASL_PASSWORD, "redis-pass-77", "hook-pass-991"]
    )


def test_settings_are_immutable() -> None:
    s = load()
    with pytest.raises(ValueError):
        s.ipaas_batch_size = 5  # type: ignore[misc]


def test_the_example_env_file_names_every_setting_and_nothing_else() -> None:
    import re

    from consumer.config import SETTING_VARIABLES

    text = (REPO_ROOT / "examples" / ".env.example").read_text()
    named = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert named == set(SETTING_VARIABLES)
    assert load_settings(REPO_ROOT / "examples" / ".env.example", environ={})


def test_a_push_service_account_without_an_audience_is_a_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            environ={"CTSYNC_SOURCE": "push", "PUSH_SERVICE_ACCOUNT": "push@p.iam.gserviceaccount.com"},
            for_command="run",
        )
    assert any(p.startswith("PUSH_SERVICE_ACCOUNT:") and "PUSH_AUDIENCE" in p for p in caught.value.problems)
