"""Tell new changes from duplicates and stale versions, by what was delivered before.

Two kinds of memory, both kept by a StateStore and written only after a notification was delivered, never
on receipt, so a crash between receipt and delivery re-delivers instead of losing:

- per-resource watermarks: the highest version delivered. A version at or below it is stale. A deletion
  ranks above any other change of the same version (``version_rank``), so a ResourceDeleted is not swallowed
  by an update of the version it deleted, while an update arriving after that deletion is.
- delivered message keys (message id; for changes type+id+notificationType+version), for a TTL, only of
  changes that carry no version. A versioned change is covered by its resource's watermark, which its
  delivery raised at least to its rank for at least as long: its redelivery is judged stale without a key
  (``remembers_key``), so its key is neither written nor read.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from consumer.messages import ChangeEvent
from consumer.ports import Claim, StateStore, StateView


class Verdict(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    STALE = "stale"


def version_rank(version: int, deleted: bool) -> int:
    """Return the watermark rank of a version: a deletion outranks other changes of the same version."""
    return version * 2 + (1 if deleted else 0)


def rank_version(rank: int) -> int:
    """Return the resource version a watermark rank stands for."""
    return rank // 2


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    watermark: int | None = None


def remembers_key(event: ChangeEvent) -> bool:
    """Return whether the delivered state keeps this change's message key: only a versionless change needs
    it, the watermark covers a versioned one."""
    return event.version is None


# Judgements without a watermark are the same value every time (they are frozen): one of each.
_NEW = Judgement(Verdict.NEW)
_DUPLICATE = Judgement(Verdict.DUPLICATE)


def judge(event: ChangeEvent, deleted: bool, view: StateView) -> Judgement:
    """Judge one event against the delivered state; pure."""
    if event.message_key in view.delivered_keys:
        return _DUPLICATE
    if event.version is not None:
        watermark = view.watermarks.get(event.resource_key)
        if watermark is not None and version_rank(event.version, deleted) <= watermark:
            return Judgement(Verdict.STALE, rank_version(watermark))
    return _NEW


class Deduplicator:
    """Judge events in batches (one store round trip per batch) and record what was delivered."""

    def __init__(self, store: StateStore, ttl_seconds: float) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds

    async def judge_many(self, items: Sequence[tuple[ChangeEvent, bool]]) -> list[Judgement]:
        """Judge (event, is_deletion) pairs with one lookup: message keys of versionless changes,
        watermarks of versioned ones."""
        if not items:
            return []
        view = await self.store.lookup(
            {event.message_key for event, _ in items if event.version is None},
            {event.resource_key for event, _ in items if event.version is not None},
        )
        return [judge(event, deleted, view) for event, deleted in items]

    async def record_delivered(
        self,
        message_keys: Collection[str],
        ranks: Mapping[str, int],
        *,
        holder: str = "",
        release: Collection[str] = (),
    ) -> None:
        """Remember delivered keys (of versionless changes: see ``remembers_key``), raise watermarks to the
        given ranks and end the holder's claims."""
        await self.store.record_delivered(
            message_keys, ranks, self.ttl_seconds, holder=holder, release=release
        )

    async def claim(
        self,
        holder: str,
        ranks: Mapping[str, int],
        message_keys: Collection[str],
        lease_seconds: float,
        attempt_seconds: float,
    ) -> Claim:
        """Claim resources for sending at these ranks and read, in the same step, what was delivered of them
        and what was attempted."""
        return await self.store.claim(holder, ranks, message_keys, lease_seconds, attempt_seconds)
