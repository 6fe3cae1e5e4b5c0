"""Which server's rollout coordinator acts: a leader key in the primary etcd, on a lease.

Several servers of the primary region run a coordinator; one acts. A candidate creates
``{prefix}coordinator/leader`` only if it does not exist (compare ``version == 0``), attached to
a fresh lease that it renews every third of its TTL; the others poll the key and try again when
it is gone: after the leader resigned (a server stopping revokes its lease, which deletes the
key at once) or its lease lapsed (the process died, hung, or lost the primary etcd). A candidate
that finds its *own* id in the key is the restart of a server that died holding it (same host,
same listen address): it takes the key over at once, moving it onto a new lease, instead of
waiting for the old lease to lapse.

The same pattern as the replicator's (:mod:`modelreg.replication.election`), over the same thin
etcd client (:class:`modelreg.replication.etcd.Etcd`, which the regional store uses too), but
its own module: the coordinator's key, log events and error handling are not the replicator's.

Leadership is an optimisation, not the safety argument: every commit and abort of a rollout is
one Txn guarded on the rollout record (``modelreg.server.domain.rollouts``), so a coordinator
that still believes it leads after its lease lapsed cannot commit a rollout another one has
aborted, nor the reverse; at worst both try and one loses the compare.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from aetcd import rpc

from modelreg.replication.errors import EtcdUnavailable
from modelreg.replication.etcd import Etcd

log = structlog.get_logger("modelreg.server.coordinator")

LEADER_KEY = "coordinator/leader"
"""The leader key, relative to the deployment's prefix in the primary etcd."""


class Leadership:
    """This server holds the leader key on ``lease``, until :attr:`lost` or it resigns."""

    def __init__(self, etcd: Etcd, lease: int, ttl: int) -> None:
        self._etcd = etcd
        self.lease = lease
        self._ttl = ttl
        self.lost = asyncio.Event()
        """Set once the lease may have lapsed: stop acting."""

    async def keep(self) -> None:
        """Renews the lease until it cannot be sure it still holds it; then sets ``lost``.

        A renewal that fails is retried until a TTL has passed since the last good one: by
        then the lease may have lapsed, and another server may lead.
        """
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while not self.lost.is_set():
            await asyncio.sleep(self._ttl / 3)
            try:
                if await self._etcd.keepalive(self.lease) <= 0:
                    break
                renewed = loop.time()
            except (TimeoutError, EtcdUnavailable, OSError) as err:
                log.warning("coordinator_lease_not_renewed", error=str(err))
                if loop.time() - renewed >= self._ttl:
                    break
            except Exception as err:  # whatever it was, the lease is no longer sure
                log.warning("coordinator_lease_not_renewed", error=str(err))
                break
        self.lost.set()

    async def resign(self) -> None:
        """Gives the key up now (best effort: otherwise it lapses with the lease)."""
        self.lost.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._etcd.revoke(self.lease), self._etcd.timeout)


class Election:
    """Campaigns for the coordinator's leader key in the primary etcd."""

    def __init__(self, etcd: Etcd, prefix: str, candidate: str, *, ttl: int,
                 poll: float) -> None:
        """``candidate`` names this server, unique among live servers (host and address)."""
        self._etcd = etcd
        self.key = (prefix + LEADER_KEY).encode()
        self.candidate = candidate
        self._id = candidate.encode()
        self._ttl = ttl
        self._poll = poll

    async def _try(self, holder: rpc.KeyValue | None) -> Leadership | None:
        lease = await self._etcd.grant(self._ttl)
        compare = (rpc.Compare(key=self.key, result=rpc.Compare.EQUAL,
                               target=rpc.Compare.VERSION, version=0)
                   if holder is None else
                   rpc.Compare(key=self.key, result=rpc.Compare.EQUAL,
                               target=rpc.Compare.MOD, mod_revision=holder.mod_revision))
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
        return Leadership(self._etcd, lease, self._ttl)

    async def leader(self) -> str | None:
        """Who holds the key now (None: nobody)."""
        holder, _ = await self._etcd.get(self.key)
        return None if holder is None else bytes(holder.value).decode(errors="replace")

    async def campaign(
        self, following: Callable[[str], Awaitable[None]] | None = None
    ) -> Leadership:
        """Returns once this server leads; ``following(leader)`` runs when the leader changes.

        Never raises for an etcd that does not answer: it logs and polls again.
        """
        followed: str | None = None
        failing = ""
        while True:
            try:
                holder, _ = await self._etcd.get(self.key)
                if holder is None or bytes(holder.value) == self._id:
                    leadership = await self._try(holder)
                    if leadership is not None:
                        log.info("coordinator_elected", candidate=self.candidate,
                                 took_over_own_key=holder is not None, lease_ttl=self._ttl)
                        return leadership
                else:
                    leader = bytes(holder.value).decode(errors="replace")
                    if leader != followed:
                        log.info("coordinator_following", candidate=self.candidate,
                                 leader=leader)
                        followed = leader
                        if following is not None:
                            await following(leader)
                failing = ""
            except (TimeoutError, EtcdUnavailable, OSError) as err:
                if str(err) != failing:  # once per outage, not once per poll
                    log.warning("coordinator_election_unavailable", error=str(err))
                failing = str(err)
            await asyncio.sleep(self._poll)
