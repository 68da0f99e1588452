"""Placeholder until the push adapter lands."""

from __future__ import annotations

from consumer.config import Settings
from consumer.ports import DeadLetterSink, Source


async def open_source(settings: Settings) -> Source:
    from consumer.app import UnsupportedSetting

    raise UnsupportedSetting("CTSYNC_SOURCE: the push source is not supported by this build yet")


async def open_dead_letter_sink(settings: Settings, topic: str) -> DeadLetterSink:
    from consumer.app import UnsupportedSetting

    raise UnsupportedSetting(f"CTSYNC_DEAD_LETTER_URL: {topic}: push dead letters are not built yet")
