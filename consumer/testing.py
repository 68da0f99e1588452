"""In-memory ports for unit tests of the core and for benchmarks: a list source, a recording sink and
dead-letter sink. Adapters are tested against the real things they talk to, never only with these."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from consumer.ports import DeadLetter, Envelope, Fetched, HookResponse
from consumer.routing import Notification


class ListSource:
    """A finite source over payloads held in memory; records which envelopes were acked and nacked."""

    name = "memory"

    def __init__(self, bodies: Iterable[bytes], *, exhaust: bool = True) -> None:
        self._bodies = list(bodies)
        self._next = 0
        self.exhaust = exhaust
        self.acked: list[int] = []
        self.nacked: list[int] = []

    def _envelope(self, index: int) -> Envelope:
        return Envelope(
            body=self._bodies[index],
            position=f"memory:{index}",
            ack=lambda: self.acked.append(index),
            nack=lambda: self.nacked.append(index),
        )

    def extend(self, bodies: Iterable[bytes]) -> None:
        self._bodies.extend(bodies)

    async def fetch(self, max_count: int) -> Fetched:
        start, end = self._next, min(self._next + max_count, len(self._bodies))
        self._next = end
        envelopes = [self._envelope(i) for i in range(start, end)]
        more = end < len(self._bodies)
        if not envelopes and not self.exhaust:
            await asyncio.sleep(0.01)
        return Fetched(envelopes, more_ready=more, exhausted=self.exhaust and not more)

    async def close(self) -> None:
        return None


class RecordingSink:
    """A sink that answers from ``respond`` (200 by default) and records every request it was sent."""

    def __init__(self, respond: Callable[[Sequence[Notification]], HookResponse] | None = None) -> None:
        self.respond = respond or (lambda _: HookResponse(200))
        self.requests: list[tuple[str, list[Notification]]] = []

    async def send(self, notifications: Sequence[Notification], correlation_id: str) -> HookResponse:
        self.requests.append((correlation_id, list(notifications)))
        return self.respond(notifications)

    @property
    def notifications(self) -> list[Notification]:
        return [n for _, batch in self.requests for n in batch]

    async def close(self) -> None:
        return None


class MemoryDeadLetters:
    """A dead-letter sink in a list."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)

    async def close(self) -> None:
        return None
