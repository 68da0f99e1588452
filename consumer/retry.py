"""How long to wait before trying again: the one backoff formula of ctsync.

Exponential from ``base``, capped at ``cap``, with equal jitter (half the ceiling, plus a random part of the
other half), so replicas that failed together do not retry together, and a wait is never zero.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Return the wait before retry ``attempt`` (1, 2, ...): exponential, capped, with equal jitter."""
    # The exponent is bounded so a long outage (thousands of attempts) cannot overflow a float.
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return ceiling / 2 + rand() * ceiling / 2
