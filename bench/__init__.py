"""Benchmarks, run as modules from the repository root (``python -m bench.peers``), so they import the test
servers as the package ``tests.servers``; ``make bench`` runs them all."""
