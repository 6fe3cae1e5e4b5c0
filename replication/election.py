"""Which process acts: a leader key in an etcd, on a lease.

Used by a region's replicators (the key in the regional etcd: one replica applies) and by the
primary region's servers (the key in the primary etcd: one rollout coordinator acts).

A candidate creates the key only if it does not exist (compare ``version == 0``), attached to a
fresh lease that it renews every third of its TTL. The others poll the key and try again when it
is gone: after the leader resigned (revoking its lease deletes the key) or its lease lapsed
(it died, hung, or lost the etcd). A candidate that finds its *own* id in the key is the
restart of one that died holding it: it takes the key over at once, moving it onto a new
lease, instead of waiting for the old lease to lapse. Candidate ids must therefore be unique
among live processes (a replica's pod or host name; a server's host and listen address).

Leadership is an optimisation, not the safety argument: a replica's every commit is also
guarded on the applied state (:mod:`modelreg.replication.region`), a coordinator's every commit
or abort on the rollout record, so a process that still believes it leads after its lease
lapsed cannot act twice or out of order; its next compare fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from aetcd import rpc

from modelreg.replication.errors import EtcdUnavailable
from modelreg.replication.etcd import Etcd

_UNANSWERED = (TimeoutError, EtcdUnavailable, OSError)
"""What an etcd that does not answer raises: retried, never fatal."""


class Events(NamedTuple):
    """The log events of one user of the election."""

    elected: str
    following: str
    unavailable: str
    lease_not_renewed: str


REPLICATION_EVENTS = Events("replication.elected", "replication.following",
                            "replication.region_unavailable", "replication.lease_not_renewed")


class Leadership:
    """This candidate holds the leader key on ``lease``, until :attr:`lost` or it resigns."""

    def __init__(self, etcd: Etcd, lease: int, ttl: int, log: Any, events: Events) -> None:
        self._etcd = etcd
        self.lease = lease
        self._ttl = ttl
        self._log = log
        self._events = events
        self.lost = asyncio.Event()
        """Set once the lease may have lapsed: stop acting."""

    async def keep(self) -> None:
        """Renews the lease until it cannot be sure it still holds it; then sets ``lost``.

        A renewal that fails is retried until a TTL has passed since the last good one: by
        then the lease may have lapsed, and another candidate may lead.
        """
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while not self.lost.is_set():
            await asyncio.sleep(self._ttl / 3)
            try:
                if await self._etcd.keepalive(self.lease) <= 0:
                    break
                renewed = loop.time()
            except _UNANSWERED as err:
                self._log.warning(self._events.lease_not_renewed, error=str(err))
                if loop.time() - renewed >= self._ttl:
                    break  # it may have lapsed: assume it did
            except Exception as err:  # whatever it was, the lease is no longer sure
                self._log.warning(self._events.lease_not_renewed, error=str(err))
                break
        self.lost.set()

    async def resign(self) -> None:
        """Gives the key up now (best effort: otherwise it lapses with the lease)."""
        self.lost.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._etcd.revoke(self.lease), self._etcd.timeout)


class Election:
    """Campaigns for one leader key."""

    def __init__(self, etcd: Etcd, key: bytes, candidate: str, *, ttl: int, poll: float,
                 log: Any, events: Events = REPLICATION_EVENTS) -> None:
        self._etcd = etcd
        self.key = key
        self.candidate = candidate
        self._id = candidate.encode()
        self._ttl = ttl
        self._poll = poll
        self._log = log
        self._events = events

    async def _try(self, holder: rpc.KeyValue | None) -> Leadership | None:
        lease = await self._etcd.grant(self._ttl)
        compare = (rpc.Compare(key=self.key, result=rpc.Compare.EQUAL,
                               target=rpc.Compare.VERSION, version=0)
                   if holder is None else
                   rpc.Compare(key=self.key, result=rpc.Compare.EQUAL,
                               target=rpc.Compare.VALUE, value=self._id))
        put = rpc.PutRequest(key=self.key, value=self._id, lease=lease)
        try:
            resp = await self._etcd.txn(rpc.TxnRequest(
                compare=[compare], success=[rpc.RequestOp(request_put=put)]))
        except BaseException:
            with contextlib.suppress(Exception):
                await self._etcd.revoke(lease)
            raise
        if not resp.succeeded:
            with contextlib.suppress(Exception):
                await self._etcd.revoke(lease)
            return None
        if holder is not None and holder.lease:
            # Our previous incarnation's lease holds nothing now; let it go.
            with contextlib.suppress(Exception):
                await self._etcd.revoke(holder.lease)
        return Leadership(self._etcd, lease, self._ttl, self._log, self._events)

    async def campaign(
        self, waiting: Callable[[str], Awaitable[None]] | None = None
    ) -> Leadership:
        """Returns once this candidate leads; ``waiting(leader)`` runs at each poll meanwhile.

        Never raises for an etcd that does not answer: it logs (once per outage) and polls
        again.
        """
        followed: str | None = None
        failing = ""
        while True:
            try:
                holder, _ = await self._etcd.get(self.key)
                if holder is None or bytes(holder.value) == self._id:
                    leadership = await self._try(holder)
                    if leadership is not None:
                        self._log.info(self._events.elected, candidate=self.candidate,
                                       took_over_own_key=holder is not None, lease_ttl=self._ttl)
                        return leadership
                else:
                    leader = bytes(holder.value).decode(errors="replace")
                    if leader != followed:
                        self._log.info(self._events.following, candidate=self.candidate,
                                       leader=leader)
                        followed = leader
                    if waiting is not None:
                        await waiting(leader)
                failing = ""
            except _UNANSWERED as err:
                if str(err) != failing:  # once per outage, not once per poll
                    self._log.warning(self._events.unavailable, error=str(err))
                failing = str(err)
            await asyncio.sleep(self._poll)
