"""Which replica of a region applies: a leader key in the regional etcd, on a lease.

A candidate creates the key only if it does not exist (compare ``version == 0``), attached to a
fresh lease that it renews every third of its TTL. The others poll the key and try again when it
is gone: after the leader resigned (revoking its lease deletes the key) or its lease lapsed
(it died, hung, or lost the regional etcd). A replica that finds its *own* id in the key is the
restart of a replica that died holding it: it takes the key over at once, moving it onto a new
lease, instead of waiting for the old lease to lapse. Replica ids must therefore be unique
among live processes (the pod or host name, by default).

Leadership is an optimisation, not the safety argument: every commit is also guarded on the
applied state (:mod:`modelreg.replication.region`), so a replica that still believes it leads
after its lease lapsed cannot apply anything twice or out of order; its next commit fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aetcd import rpc

from modelreg.replication.errors import EtcdUnavailable
from modelreg.replication.etcd import Etcd


class Leadership:
    """This replica holds the leader key on ``lease``, until :attr:`lost` or it resigns."""

    def __init__(self, etcd: Etcd, lease: int, ttl: int) -> None:
        self._etcd = etcd
        self.lease = lease
        self._ttl = ttl
        self.lost = asyncio.Event()
        """Set once the lease may have lapsed: stop applying."""

    async def keep(self) -> None:
        """Renews the lease until it cannot be sure it still holds it; then sets ``lost``."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while not self.lost.is_set():
            await asyncio.sleep(self._ttl / 3)
            try:
                if await self._etcd.keepalive(self.lease) <= 0:
                    break
                renewed = loop.time()
            except EtcdUnavailable:
                if loop.time() - renewed >= self._ttl:
                    break  # it may have lapsed: assume it did
        self.lost.set()

    async def resign(self) -> None:
        """Gives the key up now (best effort: otherwise it lapses with the lease)."""
        self.lost.set()
        with contextlib.suppress(Exception):
            await self._etcd.revoke(self.lease)


class Election:
    """Campaigns for one leader key."""

    def __init__(self, etcd: Etcd, key: bytes, replica_id: str, *, ttl: int, poll: float,
                 log: Any) -> None:
        self._etcd = etcd
        self._key = key
        self._id = replica_id.encode()
        self._ttl = ttl
        self._poll = poll
        self._log = log

    async def _try(self, holder: rpc.KeyValue | None) -> Leadership | None:
        lease = await self._etcd.grant(self._ttl)
        compare = (rpc.Compare(key=self._key, result=rpc.Compare.EQUAL,
                               target=rpc.Compare.VERSION, version=0)
                   if holder is None else
                   rpc.Compare(key=self._key, result=rpc.Compare.EQUAL,
                               target=rpc.Compare.VALUE, value=self._id))
        put = rpc.PutRequest(key=self._key, value=self._id, lease=lease)
        resp = await self._etcd.txn(rpc.TxnRequest(
            compare=[compare], success=[rpc.RequestOp(request_put=put)]))
        if not resp.succeeded:
            with contextlib.suppress(EtcdUnavailable):
                await self._etcd.revoke(lease)
            return None
        if holder is not None and holder.lease:
            # Our previous incarnation's lease holds nothing now; let it go.
            with contextlib.suppress(Exception):
                await self._etcd.revoke(holder.lease)
        return Leadership(self._etcd, lease, self._ttl)

    async def campaign(
        self, waiting: Callable[[str], Awaitable[None]] | None = None
    ) -> Leadership:
        """Returns once this replica leads; ``waiting(leader)`` runs at each poll meanwhile."""
        followed: str | None = None
        while True:
            try:
                holder, _ = await self._etcd.get(self._key)
                if holder is None or bytes(holder.value) == self._id:
                    leadership = await self._try(holder)
                    if leadership is not None:
                        self._log.info("replication.elected",
                                       took_over_own_key=holder is not None, lease_ttl=self._ttl)
                        return leadership
                else:
                    leader = bytes(holder.value).decode(errors="replace")
                    if leader != followed:
                        self._log.info("replication.following", leader=leader)
                        followed = leader
                    if waiting is not None:
                        await waiting(leader)
            except EtcdUnavailable as err:
                self._log.warning("replication.region_unavailable", error=str(err))
            await asyncio.sleep(self._poll)
