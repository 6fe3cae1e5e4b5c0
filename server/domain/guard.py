"""The rollout guard: a committed promotion whose fleet turns unhealthy is rolled back by itself.

A governed stage's policy may carry a guard (``RolloutPolicy.guard``): figures nodes report
with their fleet reports (``ServedStage.health``) and the highest value each may take. A
rollout records the policy in force when it started, so the guard of a rollout is its own.
For the guard's *bake window* after a committed promotion's activation time, the rollout
coordinator asks every region of the rollout for its fleet's health on the committed version
(:mod:`modelreg.server.domain.health`, per region), and applies the rules here:

* a region's **streak** is how long it has breached on every look (:func:`streaks`); a look
  that does not breach, or a region that cannot be asked, ends it: the guard fires only on
  evidence it saw throughout;
* a streak of ``breach_duration`` or more within the bake window **fires** (:func:`judge`);
  the evidence names the region, each breached figure with the observed and allowed values,
  the nodes, and for how long;
* firing is one transaction (:meth:`Guard.fire`): the stage's emergency rollback, exactly as
  ``RollbackStage`` makes it (committed at once, activation on receipt, a ROLLBACK rollout
  record, audited as a ROLLBACK by the coordinator with the evidence as its reason), and the
  guarded rollout's record with the verdict (``Rollout.guard``), guarded on everything read.
  It **stands down** (writes nothing) once the guard fired, after the bake window, or when
  the stage has moved on since the commit (its pointer names another rollout or version). A
  rollout preparing on the stage meanwhile does not stop it (the bad version still serves):
  the rollback aborts that rollout in the same transaction, as every emergency rollback does.

Streaks live in the coordinator's memory: a successor starts them afresh, which can only
delay a rollback, never hasten one. Everything else is read from etcd.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from modelreg.server.domain import keys, names, rollouts, validation
from modelreg.server.domain.errors import (
    FailedPreconditionError,
    NotFoundError,
    RolloutDoneError,
    clip,
)
from modelreg.server.domain.ports import ModelStore, Put, Unchanged
from modelreg.server.domain.rollouts import COORDINATOR_METHOD
from modelreg.server.domain.stages import Stages
from modelreg.server.domain.transaction import (
    DEFAULT_REGION,
    Call,
    Operations,
    Plan,
    Reader,
    now_timestamp,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as rs

Streaks = dict[str, int]
"""Per region, when (Unix ns) its current breach began, as the coordinator saw it."""


def enabled(guard: res.RolloutGuard) -> bool:
    """Whether a guard is on: it names at least one figure."""
    return bool(guard.max_values)


def bake_window_ns(guard: res.RolloutGuard) -> int:
    """The bake window in force (unset: 10 minutes)."""
    if guard.HasField("bake_window"):
        return int(guard.bake_window.ToNanoseconds())
    return validation.DEFAULT_BAKE_WINDOW_NS


def breach_duration_ns(guard: res.RolloutGuard) -> int:
    """How long a region must breach before the guard fires (unset: 0)."""
    return int(guard.breach_duration.ToNanoseconds())


def bake_end_ns(rollout: res.Rollout) -> int:
    """When the guard of a committed rollout stops watching (Unix ns)."""
    return int(rollout.activation_time.ToNanoseconds()) + bake_window_ns(rollout.policy.guard)


def watched(rollout: res.Rollout) -> bool:
    """Whether the guard watches ``rollout``: a committed promotion, guard on, not fired yet."""
    return (rollout.kind == res.ROLLOUT_KIND_PROMOTE and rollout.state == rollouts.COMMITTED
            and enabled(rollout.policy.guard) and not rollout.HasField("guard"))


def stand_down(rollout: res.Rollout, pointer: res.StagePointer, now_ns: int) -> str:
    """Why the guard of ``rollout`` may no longer act on ``pointer`` now; "" if it may."""
    if not watched(rollout):
        if rollout.HasField("guard"):
            return "its guard already fired"
        return "it is not a committed promotion with a guard"
    if pointer.rollout != rollout.name or pointer.version != rollout.target_version:
        return (f"the stage moved on since (it names v{pointer.version}"
                f"{' by ' + pointer.rollout if pointer.rollout else ''})")
    if now_ns > bake_end_ns(rollout):
        return "its bake window is over"
    return ""


def streaks(previous: Mapping[str, int], health: Sequence[res.RegionHealth],
            now_ns: int) -> Streaks:
    """The regions breaching now, each with when its breach began (now, if it just did)."""
    return {h.region: previous.get(h.region, now_ns)
            for h in health if h.breached and not h.error}


@dataclass(frozen=True)
class Judgement:
    """What the guard of one baking rollout does after a look."""

    action: Literal["watch", "fire", "done"]
    """``done``: its bake window is over; the coordinator stops looking."""
    evidence: str = ""
    """Why it fires (at most ``MAX_REASON`` characters: it is the rollback's reason)."""
    region: str = ""
    since_ns: int = 0
    """When the breach that fires began."""


def judge(rollout: res.Rollout, health: Sequence[res.RegionHealth], breaching: Mapping[str, int],
          now_ns: int) -> Judgement:
    """The guard's rule for one committed rollout, after a look at every region (pure).

    ``breaching`` are the streaks after this look (:func:`streaks`); the oldest long enough
    fires. Nothing fires before the activation time (nodes have not switched) or after the
    bake window.
    """
    if now_ns > bake_end_ns(rollout):
        return Judgement("done")
    if now_ns < rollout.activation_time.ToNanoseconds():
        return Judgement("watch")
    duration = breach_duration_ns(rollout.policy.guard)
    due = sorted((since, region) for region, since in breaching.items()
                 if now_ns - since >= duration)
    by_region = {h.region: h for h in health}
    for since, region in due:
        if region in by_region:
            return Judgement("fire", evidence(rollout, by_region[region], since, now_ns),
                             region, since)
    return Judgement("watch")


def evidence(rollout: res.Rollout, health: res.RegionHealth, since_ns: int, now_ns: int) -> str:
    """The guard's words: the region, each breached figure, observed and allowed, how long.

    E.g. ``rollout guard of .../rollouts/3 (v2): region eu breached for 1.2 s (allowed 1 s):
    error_rate 0.31 > max 0.05 on 2 of 2 live nodes (worst nodes/eu-1)``.
    """
    allowed = breach_duration_ns(rollout.policy.guard) / 1e9
    figures = "; ".join(
        f"{f.figure} {f.worst_value:g} > max {f.max_value:g} on {f.breaching_nodes} of "
        f"{health.live_nodes} live nodes (worst {f.worst_node})"
        for f in health.figures if f.breached)
    return clip(
        f"rollout guard of {rollout.name} (v{rollout.target_version}): region {health.region} "
        f"breached for {(now_ns - since_ns) / 1e9:.3g} s (allowed {allowed:g} s): {figures}",
        validation.MAX_REASON)


@dataclass(frozen=True)
class Fired:
    """What the guard did: the guarded rollout with its verdict, and the rollback."""

    rollout: res.Rollout
    """The guarded rollout as recorded now (``guard`` set)."""
    rollback: svc.RollbackStageResponse | None
    """The emergency rollback; None if the rollback rules refused it (``guard.error``)."""


class Guard(Operations):
    """The guard's reads and its one write, for the rollout coordinator."""

    def __init__(
        self,
        store: ModelStore,
        clock: Callable[[], int] = time.time_ns,
        *,
        regions: Sequence[str] = (DEFAULT_REGION,),
    ) -> None:
        """The guard over ``store``; it rolls back through the stages' own rollback."""
        super().__init__(store, clock, regions=regions)
        self._stages = Stages(store, clock, regions=regions)

    async def baking(self) -> list[res.Rollout]:
        """Every committed promotion whose guard watches now, read fresh.

        Found through the stage pointers (a watched rollout is the one that made its
        pointer's position), and only among pointers activated within the longest bake
        window, so the cost follows the number of stages, not of rollouts ever made.
        """
        now = self._clock()
        page = await self._store.scan(keys.STAGES_START, keys.STAGES_END, limit=0)
        pointers = {}
        for e in page.entries:
            pointer = res.StagePointer.FromString(e.value)
            activated = pointer.activation_time.ToNanoseconds()
            if pointer.rollout and activated >= now - validation.MAX_BAKE_WINDOW_NS:
                pointers[pointer.rollout] = pointer
        wanted = {_key(name): name for name in pointers}
        if not wanted:
            return []
        snap = await self._store.read(list(wanted), fresh=True)
        found = []
        for key, name in wanted.items():
            entry = snap.get(key)
            if entry is None:
                continue
            rollout = rollouts.decode(entry)
            if not stand_down(rollout, pointers[name], now):
                found.append(rollout)
        return found

    async def fire(self, name: str, judgement: Judgement, health: Sequence[res.RegionHealth],
                   *, actor: str) -> Fired | None:
        """Rolls the stage of ``name`` back in every region, as ``judgement`` says; records why.

        One transaction: the emergency rollback (``Stages.rollback_decision``, by ``actor``,
        the judgement's evidence as its reason) and the rollout's verdict, with ``health``
        (the look that fired; the breaching region first). None, with nothing written, if the guard
        stands down (:func:`stand_down`, judged on what the transaction reads). If the
        rollback rules refuse (no known-good version to go to), the verdict alone is
        recorded, with their reason as its ``error``.

        Raises:
            NotFoundError: No such rollout.

        """
        model_id, stage, rollout_id = names.parse_rollout("name", name)
        key = keys.rollout(model_id, stage, rollout_id)
        stage_key = keys.stage(model_id, stage)
        why = judgement.evidence
        verdict = res.GuardVerdict(
            evidence=why, breach_start_time=now_timestamp(judgement.since_ns),
            health=sorted(health, key=lambda h: (h.region != judgement.region, not h.breached)))
        rollback = self._stages.rollback_decision(
            actor, svc.RollbackStageRequest(name=names.stage_name(model_id, stage), reason=why))
        made: list[res.Rollout] = []

        async def decide(r: Reader) -> Plan:
            await r.get_many([key, stage_key, keys.model(model_id)])
            entry = await r.get(key)
            if entry is None:
                raise NotFoundError(name)
            rollout = rollouts.decode(entry)
            pointer = res.StagePointer()
            stage_entry = await r.get(stage_key)
            if stage_entry is not None:
                pointer = res.StagePointer.FromString(stage_entry.value)
            if stand_down(rollout, pointer, r.now.ToNanoseconds()):
                raise RolloutDoneError(name, rollouts.state_name(rollout.state))
            plan = await rollback(r)
            assert isinstance(plan.response, svc.RollbackStageResponse)
            made[:] = [_with_verdict(rollout, verdict, r, rollback=plan.response.rollout.name)]
            plan.writes = [*plan.writes,
                           Put(key, rollouts.encode(made[0], keep_commit_revision=True))]
            return plan

        call = Call(actor=actor, method=COORDINATOR_METHOD, request=rs.GetRolloutRequest(name=name))
        try:
            resp = await self._mutate(call, decide, svc.RollbackStageResponse)
        except RolloutDoneError:
            return None
        except FailedPreconditionError as err:
            refused = await self._refused(name, key, stage_key, verdict, err.message)
            return None if refused is None else Fired(refused, None)
        if resp.HasField("rollout"):
            resp.rollout.commit_revision = resp.revision
        made[0].etag = f'"{resp.revision}"'
        return Fired(made[0], resp)

    async def _refused(self, name: str, key: str, stage_key: str, verdict: res.GuardVerdict,
                       error: str) -> res.Rollout | None:
        """Records a verdict whose rollback was refused: nothing moved, so no audit event.

        Guarded like the rollback would have been (on the record and the pointer); None if
        the guard stands down meanwhile.
        """
        snap = await self._store.read([key, stage_key], fresh=True)
        entry, stage_entry = snap.get(key), snap.get(stage_key)
        if entry is None:
            raise NotFoundError(name)
        rollout = rollouts.decode(entry)
        pointer = (res.StagePointer.FromString(stage_entry.value) if stage_entry is not None
                   else res.StagePointer())
        now = self._clock()
        if stand_down(rollout, pointer, now):
            return None
        reader_now = now_timestamp(now)
        done = res.Rollout()
        done.CopyFrom(rollout)
        done.guard.CopyFrom(verdict)
        done.guard.fire_time.CopyFrom(reader_now)
        done.guard.error = clip(f"the stage could not be rolled back: {error}",
                                validation.MAX_REASON)
        result = await self._store.commit(
            [Unchanged(key, entry.mod_revision),
             Unchanged(stage_key, stage_entry.mod_revision if stage_entry else 0)],
            [Put(key, rollouts.encode(done, keep_commit_revision=True))])
        if not result.succeeded:
            return None  # changed meanwhile: the next look decides again
        done.etag = f'"{result.revision}"'
        return done


def _with_verdict(rollout: res.Rollout, verdict: res.GuardVerdict, r: Reader, *,
                  rollback: str) -> res.Rollout:
    done = res.Rollout()
    done.CopyFrom(rollout)
    done.ClearField("etag")
    done.guard.CopyFrom(verdict)
    done.guard.fire_time.CopyFrom(r.now)
    done.guard.rollback = rollback
    return done


def _key(name: str) -> str:
    model_id, stage, rollout_id = names.parse_rollout("name", name)
    return keys.rollout(model_id, stage, rollout_id)
