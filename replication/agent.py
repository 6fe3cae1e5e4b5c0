"""``Replicator``: one region's replication agent, with an explicit lifecycle.

``run()`` campaigns for the region's leader key (:mod:`~modelreg.replication.election`); while
it leads it replicates (:mod:`~modelreg.replication.replicate`), and when it loses the lease it
stops applying and campaigns again. ``shutdown()`` makes ``run()`` return after resigning, so a
waiting replica takes over at once rather than after the lease lapses. ``async with`` runs it in
the background::

    async with Replicator(config) as replicator:
        ...
        print(replicator.lag())

Children run in an ``asyncio.TaskGroup``: an error nobody handles (a bug, or ``TooLarge``) ends
``run()`` with it instead of leaving a half-alive agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from types import TracebackType

import structlog

from modelreg.replication import layout
from modelreg.replication.config import AgentConfig
from modelreg.replication.election import Election, Leadership
from modelreg.replication.errors import EtcdUnavailable, LostRace, NotLeader
from modelreg.replication.etcd import Etcd
from modelreg.replication.lag import Lag, LagTracker
from modelreg.replication.plan import Limits
from modelreg.replication.region import Region
from modelreg.replication.replicate import Replication


class AgentState(enum.Enum):
    """Where a :class:`Replicator` is in its life."""

    NEW = "new"
    FOLLOWING = "following"
    """Waiting for the leader key."""
    LEADING = "leading"
    """Applying."""
    STOPPED = "stopped"


class Replicator:
    """Replicates the primary prefix into one region's etcd (see the module docstring)."""

    def __init__(self, config: AgentConfig) -> None:
        config.validate()
        self.config = config
        self._log = structlog.get_logger("modelreg.replication").bind(
            region=config.region, replica=config.replica_id)
        self._primary = Etcd(config.primary, timeout=config.etcd_timeout,
                             username=config.primary_username, password=config.primary_password)
        self._etcd = Etcd(config.region_etcd, timeout=config.etcd_timeout,
                          username=config.region_username, password=config.region_password)
        prefix = config.regional_prefix.encode()
        self._region = Region(self._etcd, prefix, config.replica_id,
                              Limits(config.max_txn_ops, config.max_txn_bytes))
        self._tracker = LagTracker(live_window=3 * config.probe_interval + 2.0)
        self._replication = Replication(
            self._primary, self._region, prefix=config.prefix.encode(), tracker=self._tracker,
            probe_interval=config.probe_interval, idle_flush=config.idle_flush, log=self._log)
        self._election = Election(self._etcd, layout.leader_key(prefix), config.replica_id,
                                  ttl=config.lease_ttl, poll=min(1.0, config.lease_ttl / 4),
                                  log=self._log)
        self._state = AgentState.NEW
        self._stop = asyncio.Event()
        self._observed: layout.Status | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> AgentState:
        """Where the agent is in its life."""
        return self._state

    def lag(self) -> Lag:
        """The region's lag as this replica knows it (what a lag RPC answers).

        Measured while it leads; while it follows, the leader's last status record.
        """
        leading = self._state is AgentState.LEADING
        tracker, status = self._tracker, self._observed
        if leading or status is None:
            applied, head = tracker.applied, tracker.head
            seconds = tracker.seconds() if leading else 0.0
            connected = leading and tracker.connected()
        else:
            now_ms = int(time.time() * 1000)
            applied, head = status.applied, status.primary_revision
            seconds = status.seconds_behind(now_ms)
            connected = now_ms - status.written_ms <= 2 * status.interval_ms  # not overdue
        return Lag(
            region=self.config.region, replica=self.config.replica_id, leader=leading,
            applied_revision=applied, primary_revision=head, revisions=max(0, head - applied),
            seconds=seconds, connected=connected, commits=self._region.commits,
            resyncs=self._replication.resyncs)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Replicates (or waits to) until :meth:`shutdown`; then resigns and returns."""
        if self._state is not AgentState.NEW:
            raise RuntimeError(f"a Replicator runs once (it is {self._state.value})")
        self._state = AgentState.FOLLOWING
        self._log.info("replication.started", primary=",".join(self.config.primary),
                       region_etcd=",".join(self.config.region_etcd), prefix=self.config.prefix)
        try:
            async with asyncio.TaskGroup() as tg:
                children = [tg.create_task(self._serve(), name="replication-serve"),
                            tg.create_task(self._report(), name="replication-report")]
                await self._stop.wait()
                for child in children:
                    child.cancel()
        finally:
            self._state = AgentState.STOPPED
            await self._primary.close()
            await self._etcd.close()
            self._log.info("replication.stopped")

    def shutdown(self) -> None:
        """Asks :meth:`run` to return (safe to call from a signal handler, more than once)."""
        self._stop.set()

    async def __aenter__(self) -> Replicator:
        self._task = asyncio.create_task(self.run(), name=f"replicator-{self.config.region}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown()
        if self._task is not None:
            await self._task

    # -- children ------------------------------------------------------------------------------

    async def _serve(self) -> None:
        """Campaign, lead until the lease is lost, campaign again."""
        while True:
            self._state = AgentState.FOLLOWING
            leadership = await self._election.campaign(self._observe)
            self._state = AgentState.LEADING
            try:
                await self._lead(leadership)
            except* NotLeader as group:
                self._log.warning("replication.leadership_lost", why=str(group.exceptions[0]))
            finally:
                if self._state is AgentState.LEADING:
                    self._state = AgentState.FOLLOWING
                await leadership.resign()

    async def _lead(self, leadership: Leadership) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(leadership.keep(), name="replication-lease")
            work = tg.create_task(self._replication.run(), name="replication-apply")
            await leadership.lost.wait()
            if not work.done():
                work.cancel()
                self._log.warning("replication.leadership_lost", why="lease not renewed")

    async def _observe(self, leader: str) -> None:
        """While following: remember the leader's status record, for :meth:`lag`."""
        del leader
        with contextlib.suppress(EtcdUnavailable, ValueError):
            kv, _ = await self._etcd.get(layout.status_key(self._region.prefix))
            self._observed = layout.Status.decode(bytes(kv.value)) if kv is not None else None

    async def _report(self) -> None:
        """Renews the status record while leading, and logs when the region lags."""
        interval = self.config.status_interval or 5.0
        lagging = False
        while True:
            await asyncio.sleep(interval)
            lag = self.lag()
            if not lag.leader:
                continue
            if self.config.status_interval:
                with contextlib.suppress(EtcdUnavailable, LostRace):
                    await self._region.write_status(layout.Status(
                        self.config.replica_id, lag.applied_revision, lag.primary_revision,
                        int(lag.seconds * 1000), int(time.time() * 1000),
                        int(interval * 1000)))
            behind = lag.seconds > interval or not lag.connected
            if behind:
                self._log.warning("replication.lagging", revisions=lag.revisions,
                                  seconds=round(lag.seconds, 3), applied=lag.applied_revision,
                                  primary_connected=lag.connected)
            elif lagging:
                self._log.info("replication.caught_up", applied=lag.applied_revision)
            lagging = behind

    def __repr__(self) -> str:
        return (f"Replicator(region={self.config.region!r}, "
                f"replica={self.config.replica_id!r}, {self._state.value})")

