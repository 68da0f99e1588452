"""``python -m consumer.cli``: the same command group as the ``ctsync`` script."""

from consumer.cli.main import main

main()
