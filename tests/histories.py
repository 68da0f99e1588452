"""Change histories with deletions, spread over partitions out of order, and the order rule's check.

Each resource is created at version 1, updated, and about a third are deleted at their last version.
commercetools writes its records unkeyed, so one resource's changes land on any partition; some changes
arrive late (after newer ones of the same resource). The check: for every deleted resource, the last
notification the hook accepted is its deletion, and nothing but deletions follows the first one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import orjson

KINDS = {"c": "ResourceCreated", "u": "ResourceUpdated", "d": "ResourceDeleted"}


def change(resource_id: str, version: int, kind: str) -> bytes:
    return orjson.dumps(
        {
            "notificationType": KINDS[kind],
            "projectKey": "acme",
            "resource": {"typeId": "product", "id": resource_id},
            "version": version,
            "modifiedAt": "2026-01-01T00:00:00.000Z",
        }
    )


def histories(resources: int, payloads: int, seed: int, prefix: str = "h") -> tuple[list[bytes], set[str]]:
    """Return about ``payloads`` changes over ``resources`` resources, in version order per resource, and
    the ids of the resources that end deleted."""
    rng = random.Random(seed)
    per_resource = max(payloads // resources, 2)
    changes: list[bytes] = []
    deleted: set[str] = set()
    for n in range(resources):
        resource_id = f"{prefix}-{n}"
        length = rng.randint(2, 2 * per_resource - 2)
        gone = rng.random() < 1 / 3
        if gone:
            deleted.add(resource_id)
        for version in range(1, length + 1):
            kind = "c" if version == 1 else "d" if gone and version == length else "u"
            changes.append(change(resource_id, version, kind))
    return changes, deleted


def spread(changes: Sequence[bytes], lanes: int, seed: int, late: float = 0.1) -> list[list[bytes]]:
    """Deal changes to ``lanes`` partitions at random; a fraction ``late`` of them go to their lane's end,
    behind newer changes of the same resource."""
    rng = random.Random(seed)
    on_time: list[list[bytes]] = [[] for _ in range(lanes)]
    behind: list[list[bytes]] = [[] for _ in range(lanes)]
    for body in changes:
        lane = rng.randrange(lanes)
        (behind if rng.random() < late else on_time)[lane].append(body)
    return [on_time[lane] + behind[lane] for lane in range(lanes)]


def shuffled(changes: Sequence[bytes], seed: int, late: float = 0.1) -> list[bytes]:
    """One lane: interleave three random lanes' orders, as a broker with no order at all might."""
    rng = random.Random(seed)
    lanes = spread(changes, 3, seed, late)
    out: list[bytes] = []
    while any(lanes):
        lane = rng.choice([lane for lane in lanes if lane])
        out.append(lane.pop(0))
    return out


def deletions_not_last(accepted: Sequence[tuple[str, str]], deleted: set[str]) -> dict[str, list[str]]:
    """Return, for each deleted resource whose accepted notifications break the rule, those scopes."""
    by_resource: dict[str, list[str]] = {}
    for scope, external_id in accepted:
        by_resource.setdefault(external_id, []).append(scope)
    broken: dict[str, list[str]] = {}
    for resource_id in sorted(deleted):
        scopes = by_resource.get(resource_id, [])
        if not scopes or scopes[-1] != "product/deleted":
            broken[resource_id] = scopes
            continue
        first = scopes.index("product/deleted")
        if any(scope != "product/deleted" for scope in scopes[first:]):
            broken[resource_id] = scopes
    return broken
