"""The edge: the ``ctsync`` command line, and the one place that builds adapters from settings.

Exit codes: 0 success (a clean stop included), 1 runtime failure, 2 bad configuration or usage.

``main`` registers the commands (``run``, ``operator``, ``sweep``); ``startup`` reads the settings every
command needs; ``lifecycle`` runs a pipeline (signals, collector, start and stop lines, error triage);
``wiring`` builds it from Settings and is the only module here that imports adapters; ``checks`` are the
checks of ``ctsync check``. Nothing in the core imports from here.
"""

from consumer.cli.main import main

__all__ = ["main"]
