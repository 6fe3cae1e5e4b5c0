"""The rollout coordinator: commits a rollout when every region is ready, aborts it otherwise.

Runs in the servers of the primary region (``--coordinator auto``); once a rollout is preparing
they elect one through the primary etcd (:mod:`modelreg.replication.election`, the leader key
:data:`LEADER_KEY`) and only the
leader acts (until then none campaigns: no leader key, no lease). Every ``rollout_interval``
seconds, for each rollout that is PREPARING, the leader

1. asks every region the rollout names whether it is ready
   (:mod:`modelreg.server.rollout_readiness`: its own region in-process, the others over gRPC,
   answered only once they have replicated the rollout);
2. records the readiness in the rollout record when it changed (so ``GetRollout`` and
   ``WatchRollout`` show progress; no audit event);
3. decides (:mod:`modelreg.server.domain.rollout_decision`): every region ready => commit;
   more failed nodes in a region than the policy's readiness fraction allows => abort naming
   the region, the counts and the first error; past the deadline => abort naming the regions
   not ready and why; otherwise wait.

**Nothing in memory matters.** Every fact the coordinator acts on is in etcd (the record, its
deadline, its policy) or asked afresh (readiness); commit and abort are each one Txn guarded on
the record (``modelreg.server.domain.rollouts``), so a successor elected after a crash at any
point simply resumes: a rollout still PREPARING is looked at again, one already committed or
aborted is not. Two coordinators that both believe they lead (a lease lapsing under a hung
leader) cannot both decide: the second Txn fails its compare (``ROLLOUT_DONE``).

**Never a commit without every region.** A region that is unreachable, has not replicated the
rollout, or answers anything but a positive summary is not ready; only an abort can follow.

**The rollout guard.** On the same ticks the leader watches every committed promotion whose
policy has a guard, for its bake window (:mod:`modelreg.server.rollout_guard`): a region whose
fleet breaches the guard's thresholds for the breach duration gets the stage rolled back in
every region. The coordinator campaigns while such a rollout bakes, as while one prepares.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import structlog

from modelreg.replication.election import Election, Events, Leadership
from modelreg.replication.etcd import Etcd
from modelreg.server.api.metrics import Metrics
from modelreg.server.config import ServerConfig
from modelreg.server.domain.errors import ModelregError
from modelreg.server.domain.rollout_decision import decide, stage_of
from modelreg.server.rollout_guard import BakingGuards, GuardRecords
from modelreg.server.rollout_readiness import (
    COORDINATOR_ACTOR,
    LocalHealth,
    LocalReadiness,
    RegionReadiness,
)
from modelreg.server.topology import Topology
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res
from modelreg.v1.errors_pb2 import ErrorReason

log = structlog.get_logger("modelreg.server.coordinator")

LEADER_KEY = "coordinator/leader"
"""The coordinators' leader key, relative to the deployment's prefix in the primary etcd."""
COORDINATOR_EVENTS = Events("coordinator_elected", "coordinator_following",
                            "coordinator_election_unavailable", "coordinator_lease_not_renewed")

_DONE = ErrorReason.Name(ErrorReason.ROLLOUT_DONE)
FULL_LOOK = 5.0
"""Seconds between fresh looks for preparing rollouts when the hint says there are none (and
for baking rollouts: the hint knows nothing of guards)."""


class RolloutRecords(Protocol):
    """What the coordinator needs of the rollouts domain (``domain.rollouts.Rollouts``)."""

    async def preparing(self) -> list[tuple[res.Rollout, int]]:
        """Every PREPARING rollout, read fresh, with its record's mod_revision."""
        ...

    async def record_readiness(
        self, name: str, readiness: Sequence[res.RegionReadiness]
    ) -> res.Rollout | None:
        """Stores the readiness (guarded); None once the rollout is no longer PREPARING."""
        ...

    async def commit(self, name: str, *, actor: str) -> res.Rollout:
        """Moves the pointer, or aborts if the lifecycle rules now refuse (see its state).

        An error with reason ``ROLLOUT_DONE`` if the rollout is no longer PREPARING.
        """
        ...

    async def abort(self, name: str, reason: str, *, actor: str) -> res.Rollout:
        """Aborts it; an error with reason ``ROLLOUT_DONE`` if not PREPARING."""
        ...


class ReadinessSource(Protocol):
    """A region's readiness and health (``rollout_readiness.RegionReadiness``)."""

    async def readiness(
        self, region: str, request: fs.GetRegionReadinessRequest, *, min_revision: int
    ) -> res.RegionReadiness:
        """Never raises: a region that cannot say is not ready, with ``error`` set."""
        ...

    async def health(
        self, region: str, request: fs.GetRegionHealthRequest, *, min_revision: int
    ) -> res.RegionHealth:
        """Never raises: a region that cannot say does not breach, with ``error`` set."""
        ...


def _comparable(readiness: Sequence[res.RegionReadiness]) -> dict[str, bytes]:
    """Readiness without its check times: what "changed" means for the record."""
    out: dict[str, bytes] = {}
    for r in readiness:
        copy = res.RegionReadiness()
        copy.CopyFrom(r)
        copy.ClearField("check_time")
        out[r.region] = copy.SerializeToString(deterministic=True)
    return out


class Coordinator:
    """Campaigns for leadership; while leading, drives every PREPARING rollout to its end."""

    def __init__(
        self,
        rollouts: RolloutRecords,
        readiness: ReadinessSource,
        election: Election,
        *,
        interval: float,
        metrics: Metrics,
        hint: Callable[[], bool] | None = None,
        guard: GuardRecords | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """Drives ``rollouts`` while ``election`` says this server leads.

        ``hint`` (the stage hub's cached pointers: does any name a pending rollout?) spares
        the fresh read of every stage pointer on ticks with nothing to do, and the campaign
        itself until there is a rollout to drive; a fresh read is still made every
        :data:`FULL_LOOK` seconds, so a hint that lags cannot stall a rollout. ``guard`` (the
        domain's rollout guard) turns on the watch of baking rollouts.
        """
        self._rollouts = rollouts
        self._hint = hint
        self._looked = -math.inf
        self._readiness = readiness
        self._election = election
        self._interval = interval
        self._metrics = metrics
        self._clock = clock
        self._start_revisions: dict[str, int] = {}
        self._failing: dict[str, str] = {}
        """The last error logged, per rollout ("" for the whole tick): logged once a streak."""
        self.leading = False
        """Whether this server's coordinator acts now (also the ``is_leader`` gauge)."""
        self.guards = (BakingGuards(guard, readiness, metrics=metrics, warn=self._warn,
                                    look_every=FULL_LOOK, clock=clock)
                       if guard is not None else None)
        """The rollout guard's watch of baking rollouts, if on."""

    async def run(self) -> None:
        """Campaigns, leads until the lease may have lapsed, campaigns again; until cancelled.

        Never ends with an error: the coordinator runs in the server's task group, and a
        coordinator that fails must not take the server (its reads, watches) down with it.
        """
        while True:
            try:
                await self._work_appears()
                leadership = await self._election.campaign()
            except Exception as err:  # an etcd refusal the election did not expect
                self._warn("", "coordinator_campaign_failed", err)
                await asyncio.sleep(max(self._interval, 1.0))
                continue
            self._set_leading(True)
            try:
                await self._lead(leadership)
            finally:
                self._set_leading(False)
                await leadership.resign()
            log.warning("coordinator_leadership_lost", candidate=self._election.candidate)

    async def _work_appears(self) -> None:
        """Returns once a rollout is preparing or a guarded one baking (at once without a hint).

        A coordinator campaigns only when there is something to coordinate (a rollout
        preparing, or a guarded one baking), so a deployment without governed stages never
        writes a leader key or holds a lease (nor do tests that compare what is stored before
        and after a call). The hub's hint is looked at every interval, the store itself every
        :data:`FULL_LOOK` seconds.
        """
        if self._hint is None:
            return
        loop = asyncio.get_running_loop()
        while True:
            if self._hint():
                return
            if loop.time() - self._looked >= FULL_LOOK:
                self._looked = loop.time()
                try:
                    if await self._rollouts.preparing():
                        return
                    if self.guards is not None and await self.guards.any_baking():
                        return
                    self._failing.pop("", None)
                except ModelregError as err:
                    self._warn("", "coordinator_look_failed", err)
            await asyncio.sleep(self._interval)

    def _warn(self, key: str, event: str, err: BaseException, **fields: object) -> None:
        """Logs a failure once per streak of the same error (``key``: what failed)."""
        text = err.message if isinstance(err, ModelregError) else str(err)
        if self._failing.get(key) != text:
            log.warning(event, error=text, error_type=type(err).__name__, **fields)
        self._failing[key] = text

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        self._metrics.coordinator_leader.set(1 if leading else 0)

    async def _lead(self, leadership: Leadership) -> None:
        keeper = asyncio.create_task(leadership.keep(), name="coordinator-lease")
        self._start_revisions.clear()  # learnt afresh: nothing in memory matters
        if self.guards is not None:
            self.guards.reset()
        try:
            while not leadership.lost.is_set():
                try:
                    await self.tick(leadership)
                    self._failing.pop("", None)
                except Exception as err:  # the server must outlive a bad tick
                    self._warn("", "coordinator_tick_failed", err)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(leadership.lost.wait(), self._interval)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def tick(self, leadership: Leadership) -> None:
        """One pass over every PREPARING rollout (each concurrently, each on its own).

        And the guard's pass over every baking one, beside it.
        """
        if self.guards is None:
            await self._prepare_tick(leadership)
            return
        # Both run to their end whatever the other does (no step left running unawaited).
        results = await asyncio.gather(self._prepare_tick(leadership),
                                       self.guards.tick(leadership.lost), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _prepare_tick(self, leadership: Leadership) -> None:
        now = asyncio.get_running_loop().time()
        if (self._hint is not None and not self._start_revisions and not self._hint()
                and now - self._looked < FULL_LOOK):
            return
        self._looked = now
        preparing = await self._rollouts.preparing()
        names = {rollout.name for rollout, _ in preparing}
        for gone in set(self._start_revisions) - names:
            del self._start_revisions[gone]
        for gone in set(self._failing) - names - {""}:
            del self._failing[gone]
        await asyncio.gather(*(self._guarded_step(rollout, revision, leadership)
                               for rollout, revision in preparing))

    async def _guarded_step(
        self, rollout: res.Rollout, revision: int, leadership: Leadership
    ) -> None:
        try:
            await self.step(rollout, revision, leadership)
            self._failing.pop(rollout.name, None)
        except Exception as err:  # one rollout's trouble is not the others'
            # The store did not answer, or a race: the next tick looks again.
            self._warn(rollout.name, "rollout_step_failed", err, rollout=rollout.name)

    async def step(self, rollout: res.Rollout, revision: int, leadership: Leadership) -> None:
        """Asks the regions, records what changed, then commits, aborts or waits."""
        # The revision at which this coordinator first saw the record (its creation, unless a
        # predecessor updated it since: later, so only stricter); regions answer once there.
        start = self._start_revisions.setdefault(rollout.name, revision)
        request = fs.GetRegionReadinessRequest(
            name=stage_of(rollout.name), version=rollout.target_version,
            readiness_fraction=rollout.policy.readiness_fraction)
        readiness = list(await asyncio.gather(*(
            self._readiness.readiness(region, request, min_revision=start)
            for region in rollout.regions)))
        now = self._clock()
        if leadership.lost.is_set():
            return
        changed = _comparable(readiness) != _comparable(rollout.readiness)
        if changed and await self._rollouts.record_readiness(rollout.name, readiness) is None:
            return  # committed, aborted or cancelled meanwhile
        decision = decide(rollout, readiness, now)
        if decision.action == "wait" or leadership.lost.is_set():
            return
        if decision.action == "commit":
            await self._commit(rollout, readiness)
        else:
            await self._abort(rollout, decision.reason, decision.cause)

    async def _commit(self, rollout: res.Rollout, readiness: Sequence[res.RegionReadiness]) -> None:
        try:
            done = await self._rollouts.commit(rollout.name, actor=COORDINATOR_ACTOR)
        except ModelregError as err:
            if err.reason != _DONE:
                raise
            log.info("rollout_already_done", rollout=rollout.name, detail=err.message)
            return
        if done.state != res.ROLLOUT_STATE_COMMITTED:
            # The lifecycle rules refused the move at commit (the version was deprecated
            # meanwhile...): the domain aborted the rollout in the same Txn, saying why.
            self._metrics.rollouts_aborted.labels(cause="lifecycle").inc()
            log.warning("rollout_aborted", rollout=rollout.name, version=rollout.target_version,
                        cause="lifecycle", reason=done.abort_reason)
            return
        self._metrics.rollouts_committed.inc()
        if self.guards is not None and rollout.policy.guard.max_values:
            self.guards.look_soon()
        log.info("rollout_committed", rollout=rollout.name, version=done.target_version,
                 regions=list(rollout.regions),
                 ready={r.region: f"{r.ready_nodes}/{r.live_nodes}" for r in readiness},
                 activation_time=done.activation_time.ToJsonString(),
                 commit_revision=done.commit_revision)

    async def _abort(self, rollout: res.Rollout, reason: str, cause: str) -> None:
        try:
            await self._rollouts.abort(rollout.name, reason, actor=COORDINATOR_ACTOR)
        except ModelregError as err:
            if err.reason != _DONE:
                raise
            log.info("rollout_already_done", rollout=rollout.name, detail=err.message)
            return
        self._metrics.rollouts_aborted.labels(cause=cause).inc()
        log.warning("rollout_aborted", rollout=rollout.name, version=rollout.target_version,
                    cause=cause, reason=reason)


def runs_coordinator(config: ServerConfig, topology: Topology | None) -> bool:
    """``--coordinator``: auto runs it in the primary region (or a deployment of one region)."""
    if config.coordinator == "auto":
        return topology is None or config.region == topology.primary
    return config.coordinator == "on"


READINESS_TIMEOUT = 2.0
"""Longest the coordinator waits for one region's readiness (a region that does not answer in
time is not ready this round; its deadline is what ends the rollout)."""


@contextlib.asynccontextmanager
async def open_coordinator(
    config: ServerConfig,
    topology: Topology | None,
    rollouts: RolloutRecords,
    local: LocalReadiness,
    metrics: Metrics,
    *,
    hint: Callable[[], bool],
    guard: GuardRecords | None = None,
    local_health: LocalHealth | None = None,
    own_etcd: tuple[str, ...],
    candidate: str,
) -> AsyncIterator[Coordinator]:
    """The rollout coordinator of a server (``App`` runs it), not yet running; then closed.

    ``rollouts`` and ``local`` (this region's readiness) are the server's domain over its
    store; ``hint`` its stage hub's look at pending rollouts; ``guard`` and ``local_health``
    (this region's health) the rollout guard's, which is off without them.

    It elects through the primary etcd, under the deployment's prefix: the server's own
    endpoints (``own_etcd``) in the primary region or without a topology, else the topology's
    primary etcd (``--coordinator on`` outside the primary).
    """
    primary = topology is None or config.region == topology.primary
    endpoints = own_etcd if primary or topology is None else topology.primary_region.etcd
    etcd = Etcd(endpoints, timeout=min(config.etcd_timeout, config.coordinator_lease / 3))
    readiness = RegionReadiness(
        own_region=config.region_name, local=local,
        regions={r.name: r.servers for r in topology.regions} if topology is not None else {},
        timeout=min(READINESS_TIMEOUT, config.forward_timeout),
        connect_timeout=config.forward_connect_timeout, local_health=local_health)
    election = Election(etcd, (config.prefix + LEADER_KEY).encode(), candidate,
                        ttl=config.coordinator_lease, poll=config.rollout_interval, log=log,
                        events=COORDINATOR_EVENTS)
    coordinator = Coordinator(rollouts, readiness, election, hint=hint,
                              guard=guard if local_health is not None else None,
                              interval=config.rollout_interval, metrics=metrics)
    try:
        readiness.connect()
        log.info("coordinator_candidate", candidate=candidate, etcd=",".join(endpoints),
                 interval=config.rollout_interval, lease_ttl=config.coordinator_lease)
        yield coordinator
    finally:
        await readiness.close()
        await etcd.close()
