"""Adapters: everything that talks to the outside world, each implementing a port of ``consumer.ports``."""
