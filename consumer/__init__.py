"""ctsync's core: commercetools change events in, throttled iPaaS.com notifications out.

The core holds pure logic and the ports (``consumer.ports``) it needs; it never imports a broker or an HTTP
library. Adapters in the ``adapters`` package implement the ports.
"""
