"""ctsync's tests: ``unit/`` (the core's rules, in memory), ``integration/`` (adapters, commands and the
service on real servers), ``servers/`` (starting those servers; also imported by ``bench/``)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
