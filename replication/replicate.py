"""What the leading replica does: copy the primary once, then apply every primary revision.

Two tasks per watch: a pump reads the primary's watch (:mod:`~modelreg.replication.feed`) into
a bounded queue, and the apply loop drains whatever has arrived into as few regional commits as
the limits allow (:mod:`~modelreg.replication.plan`), so batching grows by itself under load and
costs nothing when idle. The loop resumes from the regional state after any failure:

* no state yet: the first copy, a new generation from a primary snapshot (``RESYNCED``);
* the primary compacted past the applied revision: the same, at its current revision;
* a revision too large for one Txn: a new generation from a snapshot *at that revision*
  (``SWITCHED``), or at the current one if that was compacted meanwhile;
* a lost race (a commit whose outcome was unknown, or a concurrent writer): re-read the state
  and skip every revision at or below it, which is what makes restarts exactly-once;
* an etcd that does not answer: back off and resume (the primary being away is the static
  stability case: the region keeps what it has and the lag grows);
* ``NotLeader`` and ``TooLarge`` propagate: the agent steps down, or stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from modelreg.replication import layout
from modelreg.replication.errors import Compacted, EtcdUnavailable, LostRace, NotLeader
from modelreg.replication.etcd import Etcd
from modelreg.replication.feed import Contact, PrimaryFeed
from modelreg.replication.lag import LagTracker
from modelreg.replication.layout import Kind
from modelreg.replication.plan import Revision, next_commit
from modelreg.replication.region import Region
from modelreg.replication.snapshot import PrimarySnapshot

QUEUE = 10_000
"""Revisions (and contacts) read ahead of the regional commits; then the watch waits."""
BACKOFF = (0.1, 2.0)
"""First and longest pause, in seconds, after an etcd did not answer."""


class Replication:
    """The leader's work for one region; :meth:`run` until cancelled."""

    def __init__(self, primary: Etcd, region: Region, *, prefix: bytes, tracker: LagTracker,
                 probe_interval: float, idle_flush: float, log: Any) -> None:
        self._primary = primary
        self._region = region
        self._prefix = prefix
        self._tracker = tracker
        self._feed = PrimaryFeed(primary, prefix, probe_interval=probe_interval)
        self._idle_flush = idle_flush
        self._log = log
        self.resyncs = 0

    async def run(self) -> None:
        """Replicates until cancelled; raises ``NotLeader`` (step down) or ``TooLarge``."""
        reason: str | None = None
        pause = BACKOFF[0]
        collected = False  # leftovers of an earlier leader: once per term is enough
        while True:
            commits = self._region.commits
            try:
                state = await self._region.load()
                if state is None:
                    reason = "first copy"
                elif reason is None:
                    self._log.info("replication.resuming", applied=state.applied,
                                   generation=state.generation)
                    if not collected:
                        await self._region.collect_garbage()
                        collected = True
                if reason is not None:
                    await self._build(None, Kind.RESYNCED, reason)
                    reason = None
                assert self._region.state is not None
                self._tracker.applied_to(self._region.state.applied)
                await self._follow()
            except Compacted as err:
                reason = f"the primary compacted its history up to revision {err.revision}"
                self._log.warning("replication.compacted", compacted=err.revision,
                                  applied=self._region.state and self._region.state.applied)
            except NotLeader:
                raise
            except LostRace as err:
                self._log.warning("replication.lost_race", error=str(err))
            except EtcdUnavailable as err:
                self._log.warning("replication.etcd_unavailable", error=str(err), retry_in=pause)
                await asyncio.sleep(pause)
                pause = BACKOFF[0] if self._region.commits > commits else min(
                    2 * pause, BACKOFF[1])

    async def _build(self, revision: int | None, kind: Kind, reason: str) -> None:
        """A new generation from a primary snapshot at ``revision`` (None: the current one)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                snapshot = await PrimarySnapshot.at(self._primary, self._prefix, revision)
                state = await self._region.build(snapshot.revision, kind, snapshot.pages())
                break
            except Compacted:
                self._log.info("replication.snapshot_compacted", revision=revision)
                revision, kind = None, Kind.RESYNCED
        self.resyncs += 1
        self._tracker.applied_to(state.applied)
        self._log.info("replication.resync", reason=reason, kind=kind.name,
                       generation=state.generation, revision=state.applied,
                       keys=snapshot.keys, seconds=round(loop.time() - started, 3))

    async def _pump(self, queue: asyncio.Queue[Any], start: int) -> None:
        try:
            async for item in self._feed.watch(start):
                await queue.put(item)
        except Exception as err:  # delivered in order, after what came before it
            await queue.put(err)

    async def _follow(self) -> None:
        assert self._region.state is not None
        queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE)
        pump = asyncio.create_task(self._pump(queue, self._region.state.applied + 1))
        try:
            await self._apply(queue)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _apply(self, queue: asyncio.Queue[Any]) -> None:
        loop = asyncio.get_running_loop()
        pending: list[Revision] = []
        while True:
            timeout = (None if not pending
                       else max(0.0, pending[0].received + self._idle_flush - loop.time()))
            try:
                items = [await asyncio.wait_for(queue.get(), timeout)]
            except TimeoutError:
                items = []
            while not queue.empty():
                items.append(queue.get_nowait())
            error: Exception | None = None
            for item in items:
                if isinstance(item, Revision):
                    assert self._region.state is not None
                    last = pending[-1].revision if pending else self._region.state.applied
                    if item.revision > last:
                        pending.append(item)
                elif isinstance(item, Contact):
                    self._tracker.heard(item.revision)
                else:
                    error = item
            self._tracker.pending(pending[0].received if pending else None)
            await self._flush(pending, force=error is not None)
            if error is not None:
                raise error

    async def _flush(self, pending: list[Revision], *, force: bool) -> None:
        """Commits pending revisions.

        All of them once one changes a replicated key (or when forced); revisions that change
        none wait up to ``idle_flush`` for company.
        """
        loop = asyncio.get_running_loop()
        region = self._region
        while pending and (force or any(r.changes for r in pending)
                           or loop.time() - pending[0].received >= self._idle_flush):
            assert region.state is not None
            overhead = len(layout.data_prefix(region.prefix, region.state.generation))
            n = next_commit(pending, region.limits, overhead)
            if n == 0:
                self._log.info("replication.oversized_revision", revision=pending[0].revision,
                               changes=len(pending[0].changes))
                await self._build(pending[0].revision, Kind.SWITCHED,
                                  "one primary revision is too large for one regional Txn")
            else:
                await region.apply(pending[:n])
            assert region.state is not None
            applied = region.state.applied
            pending[:] = [r for r in pending if r.revision > applied]
            self._tracker.applied_to(applied)
            self._tracker.pending(pending[0].received if pending else None)
