"""The coordinator's rollout guard: watches every baking rollout and rolls back a breaching one.

The leading coordinator (:mod:`modelreg.server.rollout_coordinator`) runs this beside its
prepare work, on the same ticks. For each committed promotion whose guard watches
(``Guard.baking``: within its bake window, the stage not moved on, not fired yet), every tick

1. asks every region of the rollout for its fleet's health on the committed version
   (:mod:`modelreg.server.rollout_readiness`: its own region in-process, the others over gRPC,
   answered only once they have replicated the commit);
2. keeps each region's breach streak (:func:`modelreg.server.domain.guard.streaks`) and
   judges (:func:`~modelreg.server.domain.guard.judge`): a streak of the policy's breach
   duration within the bake window fires;
3. fires through the domain (``Guard.fire``): one transaction rolls the stage back in every
   region and records the verdict, or writes nothing if the guard stands down.

The list of baking rollouts is read afresh every ``look_every`` seconds (and at once after this
coordinator commits one), not every tick: the fire transaction checks everything again, so a
list that lags costs a look, never a wrong rollback. Streaks are the only memory, and a
successor starts them afresh (it can only delay a rollback).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from modelreg.server.api.metrics import Metrics
from modelreg.server.domain import guard as rules
from modelreg.server.domain.rollout_decision import stage_of
from modelreg.server.rollout_readiness import COORDINATOR_ACTOR
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res

log = structlog.get_logger("modelreg.server.coordinator")


class GuardRecords(Protocol):
    """What the guard needs of the domain (``domain.guard.Guard``)."""

    async def baking(self) -> list[res.Rollout]:
        """Every committed promotion whose guard watches now, read fresh."""
        ...

    async def fire(self, name: str, judgement: rules.Judgement,
                   health: Sequence[res.RegionHealth], *, actor: str) -> rules.Fired | None:
        """Rolls back and records the verdict; None if the guard stands down."""
        ...


class HealthSource(Protocol):
    """A region's health (``rollout_readiness.RegionReadiness``)."""

    async def health(
        self, region: str, request: fs.GetRegionHealthRequest, *, min_revision: int
    ) -> res.RegionHealth:
        """Never raises: a region that cannot say does not breach, with ``error`` set."""
        ...


Warn = Callable[..., None]
"""The coordinator's log-once-per-streak warning: ``warn(key, event, err, **fields)``."""


class BakingGuards:
    """The guards of every baking rollout, driven by the leading coordinator's ticks."""

    def __init__(
        self,
        guard: GuardRecords,
        health: HealthSource,
        *,
        metrics: Metrics,
        warn: Warn,
        look_every: float,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """Watches through ``guard`` and ``health``; ``clock`` returns Unix nanoseconds."""
        self._guard = guard
        self._health = health
        self._metrics = metrics
        self._warn = warn
        self._look_every = look_every
        self._clock = clock
        self._baking: dict[str, res.Rollout] = {}
        self._streaks: dict[str, rules.Streaks] = {}
        self._looked = -math.inf
        self.looks: Counter[str] = Counter()
        """Looks at the regions' health so far, per rollout (for operators' and tests' eyes)."""
        self.reads = 0
        """Fresh reads of the baking rollouts so far."""

    def reset(self) -> None:
        """Forgets everything (a new leadership learns afresh from etcd)."""
        self._baking.clear()
        self._streaks.clear()
        self._looked = -math.inf

    def look_soon(self) -> None:
        """Reads the baking rollouts on the next tick (this coordinator just committed one)."""
        self._looked = -math.inf

    @property
    def busy(self) -> bool:
        """Whether some rollout is baking (as of the last look)."""
        return bool(self._baking)

    def watching(self) -> list[str]:
        """The rollouts watched now (as of the last read)."""
        return sorted(self._baking)

    def breaching(self, name: str) -> dict[str, int]:
        """The breach streaks of a watched rollout: region -> when its breach began (ns)."""
        return dict(self._streaks.get(name, {}))

    async def any_baking(self) -> bool:
        """Whether some rollout bakes now: a fresh read, for a coordinator deciding to campaign."""
        return bool(await self._guard.baking())

    async def tick(self, lost: asyncio.Event) -> None:
        """One look at every baking rollout's regions, each rollout on its own."""
        now = asyncio.get_running_loop().time()
        if now - self._looked >= self._look_every:
            self._looked = now
            baking = await self._guard.baking()
            self.reads += 1
            self._baking = {r.name: r for r in baking}
            for gone in set(self._streaks) - set(self._baking):
                del self._streaks[gone]
        await asyncio.gather(*(self._guarded_step(r, lost) for r in list(self._baking.values())))

    async def _guarded_step(self, rollout: res.Rollout, lost: asyncio.Event) -> None:
        try:
            await self.step(rollout, lost)
        except Exception as err:  # one rollout's trouble is not the others'
            self._warn("guard " + rollout.name, "rollout_guard_failed", err,
                       rollout=rollout.name)

    def _forget(self, name: str) -> None:
        self._baking.pop(name, None)
        self._streaks.pop(name, None)

    async def step(self, rollout: res.Rollout, lost: asyncio.Event) -> None:
        """Asks every region, keeps the streaks, fires if the judgement says so."""
        now = self._clock()
        if now > rules.bake_end_ns(rollout):
            log.info("rollout_guard_baked", rollout=rollout.name,
                     version=rollout.target_version)
            self._forget(rollout.name)
            return
        if now < rollout.activation_time.ToNanoseconds():
            return  # nodes have not switched yet
        request = fs.GetRegionHealthRequest(name=stage_of(rollout.name),
                                            version=rollout.target_version,
                                            guard=rollout.policy.guard)
        health = list(await asyncio.gather(*(
            self._health.health(region, request, min_revision=rollout.commit_revision)
            for region in rollout.regions)))
        now = self._clock()
        if lost.is_set() or rollout.name not in self._baking:
            return
        self.looks[rollout.name] += 1
        before = self._streaks.get(rollout.name, {})
        streaks = rules.streaks(before, health, now)
        self._streaks[rollout.name] = streaks
        for region in set(streaks) - set(before):
            log.warning("rollout_guard_breach", rollout=rollout.name, region=region,
                        figures=_breached(health, region))
        judgement = rules.judge(rollout, health, streaks, now)
        if judgement.action == "done":
            self._forget(rollout.name)
            return
        if judgement.action == "watch" or lost.is_set():
            return
        fired = await self._guard.fire(rollout.name, judgement, health, actor=COORDINATOR_ACTOR)
        self._forget(rollout.name)
        if fired is None:
            log.info("rollout_guard_stood_down", rollout=rollout.name)
            return
        outcome = "refused" if fired.rollback is None else "rolled_back"
        self._metrics.guard_fired.labels(outcome=outcome).inc()
        if fired.rollback is None:
            log.error("rollout_guard_rollback_refused", rollout=rollout.name,
                      evidence=judgement.evidence, error=fired.rollout.guard.error)
            return
        log.warning("rollout_guard_rolled_back", rollout=rollout.name,
                    rollback=fired.rollout.guard.rollback,
                    version=fired.rollback.stage.version, evidence=judgement.evidence)


def _breached(health: Sequence[res.RegionHealth], region: str) -> dict[str, str]:
    for h in health:
        if h.region == region:
            return {f.figure: f"{f.worst_value:g} > {f.max_value:g} ({f.breaching_nodes}/"
                              f"{h.live_nodes} nodes)" for f in h.figures if f.breached}
    return {}
