"""Which offset of a partition is safe to commit when acks complete out of order.

Coalescing and batching settle envelopes out of order: offset 7 can be acked long before offset 3. A commit
says "everything below this offset is done", so per partition it may only reach the lowest offset whose
envelope is still unsettled. Offsets of a partition need not be contiguous (compaction, transaction markers),
so the tracker keeps the offsets it handed out, in order, rather than assuming ``n + 1`` follows ``n``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from itertools import pairwise
from typing import Generic, TypeVar

PartitionT = TypeVar("PartitionT", bound=Hashable)


class PartitionOffsets:
    """The unsettled offsets of one partition, and the next offset that is safe to commit."""

    __slots__ = ("_committed", "_done", "_next", "_pending", "retired")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None
        self._committed: int | None = None
        # Set when the partition was revoked or given up: later acks of its envelopes change nothing.
        self.retired = False

    def received(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} is not above the last one received ({self._pending[-1]})")
        self._pending.append(offset)

    def received_many(self, offsets: list[int]) -> None:
        """Note a fetched run of offsets, ascending (``received`` for each, in one step)."""
        if not offsets:
            return
        pending = self._pending
        if pending and offsets[0] <= pending[-1]:
            raise ValueError(f"offset {offsets[0]} is not above the last one received ({pending[-1]})")
        if any(b <= a for a, b in pairwise(offsets)):
            raise ValueError(f"the {len(offsets)} offsets of a fetch are not ascending")
        pending.extend(offsets)

    def acked(self, offset: int) -> None:
        if self.retired:
            return
        pending = self._pending
        if pending and pending[0] == offset:
            pending.popleft()
            self._next = offset + 1
            done = self._done
            while pending and pending[0] in done:
                head = pending.popleft()
                done.discard(head)
                self._next = head + 1
        elif pending and offset > pending[0]:
            self._done.add(offset)
        # Else the offset was settled already (a repeated ack): nothing changes.

    @property
    def outstanding(self) -> int:
        """Offsets received and not yet acked (handed-back ones included: they were not settled)."""
        return len(self._pending) - len(self._done)

    def committable(self) -> int | None:
        """Return the offset to commit now (the next one to read), or None when nothing new is settled."""
        if self._next is None or self._next == self._committed:
            return None
        return self._next

    def committed(self, offset: int) -> None:
        self._committed = offset

    @property
    def last_committed(self) -> int | None:
        return self._committed


class OffsetTracker(Generic[PartitionT]):
    """``PartitionOffsets`` for every partition this consumer reads."""

    def __init__(self) -> None:
        self._partitions: dict[PartitionT, PartitionOffsets] = {}

    def partition(self, partition: PartitionT) -> PartitionOffsets:
        offsets = self._partitions.get(partition)
        if offsets is None:
            offsets = self._partitions[partition] = PartitionOffsets()
        return offsets

    def retire(self, partition: PartitionT) -> PartitionOffsets | None:
        """Stop tracking ``partition`` (revoked): acks that arrive later for it are ignored."""
        offsets = self._partitions.pop(partition, None)
        if offsets is not None:
            offsets.retired = True
        return offsets

    def outstanding(self, partitions: Iterable[PartitionT] | None = None) -> int:
        if partitions is None:
            return sum(offsets.outstanding for offsets in self._partitions.values())
        return sum(self._partitions[p].outstanding for p in partitions if p in self._partitions)

    def committable(self) -> dict[PartitionT, int]:
        """Return, for every partition with news, the offset safe to commit."""
        found: dict[PartitionT, int] = {}
        for partition, offsets in self._partitions.items():
            offset = offsets.committable()
            if offset is not None:
                found[partition] = offset
        return found

    def committed(self, offsets: dict[PartitionT, int]) -> None:
        for partition, offset in offsets.items():
            tracked = self._partitions.get(partition)
            if tracked is not None:
                tracked.committed(offset)

    def last_committed(self, partition: PartitionT) -> int | None:
        tracked = self._partitions.get(partition)
        return tracked.last_committed if tracked is not None else None

    def __contains__(self, partition: object) -> bool:
        return partition in self._partitions
