"""What every command does first: read its settings (exit 2 with every problem named) and set up the log.

Exit codes: 0 success (a clean stop included), 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from consumer import audit
from consumer.config import Settings, did_you_mean, load

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

ENV_FILE = click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read settings from this .env file too (the process environment wins).",
)


def config_failure(problems: list[str]) -> NoReturn:
    click.echo("ctsync: configuration error:", err=True)
    for problem in problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(EXIT_CONFIG)


def usage_failure(message: str) -> NoReturn:
    click.echo(f"ctsync: {message}", err=True)
    sys.exit(EXIT_CONFIG)


def settings_for(env_file: Path | None, command: str, *, log_to_stderr: bool = False) -> Settings:
    """Load and check the settings (exit 2 on a problem) and set up the audit log.

    ``log_to_stderr``: the command prints its own results on stdout, so the log goes to stderr.
    """
    if env_file is not None and not env_file.is_file():
        config_failure([f"--env-file: {env_file} does not exist or is not a file"])
    loaded = load(env_file, for_command=command)
    unknown = {name: did_you_mean(name) for name in loaded.unknown}
    settings = loaded.settings
    if loaded.problems or settings is None:
        # A misspelt variable is often why a required one is missing: name it with the problems.
        hints = [
            f"{name}: not a ctsync setting; did you mean {meant}?" for name, meant in unknown.items() if meant
        ]
        config_failure([found.text for found in loaded.problems] + hints)
    audit.configure(
        level=settings.ctsync_log_level,
        log_format=settings.ctsync_log_format,
        secrets=settings.secret_values(),
        stream=sys.stderr.buffer if log_to_stderr else None,
        audit=settings.ctsync_audit == "on",
    )
    for name, meant in unknown.items():
        reason = "not a ctsync setting" + (f"; did you mean {meant}?" if meant else " (typo?)")
        where = "environment" if name in os.environ else f"--env-file {env_file}"
        audit.get_logger().warning(
            audit.CONFIG_WARNING, variable=name, reason=reason, did_you_mean=meant, where=where
        )
    return settings


def configure_stderr_audit(settings: Settings | None, secrets: list[str]) -> None:
    # These commands print their own output on stdout (and JSON with --json), so the adapters' log lines go
    # to stderr instead.
    audit.configure(
        level=settings.ctsync_log_level if settings is not None else "WARNING",
        log_format=settings.ctsync_log_format if settings is not None else "json",
        secrets=secrets,
        stream=sys.stderr.buffer,
        audit=settings is not None and settings.ctsync_audit == "on",
    )


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def describe_open_error(exc: BaseException, variable: str) -> str:
    if isinstance(exc, OSError):
        return f"{variable}: cannot open {exc.filename}: {exc.strerror}"
    return str(exc)
