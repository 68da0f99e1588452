"""ctsync's core: commercetools change events in, throttled iPaaS.com notifications out.

Every module here but ``consumer.cli`` is the core: rules and the ports (``consumer.ports``) they need. The
core imports no adapter, no ``consumer.cli`` and no broker, HTTP or CLI library; ``make architecture`` checks
it. ``consumer.cli`` is the edge: the commands, and the wiring that builds adapters from the settings.
"""
