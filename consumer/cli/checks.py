"""``ctsync check``: the installation guide's verification, one result per check, each failure with its fix.

The functions that judge (URLs, scopes, answers) are pure; ``run_checks`` performs the calls through the
adapters, which wiring builds (and imports lazily, so the core stays free of HTTP and broker libraries).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit

from consumer.audit import redact
from consumer.config import KNOWN_REGIONS, Problem, Settings, commercetools_region, did_you_mean, display_url
from consumer.config.values import commercetools_url

if TYPE_CHECKING:
    from consumer.cli.wiring import CommercetoolsClient

# How long a probe of one outside system may take before its check fails.
PROBE_SECONDS: Final = 15.0
_API_CLIENTS: Final = "Merchant Center > Settings > Developer settings > API clients"


class Status(StrEnum):
    OK = "OK"
    FAIL = "FAIL"
    SKIP = "SKIP"
    # Passes, with something to know: what only an operator command needs is missing, for instance.
    NOTE = "NOTE"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's outcome; ``fix`` says what to change when it did not pass.

    ``config`` marks a failure of the configuration itself (exit code 2 rather than 1).
    """

    name: str
    status: Status
    detail: str
    fix: str = ""
    config: bool = False

    @property
    def passed(self) -> bool:
        return self.status in (Status.OK, Status.NOTE)


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.OK, detail)


def fail(name: str, detail: str, fix: str, *, config: bool = False) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, fix, config)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)


def note(name: str, detail: str, fix: str = "") -> CheckResult:
    return CheckResult(name, Status.NOTE, detail, fix)


# --- settings and URLs ---


def settings_result(problems: Sequence[Problem], unknown: Sequence[str] = ()) -> CheckResult:
    """Judge the settings from the problems ``load_settings_with_problems`` found."""
    if problems:
        return fail(
            "settings",
            f"{len(problems)} problem(s): " + "; ".join(found.text for found in problems),
            "fix each variable named above",
            config=True,
        )
    detail = "every setting is valid"
    if unknown:
        named = [
            f"{name} (did you mean {meant}?)" if (meant := did_you_mean(name)) else name for name in unknown
        ]
        detail += f" (ignored, not ctsync settings: {', '.join(named)})"
    return ok("settings", detail)


def _is_commercetools(host: str) -> bool:
    return host == "commercetools.com" or host.endswith(".commercetools.com")


def region_result(api_url: str | None, auth_url: str | None) -> CheckResult:
    """Judge CTP_API_URL and CTP_AUTH_URL as given: regional, and of the same region."""
    name = "region"
    if not api_url or not auth_url:
        missing = " and ".join(n for n, v in (("CTP_API_URL", api_url), ("CTP_AUTH_URL", auth_url)) if not v)
        return fail(
            name, f"{missing} not set", f"copy them from the API client's .env ({_API_CLIENTS})", config=True
        )
    problems: list[str] = []
    hosts = {}
    urls: tuple[tuple[str, str, Literal["api", "auth"]], ...] = (
        ("CTP_API_URL", api_url, "api"),
        ("CTP_AUTH_URL", auth_url, "auth"),
    )
    for variable, url, service in urls:
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        hosts[variable] = host
        if _is_commercetools(host):
            # The rule the settings apply, judged here on the value as written.
            try:
                commercetools_url(url, service)
            except ValueError as exc:
                problems.append(f"{variable} {display_url(url)}: {exc}")
    if problems:
        return fail(
            name,
            "; ".join(problems),
            f"use the URLs of your project's region, as the API client's .env gives them "
            f"(regions: {', '.join(sorted(KNOWN_REGIONS))})",
            config=True,
        )
    api_region, auth_region = commercetools_region(api_url), commercetools_region(auth_url)
    if api_region and auth_region:
        if api_region != auth_region:
            return fail(
                name,
                f"CTP_API_URL is in region {api_region} but CTP_AUTH_URL in {auth_region}",
                f"use https://auth.{api_region}.commercetools.com for CTP_AUTH_URL (the project's region)",
                config=True,
            )
        unknown = (
            "" if api_region in KNOWN_REGIONS else " (not a region this build knows; check the spelling)"
        )
        return ok(name, f"API and auth URLs are both in region {api_region}{unknown}")
    if _is_commercetools(hosts["CTP_API_URL"]) != _is_commercetools(hosts["CTP_AUTH_URL"]):
        return ok(name, "one of the URLs is not a commercetools.com host (a proxy?); region not compared")
    return ok(name, "the URLs are not commercetools.com hosts (a proxy or mock); region not checked")


# --- scopes ---


@dataclass(frozen=True, slots=True)
class ScopeNeed:
    """A permission ctsync needs, satisfied by any of ``permissions`` on the project (or manage_project)."""

    permissions: tuple[str, ...]
    why: str

    def scope(self, project_key: str) -> str:
        return f"{self.permissions[0]}:{project_key}"


# Reading a resource type needs one of these (``manage_*`` includes ``view_*``); the first is the one to ask
# for. From commercetools' scope reference: inventory and categories are also readable with view_products.
_READ_PERMISSIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "product": ("view_products", "manage_products"),
    "inventory-entry": ("view_products", "manage_products"),
    "category": ("view_categories", "manage_categories", "view_products", "manage_products"),
    "customer": ("view_customers", "manage_customers"),
    "customer-group": (
        "view_customer_groups",
        "manage_customer_groups",
        "view_customers",
        "manage_customers",
    ),
    "business-unit": ("view_business_units", "manage_business_units"),
    "order": ("view_orders", "manage_orders"),
    "payment": ("view_payments", "manage_payments"),
    "standalone-price": ("view_standalone_prices", "manage_standalone_prices", "view_products"),
    "product-selection": ("view_product_selections", "manage_product_selections", "view_products"),
    "store": ("view_stores", "manage_stores"),
    "channel": ("view_channels", "manage_channels"),
}


def read_permissions(resource_type: str) -> tuple[str, ...]:
    """Return the permissions that allow reading ``resource_type``, the usual one first."""
    known = _READ_PERMISSIONS.get(resource_type)
    if known is not None:
        return known
    plural = resource_type.replace("-", "_") + "s"
    return (f"view_{plural}", f"manage_{plural}")


def scope_needs(resource_types: Collection[str], *, subscriptions: bool = True) -> list[ScopeNeed]:
    """Return what the routed resource types and ``subscription ensure`` need, one need per permission."""
    needs: dict[tuple[str, ...], list[str]] = {}
    for resource_type in sorted(resource_types):
        needs.setdefault(read_permissions(resource_type), []).append(resource_type)
    result = [ScopeNeed(p, "read " + ", ".join(types)) for p, types in needs.items()]
    if subscriptions:
        result.append(ScopeNeed(("manage_subscriptions",), "ctsync subscription ensure"))
    return result


def missing_scopes(granted: Collection[str], needs: Sequence[ScopeNeed], project_key: str) -> list[ScopeNeed]:
    """Return the needs no granted scope satisfies; store-scoped grants do not cover a whole project."""
    permissions = {
        s.split(":")[0] for s in granted if s.split(":")[1:2] == [project_key] and s.count(":") == 1
    }
    if "manage_project" in permissions:
        return []
    return [need for need in needs if permissions.isdisjoint(need.permissions)]


# What only operator commands need; the running service never does, so its absence fails no check.
OPERATOR_NEEDS: Final = (ScopeNeed(("manage_subscriptions",), "ctsync subscription ensure"),)


def other_project(granted: Collection[str], project_key: str) -> list[str]:
    """Return the projects the granted scopes name when none of them is ``project_key`` (else empty): then
    CTP_PROJECT_KEY, not the scopes, is what is wrong."""
    projects = {p for scope in granted if (p := _granted_project(scope)) is not None}
    return [] if not projects or project_key in projects else sorted(projects)


def _granted_project(scope: str) -> str | None:
    parts = scope.split(":")
    return parts[1] if len(parts) >= 2 and parts[1] else None


def scopes_result(granted: Collection[str], needs: Sequence[ScopeNeed], project_key: str) -> CheckResult:
    """Judge the scopes the running service needs (reading the routed types)."""
    others = other_project(granted, project_key)
    if others:
        return fail(
            "scopes",
            f"every granted scope names project {' / '.join(others)}, none names CTP_PROJECT_KEY "
            f"{project_key!r}",
            f"set CTP_PROJECT_KEY={others[0]} if that is the project (the API client's .env names it), "
            f"or use an API client of project {project_key!r}",
            config=True,
        )
    missing = missing_scopes(granted, needs, project_key)
    if not missing:
        return ok("scopes", f"granted scopes cover {len(needs)} need(s): " + ", ".join(sorted(granted)))
    names = [f"{need.scope(project_key)} ({need.why})" for need in missing]
    return fail(
        "scopes",
        "missing " + ", ".join(names),
        f"create an API client with these scopes too ({_API_CLIENTS}; scopes cannot be added to an "
        "existing client), then update CTP_CLIENT_ID, CTP_CLIENT_SECRET and CTP_SCOPES",
    )


def operator_scopes_result(granted: Collection[str], project_key: str) -> CheckResult:
    """Judge the scopes only operator commands need: reported, never a failure of the service's check."""
    name = "operator-scopes"
    missing = missing_scopes(granted, OPERATOR_NEEDS, project_key)
    if not missing:
        return ok(name, "granted: " + ", ".join(n.scope(project_key) for n in OPERATOR_NEEDS))
    names = ", ".join(f"{need.scope(project_key)} ({need.why})" for need in missing)
    return note(
        name,
        f"not granted: {names}; only that command needs it, the service does not",
        f"run {', '.join(n.why for n in missing)} with an API client that has it (an operator's client)",
    )


# --- answers from commercetools and the hook ---


def token_failure(status: int | None, codes: Sequence[str], message: str) -> CheckResult:
    """Turn a refused token exchange into a check result with its fix."""
    name = "token"
    if "invalid_client" in codes:
        return fail(
            name,
            f"the auth server refused the client credentials (HTTP {status} invalid_client)",
            f"check CTP_CLIENT_ID / CTP_CLIENT_SECRET from {_API_CLIENTS}",
        )
    if "invalid_scope" in codes:
        return fail(
            name,
            f"the API client does not hold every scope CTP_SCOPES asks for: {message}",
            "set CTP_SCOPES to the scopes of the API client's .env (or unset it to get all of them)",
        )
    if status is None:
        return fail(
            name, f"no answer from CTP_AUTH_URL: {message}", "check CTP_AUTH_URL and the network path"
        )
    detail = f"HTTP {status}" + (f" {', '.join(codes)}" if codes else "") + f": {message}"
    return fail(name, f"the token exchange failed: {detail}", "check CTP_AUTH_URL and the API client")


def project_failure(status: int | None, codes: Sequence[str], message: str, project_key: str) -> CheckResult:
    name = "project"
    if status == 404:
        return fail(
            name,
            f"project {project_key!r} was not found",
            "check CTP_PROJECT_KEY and that CTP_API_URL is the project's region",
        )
    if status == 403 or "insufficient_scope" in codes:
        return fail(
            name, f"the token may not read project {project_key!r}: {message}", "see the scopes check"
        )
    where = f"HTTP {status}" if status is not None else "no answer"
    return fail(name, f"{where}: {message}", "check CTP_API_URL and CTP_PROJECT_KEY")


def hook_result(status: int | None, detail: str) -> CheckResult:
    """Judge the hook's answer to an empty batch (``{"notifications": []}``), which creates no work.

    2xx: accepted. 400/422: the key was accepted and the empty body refused (the hook checks the key first),
    still no work created. 401/403: the key is wrong. Anything else: the URL is wrong or the hook is down.
    """
    name = "hook"
    if status is None:
        return fail(
            name, f"no answer from IPAAS_HOOK_URL: {detail}", "check IPAAS_HOOK_URL and the network path"
        )
    if 200 <= status < 300:
        return ok(name, f"the hook answered {status} to an empty batch: URL and key accepted")
    if status in (400, 422):
        return ok(name, f"the hook took the key and refused the empty test batch ({status}: {detail})")
    if status in (401, 403):
        return fail(
            name,
            f"the hook refused the webhook key ({status})",
            "copy IPAAS_WEBHOOK_API_KEY from the iPaaS.com subscription's settings page",
        )
    if status == 429:
        return ok(name, "the hook answered 429: reachable, but the subscription's throttle is used up now")
    if status in (404, 405):
        return fail(
            name, f"the hook answered {status}: {detail}", "check IPAAS_HOOK_URL (copy it from iPaaS.com)"
        )
    if 300 <= status < 400:
        # Not followed: the key would go to the other address.
        return fail(
            name,
            f"the hook answered {status}: {detail}",
            "set IPAAS_HOOK_URL to the final address, once you know it is iPaaS.com's",
        )
    return fail(
        name, f"the hook answered {status}: {detail}", "check IPAAS_HOOK_URL; retry if iPaaS.com is down"
    )


# --- rendering ---


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when every check passed; 2 when a configuration check failed; else 1."""
    if all(r.passed for r in results):
        return 0
    return 2 if any(r.config and r.status is Status.FAIL for r in results) else 1


def render_text(results: Sequence[CheckResult]) -> list[str]:
    """Return one line per check (and an indented fix under each failure), then a verdict."""
    lines: list[str] = []
    width = max((len(r.name) for r in results), default=0)
    for r in results:
        lines.append(redact(f"{r.status.value:<4}  {r.name:<{width}}  {r.detail}"))
        if r.fix and r.status is Status.FAIL:
            lines.append(redact(f"{'':<4}  {'':<{width}}  fix: {r.fix}"))
    failed = [r.name for r in results if not r.passed]
    lines.append("all checks passed" if not failed else f"not ready: {', '.join(failed)}")
    return lines


def render_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    return {
        "ok": all(r.passed for r in results),
        "checks": [
            {**asdict(r), "status": r.status.value, "detail": redact(r.detail), "fix": redact(r.fix)}
            for r in results
        ],
    }


# --- running them ---


async def run_checks(
    settings: Settings | None,
    raw: Mapping[str, str],
    problems: Sequence[Problem],
    unknown: Sequence[str] = (),
) -> list[CheckResult]:
    """Run every check. ``settings`` were loaded without the invalid variables (None if that failed too);
    ``raw`` holds the values as given, for the checks that judge what the operator wrote."""
    results = [settings_result(problems, unknown)]
    region = region_result(raw.get("CTP_API_URL"), raw.get("CTP_AUTH_URL"))
    results.append(region)
    if settings is None:
        for name in (
            "token",
            "scopes",
            "operator-scopes",
            "project",
            "hook",
            "source",
            "state",
            "dead-letters",
        ):
            results.append(skip(name, "not run: the settings could not be loaded"))
        return results
    results += await _commercetools_checks(settings, region)
    results.append(await _hook_check(settings))
    results.append(await _source_check(settings))
    results.append(await _state_check(settings))
    results.append(await _dead_letter_check(settings))
    return results


async def _dead_letter_check(settings: Settings) -> CheckResult:
    """The dead-letter target takes letters: a file that can be appended to, a topic that exists."""
    name, target = "dead-letters", settings.dead_letter
    if target.kind == "file":
        assert target.path is not None
        if target.path.exists():
            if target.path.is_file() and os.access(target.path, os.W_OK):
                return ok(name, f"file {target.path} can be appended to")
            return fail(
                name,
                f"file {target.path} is not a writable file",
                "check CTSYNC_DEAD_LETTER_URL and permissions",
            )
        # The sink creates missing folders: the nearest one that exists must be writable.
        folder = target.path.parent
        while not folder.exists():
            folder = folder.parent
        if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
            return ok(name, f"file {target.path} will be created")
        return fail(
            name,
            f"file {target.path} cannot be created in {folder}",
            "check CTSYNC_DEAD_LETTER_URL and permissions",
        )
    assert target.topic is not None
    from consumer.cli import wiring

    try:
        async with asyncio.timeout(PROBE_SECONDS):
            description = await wiring.probe_dead_letter_topic(settings)
    except TimeoutError:
        return fail(
            name, f"{target.kind}: no answer within {PROBE_SECONDS:g}s", "check CTSYNC_DEAD_LETTER_URL"
        )
    except (ConnectionError, LookupError, OSError) as exc:
        return fail(
            name,
            f"{target.kind}: {exc}",
            "create the dead-letter topic, or fix CTSYNC_DEAD_LETTER_URL (and the right to publish to it)",
        )
    return ok(name, description)


async def _state_check(settings: Settings) -> CheckResult:
    """The state store opens and answers: Redis PINGs, a SQLite file can be created or written."""
    from consumer.cli import wiring

    name, state = "state", settings.state
    if state.kind == "memory":
        return ok(name, "memory: nothing is remembered across restarts (fine for tests, not for production)")
    if state.kind == "sqlite":
        assert state.path is not None
        folder = state.path.parent
        if state.path.exists() and os.access(state.path, os.W_OK):
            problem = await wiring.sqlite_state_problem(state.path)
            if problem is not None:
                return fail(
                    name, f"sqlite: {problem}", "move the file away or fix CTSYNC_STATE_URL", config=True
                )
            return ok(name, f"sqlite: {state.path} is writable")
        if not state.path.exists() and folder.is_dir() and os.access(folder, os.W_OK):
            return ok(name, f"sqlite: {state.path} will be created")
        return fail(name, f"sqlite: {state.path} cannot be written", "check CTSYNC_STATE_URL and permissions")
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            store = await wiring.redis_state_store(settings)
            await store.close()
    except (TimeoutError, ConnectionError, OSError) as exc:
        return fail(
            name, f"redis: {exc or 'no answer'}", "check CTSYNC_STATE_URL (host, port, password, TLS)"
        )
    return ok(name, "redis: answers (shared state and throttle budget)")


async def _commercetools_checks(settings: Settings, region: CheckResult) -> list[CheckResult]:
    missing = [
        name
        for name in ("CTP_PROJECT_KEY", "CTP_CLIENT_ID", "CTP_CLIENT_SECRET", "CTP_AUTH_URL", "CTP_API_URL")
        if getattr(settings, name.lower()) is None
    ]
    if missing or not region.passed:
        why = f"{', '.join(missing)} not set or not valid" if missing else "fix the region check first"
        return [skip(name, f"not run: {why}") for name in ("token", "scopes", "operator-scopes", "project")]
    from consumer.cli import wiring

    project_key = str(settings.ctp_project_key)
    results: list[CheckResult] = []
    async with wiring.commercetools_client(settings, timeout=PROBE_SECONDS, attempts=2) as client:
        try:
            granted = await client.granted_scopes()
        except wiring.commercetools_error() as exc:
            results.append(token_failure(exc.status, exc.codes, exc.message))
            results += [skip(name, "not run: no token") for name in ("scopes", "operator-scopes", "project")]
            return results
        results.append(ok("token", f"token exchange with {display_url(str(settings.ctp_auth_url))} works"))
        try:
            routed = list(wiring.router(settings).scope_map.types)
        except ValueError as exc:  # a broken IPAAS_SCOPE_MAP; the settings check names it
            results.append(
                fail("scopes", f"cannot read the scope map: {exc}", "fix IPAAS_SCOPE_MAP", config=True)
            )
        else:
            results.append(scopes_result(granted, scope_needs(routed, subscriptions=False), project_key))
        results.append(operator_scopes_result(granted, project_key))
        results.append(await _project_check(client, project_key))
    return results


async def _project_check(client: CommercetoolsClient, project_key: str) -> CheckResult:
    from consumer.cli import wiring

    try:
        project = await client.get_project()
    except wiring.commercetools_error() as exc:
        if exc.status != 403:
            return project_failure(exc.status, exc.codes, exc.message, project_key)
        # Reading the project's settings takes view_project_settings, which ctsync itself never needs;
        # the subscriptions endpoint (manage_subscriptions) shows the project answers just as well.
        try:
            await client.request("GET", "/subscriptions", params=[("limit", "1"), ("withTotal", "false")])
        except wiring.commercetools_error() as second:
            return project_failure(second.status, second.codes, second.message, project_key)
        return ok("project", f"project {project_key!r} answers (its subscriptions are readable)")
    name = project.get("name") or project.get("key")
    return ok("project", f"project {project_key!r} answers ({name}, version {project.get('version')})")


async def _hook_check(settings: Settings) -> CheckResult:
    if settings.ipaas_hook_url is None:
        return fail(
            "hook",
            "IPAAS_HOOK_URL is not set: ctsync run refuses to start without it (a dry run, which sends "
            "nothing, is only ever explicit: run --dry-run or CTSYNC_DRY_RUN=true)",
            "set IPAAS_HOOK_URL and IPAAS_WEBHOOK_API_KEY from the iPaaS.com subscription",
        )
    if settings.ipaas_webhook_api_key is None:
        return skip("hook", "not run: IPAAS_WEBHOOK_API_KEY is not set")
    from consumer.cli import wiring

    answer = await wiring.probe_hook(settings, seconds=PROBE_SECONDS)
    return hook_result(answer.status, answer.detail)


async def _source_check(settings: Settings) -> CheckResult:
    name = "source"
    spec = settings.source
    if spec is None:
        return fail(
            name, "CTSYNC_SOURCE is not set", "set CTSYNC_SOURCE to kafka, pubsub, push or file:<path>"
        )
    if spec.kind == "file":
        assert spec.path is not None
        if spec.path.is_file() and os.access(spec.path, os.R_OK):
            return ok(name, f"file {spec.path} is readable")
        return fail(name, f"file {spec.path} does not exist or is not readable", "check CTSYNC_SOURCE")
    if spec.kind == "push":
        return _bind_check(settings)
    from consumer.cli import wiring

    try:
        async with asyncio.timeout(PROBE_SECONDS):
            description = await wiring.probe_source(settings)
    except TimeoutError:
        return fail(name, f"{spec.kind}: no answer within {PROBE_SECONDS:g}s", _source_fix(spec.kind))
    except (ConnectionError, LookupError, OSError) as exc:
        # The Kafka adapter knows the fix when the broker refused the credentials or the certificate.
        return fail(name, f"{spec.kind}: {exc}", getattr(exc, "fix", None) or _source_fix(spec.kind))
    return ok(name, description)


def _source_fix(kind: str) -> str:
    if kind == "kafka":
        return "check KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPICS and the KAFKA_SASL_* credentials"
    return "check PUBSUB_SUBSCRIPTION and the service account's credentials (GOOGLE_APPLICATION_CREDENTIALS)"


def _bind_check(settings: Settings) -> CheckResult:
    address = settings.push_listen
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address.host, address.port))
    except OSError as exc:
        return fail(
            "source", f"push: cannot listen on {address}: {exc.strerror}", "choose a free PUSH_LISTEN"
        )
    return ok("source", f"push: {address} can be listened on")
