"""Adapters: everything that talks to the outside world, each implementing a port of ``consumer.ports``.

Each takes a small options value that ``consumer.cli.wiring`` builds from the settings; no adapter imports
the settings or the command line (``make architecture`` checks it).
"""
