"""What a sweep tells the person at the terminal: its progress line, its summary, the subscriptions' state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from consumer.sweep import SweepCounts, text_value


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_line(
    *,
    type_id: str | None,
    counts: SweepCounts,
    types_total: int,
    notified: int,
    queued: int,
    elapsed: float,
    ceiling_per_min: float,
) -> str:
    """Return the one-line progress a person at a terminal sees.

    The sweep reads with ``withTotal=false`` (counting is expensive on large projects), so the total is
    unknown and no overall ETA is claimed; what is known is how long the resources read but not yet notified
    take at the budget's ceiling, which is a lower bound for the time still to go.
    """
    rate = notified * 60.0 / elapsed if elapsed > 0 else 0.0
    parts = [
        f"backfill {type_id or '-'} ({counts.types_done}/{types_total} types done)",
        f"pages {counts.pages}",
        f"resources {counts.resources}",
        f"notified {notified}",
        f"{rate:,.0f}/min",
    ]
    if queued and ceiling_per_min > 0:
        parts.append(f"queued {queued} (>= {_duration(queued * 60.0 / ceiling_per_min)} at the budget)")
    parts.append("total unknown (withTotal=false)")
    return ", ".join(parts)


def summary_lines(
    *,
    types: Sequence[str],
    counts: SweepCounts,
    per_type: Mapping[str, int],
    notified: int,
    elapsed: float,
    ceiling_per_min: float,
) -> list[str]:
    """Return the end-of-sweep summary (stderr)."""
    rate = notified * 60.0 / elapsed if elapsed > 0 else 0.0
    ceiling = f"budget ceiling {ceiling_per_min:,.0f}/min" if ceiling_per_min > 0 else "no throttle"
    lines = [
        f"swept {counts.resources} resources in {counts.pages} pages ("
        + ", ".join(f"{t}: {per_type.get(t, 0)}" for t in types)
        + ")",
        f"  notified {notified} in {_duration(elapsed)}: {rate:,.0f}/min ({ceiling})",
    ]
    if counts.skipped:
        lines.append(f"  {counts.skipped} resources without an id or version were skipped")
    return lines


# ------------------------------------------------------------------------------ subscription health

# The statuses in which commercetools drops what it could not deliver (shared docs, commercetools.md).
DROPPING_STATUSES: Final = frozenset({"ConfigurationErrorDeliveryStopped", "ManuallySuspended"})


def subscription_report(subscriptions: Sequence[Mapping[str, Any]]) -> list[tuple[str, bool]]:
    """Return ``(line, is_warning)`` for each subscription: key, destination type and health status."""
    if not subscriptions:
        return [("no subscriptions in this project", True)]
    lines: list[tuple[str, bool]] = []
    for subscription in subscriptions:
        name = text_value(subscription.get("key")) or f"(no key, id {subscription.get('id')})"
        destination = subscription.get("destination")
        kind = destination.get("type") if isinstance(destination, Mapping) else None
        status = text_value(subscription.get("status")) or "unknown"
        lines.append((f"subscription {name}: destination {kind or 'unknown'}, status {status}", False))
        if status in DROPPING_STATUSES:
            lines.append(
                (
                    f"  warning: {status}: commercetools drops the notifications it cannot deliver; fix the "
                    "subscription, then reconcile from the time it stopped delivering",
                    True,
                )
            )
        elif status != "Healthy":
            lines.append((f"  warning: {status}: deliveries are delayed or failing", True))
    return lines
