"""Where each key lives, seen from a regional server (the routing of ``RegionalStore``).

Keys are relative to the deployment's prefix. Replicated keys are read from the region's
replica and written on the primary; of the region-local families that the replicator never
copies (:data:`modelreg.replication.layout.LOCAL_FAMILIES`), node reports stay in the regional
etcd and idempotency records on the primary, where the mutation that made them committed.
"""

from __future__ import annotations

import enum

from modelreg.replication import layout
from modelreg.server.domain import keys as key_schema

REGION_HELD: tuple[str, ...] = (key_schema.NODES_START, key_schema.PINS_START,
                                 key_schema.LOCAL_AUDIT_START)
"""Region-local families kept in the regional etcd: node reports describe their own region and
live on leases of its cluster; break-glass pins and their audit events are written there, and
only there, by the region's servers (``modelreg.server.store.regional_local``)."""
PRIMARY_HELD: tuple[str, ...] = tuple(
    f.decode() for f in layout.LOCAL_FAMILIES if f.decode() not in REGION_HELD)
"""The other region-local families (idempotency records): the mutation engine writes them in
the mutation's own Txn, which commits on the primary, so they exist only there."""


class Source(enum.Enum):
    """Where a key lives, seen from a regional server."""

    REPLICA = "replica"
    REGION = "region"
    PRIMARY = "primary"


def source(key: str) -> Source:
    """Where ``key`` (relative to the prefix) is read."""
    if key.startswith(REGION_HELD):
        return Source.REGION
    if key.startswith(PRIMARY_HELD):
        return Source.PRIMARY
    return Source.REPLICA


def segments(start: str, end: str) -> list[tuple[Source, str, str]]:
    """``[start, end)`` cut where its source changes, in key order."""
    out: list[tuple[Source, str, str]] = []
    cursor = start
    for family in sorted(REGION_HELD + PRIMARY_HELD):
        family_end = key_schema.prefix_end(family)
        if family_end <= cursor or family >= end:
            continue
        if cursor < family:
            out.append((Source.REPLICA, cursor, family))
        low, cursor = max(cursor, family), min(end, family_end)
        out.append((source(family), low, cursor))
    if cursor < end:
        out.append((Source.REPLICA, cursor, end))
    return out
