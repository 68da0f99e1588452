"""Loading the settings: from the environment and an optional .env file, every problem reported at once.

``load_settings`` is the entry point: it reads an optional ``.env`` file and the environment (the environment
wins), validates each variable, then checks the settings that only make sense together, and raises one
``ConfigError`` listing every problem, one line each, starting with the variable's name. Problem lines never
contain a secret, not even when a secret was pasted into the wrong variable.

An empty or blank value counts as unset. A dry run is only ever explicit (``CTSYNC_DRY_RUN=true`` or
``ctsync run --dry-run``): ``run`` with a source and no ``IPAAS_HOOK_URL`` is a configuration error, because a
misspelt or forgotten hook URL would otherwise consume the stream without sending anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from difflib import SequenceMatcher, get_close_matches
from pathlib import Path
from typing import Literal, get_args, get_origin

import annotated_types
from dotenv import dotenv_values
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import InitSettingsSource

from consumer.audit import display_url
from consumer.config.settings import (
    FIELD_BY_VARIABLE,
    SETTING_VARIABLES,
    Problem,
    Settings,
)
from consumer.config.values import (
    FOREIGN_VARIABLES,
    MAX_ECHO,
    SECRET_MIN_SCRUB,
    SECRET_RUN,
    SECRET_VARIABLES,
    SETTING_PREFIXES,
    URL_VARIABLES,
    ConfigError,
    url_password,
)


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
    if variable in URL_VARIABLES:
        value = display_url(value)
    if _shares_secret(value, secrets):
        return " (value not shown: it contains a secret)"
    if len(value) > MAX_ECHO:
        value = value[: MAX_ECHO - 3] + "..."
    return f" (got {value!r})"


def _shares_secret(value: str, secrets: Iterable[str]) -> bool:
    """Return whether ``value`` holds a secret, or a run of it long enough to give it away."""
    for secret in secrets:
        if not secret:
            continue
        if secret in value:
            return True
        match = SequenceMatcher(None, value, secret, autojunk=False).find_longest_match()
        if match.size >= min(SECRET_RUN, len(secret)):
            return True
    return False


def _describe(error: ErrorDetails, given: Mapping[str, str], secrets: Iterable[str]) -> tuple[str, str]:
    """Return (variable, problem line) for one pydantic error, built from its loc, type and our own text.

    pydantic's own rendering quotes ``input_value``, which may be a secret, so it is never used.
    """
    variable = str(error["loc"][0]) if error["loc"] else "configuration"
    info = FIELD_BY_VARIABLE.get(variable)
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
        if len(secret) >= SECRET_MIN_SCRUB:
            text = text.replace(secret, "[redacted]")
    return text


def _settings_values(environ: Mapping[str, str | None]) -> dict[str, str]:
    return {
        name: value
        for name, value in environ.items()
        if name in FIELD_BY_VARIABLE and value and value.strip()
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
        raise ConfigError([found.text for found in problems])
    assert settings is not None, "a failed build always leaves a problem"
    return settings


@dataclass(frozen=True, slots=True)
class Loaded:
    """What loading found, for every command alike (``run`` exits on a problem, ``check`` reports it).

    ``settings``: built from every valid variable (None only when not even that could be built);
    ``problems``: every problem, in the contract's order, never with a secret in it; ``values``: the
    settings' values as given (the env file's, then the environment's, which win); ``unknown``: variables
    that look like ctsync settings but are not (typos).
    """

    settings: Settings | None
    problems: list[Problem]
    values: dict[str, str]
    unknown: list[str]


def load(
    env_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    for_command: str = "run",
) -> Loaded:
    """Load the settings as far as they are valid, and list every problem.

    The settings are built without the variables that are invalid on their own; problems across variables
    (a hook URL without its key) leave them built, so ``ctsync check`` can still run every other check.
    Values come from ``env_file`` (if given) and then the environment, which wins: ``environ`` when given,
    replacing ``os.environ`` entirely, else ``os.environ``.
    """
    environment = os.environ if environ is None else environ
    values: dict[str, str] = {}
    problems: list[Problem] = []
    names = set(environment)
    if env_file is not None:
        file_values, file_problem = _read_env_file(Path(env_file))
        names |= set(file_values)
        values.update(_settings_values(file_values))
        if file_problem is not None:
            problems.append(Problem(("--env-file",), file_problem))
    values.update(_settings_values(environment))

    secrets = [values[name] for name in SECRET_VARIABLES if name in values]
    secrets += [p for p in (url_password(values[name]) for name in URL_VARIABLES if name in values) if p]
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
                problems.append(Problem((variable,), line))
        # Rebuilt without the invalid variables, the rest can still be checked together; a check
        # involving an invalid variable is skipped, as it would judge a default nobody chose.
        try:
            settings = _build({name: value for name, value in values.items() if name not in invalid})
        except ValidationError:
            settings = None
    for found in settings.problems_found(for_command) if settings is not None else ():
        if invalid.isdisjoint(found.variables):
            problems.append(found)
    problems.sort(key=lambda found: _order(found.variable))
    scrubbed = [found._replace(text=_scrub(found.text, secrets)) for found in problems]
    return Loaded(settings, scrubbed, values, _unknown(names))


def load_settings_with_problems(
    env_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    for_command: str = "run",
) -> tuple[Settings | None, list[Problem]]:
    """``load``'s settings and problems."""
    loaded = load(env_file, environ, for_command=for_command)
    return loaded.settings, loaded.problems


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
    return _unknown(names)


def _unknown(names: Iterable[str]) -> list[str]:
    return sorted(
        name
        for name in names
        if name.upper().startswith(SETTING_PREFIXES)
        and name not in FIELD_BY_VARIABLE
        and name not in FOREIGN_VARIABLES
    )
