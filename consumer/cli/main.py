"""The ``ctsync`` command group: every command is defined in its own module and registered here, one way."""

from __future__ import annotations

import click

from consumer.cli import operator, run, sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ctsync")
def main() -> None:
    """Keep iPaaS.com in step with commercetools: Subscription deliveries in, hook notifications out."""


for command in (
    run.run,
    run.replay,
    operator.check,
    operator.subscription,
    operator.audit_command,
    operator.dead_letters,
    sweep.backfill,
    sweep.reconcile,
):
    main.add_command(command)
