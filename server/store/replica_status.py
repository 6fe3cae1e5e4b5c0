"""``LagSource`` over a region's etcd: the status record its replicator renews.

The replicator's leader writes its lag figures to ``R + "replica/status"`` every few seconds
(:mod:`modelreg.replication.layout`, :class:`~modelreg.replication.layout.Status`). A regional
server reads them from its region's etcd, so "how stale is this region" needs no call to the
replicator process, and a replicator that stopped shows as figures no longer renewed.
"""

from __future__ import annotations

import time

from modelreg.replication import layout
from modelreg.server.domain.ports import ReplicationLag
from modelreg.server.store.etcd import EtcdStore

STATUS_KEY = layout.status_key(b"").decode()
"""The status record's key relative to the regional prefix ``R``."""


class ReplicaStatusLag:
    """The lag figures of the region whose etcd ``store`` reads (under the regional prefix)."""

    def __init__(self, store: EtcdStore) -> None:
        self._store = store

    async def lag(self) -> ReplicationLag | None:
        """The replicator's last figures, aged if overdue; None before its first report."""
        entry = (await self._store.read([STATUS_KEY], fresh=True)).get(STATUS_KEY)
        if entry is None:
            return None
        try:
            status = layout.Status.decode(entry.value)
        except ValueError:
            return None  # not written by a replicator this server understands
        now_ms = time.time_ns() // 1_000_000
        return ReplicationLag(
            revisions=max(0, status.primary_revision - status.applied),
            seconds=status.seconds_behind(now_ms),
            primary_revision=status.primary_revision,
            written_ms=status.written_ms,
            current=now_ms - status.written_ms <= 2 * status.interval_ms,
        )
