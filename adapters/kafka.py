"""Placeholder until the kafka adapter lands."""

from __future__ import annotations

from consumer.config import Settings
from consumer.ports import DeadLetterSink, Source


async def open_source(settings: Settings) -> Source:
    from consumer.app import UnsupportedSetting

    raise UnsupportedSetting("CTSYNC_SOURCE: the kafka source is not supported by this build yet")


async def open_dead_letter_sink(settings: Settings, topic: str) -> DeadLetterSink:
    from consumer.app import UnsupportedSetting

    raise UnsupportedSetting(f"CTSYNC_DEAD_LETTER_URL: {topic}: kafka dead letters are not built yet")


async def probe(settings: Settings) -> str:
    """Check that the configured kafka source is reachable; return a one-line description or raise."""
    raise ConnectionError("the kafka adapter is not built yet")


async def open_dead_letter_source(settings: Settings, name: str) -> Source:
    """Open a finite source over the dead letters kept at name (for `ctsync dead-letters replay`)."""
    raise ConnectionError("the kafka adapter is not built yet")
