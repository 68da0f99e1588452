"""Placeholder until the pubsub adapter lands."""

from __future__ import annotations

from consumer.config import Settings
from consumer.ports import DeadLetterSink, Source


class NotBuiltYet(ValueError):
    pass


async def open_source(settings: Settings) -> Source:
    from consumer.app import UnsupportedSetting

    raise UnsupportedSetting("CTSYNC_SOURCE: the pubsub source is not supported by this build yet")


async def open_dead_letter_sink(settings: Settings, topic: str) -> DeadLetterSink:
    from consumer.app import UnsupportedSetting

    raise UnsupportedSetting(f"CTSYNC_DEAD_LETTER_URL: {topic}: pubsub dead letters are not built yet")
