"""Stage pointers: read, promote, roll back, and their history.

A promotion reads the model (declared stages), the pointer, the version and the pointers its
rules depend on (staging for a production move, production for a back-fill), and commits the
new pointer, its history entry and the audit event in one transaction guarded on all of them.
A rollback reads the model, the pointer, its candidates' versions and the fleet's outcome
records of those versions in that stage (one guarded range): a node report recorded meanwhile
fails the commit, and the decision is made again on it. A clear reads the model and the pointer.

On a stage governed by a rollout policy (``rollouts``), a promotion starts a rollout instead
of moving the pointer, and a rollback is an emergency rollout committed at once that aborts
any rollout still preparing. A clear moves at once as elsewhere. While a rollout prepares, the
stage takes no other promotion and no clear (``RolloutInProgressError``); a rollback is the way
past it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from modelreg.server.domain import (
    keys,
    lifecycle,
    moves,
    names,
    outcomes,
    pin_view,
    records,
    rollouts,
    validation,
)
from modelreg.server.domain.errors import (
    InvalidArgumentError,
    NotFoundError,
    RolloutInProgressError,
)
from modelreg.server.domain.ports import LocalStore, ModelStore, Put, Unchanged
from modelreg.server.domain.transaction import (
    DEFAULT_REGION,
    Call,
    Decide,
    Operations,
    Plan,
    Reader,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res

_pointer = moves.pointer
_move_writes = moves.move_writes


MoveRequest = svc.PromoteVersionRequest | svc.RollbackStageRequest | svc.ClearStageRequest


def _check_move(req: MoveRequest) -> None:
    v = validation.Violations()
    validation.text(v, "reason", req.reason, validation.MAX_REASON)
    validation.request_id(v, req.request_id)
    v.raise_if_any()


async def fleet_record(
    r: Reader, model_id: str, stage: str, versions: list[int]
) -> outcomes.FleetRecord:
    """The outcome records of ``versions`` in ``stage``: one range read, guarded whole."""
    present = [v for v in versions if v > 0]
    if not present:
        return outcomes.FleetRecord()
    start, end = keys.outcomes_range(model_id, stage, min(present), max(present))
    wanted = set(present)
    entries = [e for e in await r.scan_all(start, end, limit=0)
               if int(e.key.rsplit("/", 2)[-2]) in wanted]
    return outcomes.FleetRecord.from_entries(entries)


class Stages(Operations):
    """Operations on stage pointers.

    ``local`` is the region-local store of a server outside the primary region: its reads
    show a stage the region pinned (break glass, ``pins``) at the pinned version.
    """

    def __init__(self, store: ModelStore, clock: Callable[[], int] = time.time_ns, *,
                 regions: Sequence[str] = (DEFAULT_REGION,),
                 local: LocalStore | None = None) -> None:
        super().__init__(store, clock, regions=regions)
        self._local = local

    async def _model(self, r: Reader, model_id: str) -> res.RegisteredModel:
        entry = await r.get(keys.model(model_id))
        if entry is None:
            raise NotFoundError(names.model_name(model_id))
        return records.decode(entry, res.RegisteredModel)

    async def get(self, req: svc.GetStageRequest) -> svc.GetStageResponse:
        """Reads one stage pointer of a declared stage (empty if never used)."""
        model_id, stage = names.parse_stage("name", req.name)
        model_key, stage_key = keys.model(model_id), keys.stage(model_id, stage)
        snap = await self._store.read([model_key, stage_key], fresh=True)
        model_entry = snap.get(model_key)
        if model_entry is None:
            raise NotFoundError(names.model_name(model_id))
        lifecycle.check_stage_declared(
            records.decode(model_entry, res.RegisteredModel), stage, "name"
        )
        pointer = _pointer(snap.get(stage_key), model_id, stage)
        pin = (await pin_view.served_pins(self._local, model_id)).get(stage)
        if pin is not None:
            pointer = pin_view.overlay(pointer, pin)
        return svc.GetStageResponse(stage=pointer, revision=snap.revision)

    async def list(self, req: svc.ListStagesRequest) -> svc.ListStagesResponse:
        """Every stage of a model, built-in and declared, with what each points at."""
        model_id = names.parse_model("parent", req.parent)
        model = await self._model(Reader(self._store, fresh=True), model_id)
        prefix = keys.stages_prefix(model_id)
        page = await self._store.scan(
            prefix, keys.prefix_end(prefix), limit=validation.MAX_PAGE_SIZE
        )
        found = {e.key.removeprefix(prefix): e for e in page.entries}
        stages = [*validation.BUILTIN_STAGES, *model.custom_stages]
        pinned = await pin_view.served_pins(self._local, model_id)
        pointers = [_pointer(found.get(s), model_id, s) for s in stages]
        return svc.ListStagesResponse(
            stages=[pin_view.overlay(p, pinned[s]) if s in pinned else p
                    for s, p in zip(stages, pointers, strict=True)],
            revision=page.revision,
        )

    async def promote(
        self, call: Call, req: svc.PromoteVersionRequest
    ) -> svc.PromoteVersionResponse:
        """Points a stage at a version, enforcing the lifecycle rules (see ``lifecycle``)."""
        model_id, stage = names.parse_stage("name", req.name)
        _check_move(req)
        if req.version <= 0:
            raise InvalidArgumentError.field("version", "must be a positive version number")
        if req.hotfix and stage != lifecycle.PRODUCTION:
            raise InvalidArgumentError.field("hotfix", "the hotfix path leads to production only")
        if req.hotfix and not req.reason.strip():
            raise InvalidArgumentError.field("reason", "is required for a hotfix")

        def idle(pointer: res.StagePointer) -> None:
            if pointer.pending_rollout:
                raise RolloutInProgressError(req.name, pointer.pending_rollout,
                                             f"version {req.version} cannot be promoted now")

        async def decide(r: Reader) -> Plan:
            promotion = await moves.promotion(
                r, model_id, stage, req.version, hotfix=req.hotfix, reason=req.reason,
                actor=call.actor, etag=req.etag, check=idle)
            old, move = promotion.old, promotion.move
            if stage in promotion.model.rollout_policies:
                policy = promotion.model.rollout_policies[stage]
                return self._start_rollout(call, req, model_id, stage, old, policy, r)
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_PROMOTE,
                resource=req.name,
                model=model_id,
                stage=stage,
                from_value=str(move.from_version or ""),
                to_value=str(req.version),
                reason=req.reason,
                hotfix=req.hotfix,
            )
            archived = move.from_version if stage == lifecycle.PRODUCTION else 0
            response = svc.PromoteVersionResponse(stage=move.pointer, archived_version=archived)
            return Plan(promotion.writes(model_id, stage), audit, response)

        return await self._mutate(call, decide, svc.PromoteVersionResponse)

    def _start_rollout(self, call: Call, req: svc.PromoteVersionRequest, model_id: str,
                       stage: str, old: res.StagePointer, policy: res.RolloutPolicy,
                       r: Reader) -> Plan:
        """A promotion of a governed stage: a rollout starts; the pointer does not move yet.

        The lifecycle rules were checked (they are again at commit); the back-fill a staging
        promotion settles is settled by the commit too.
        """
        pointer, rollout = rollouts.start(
            model_id, stage, old, req.version, policy, self._regions, actor=call.actor,
            reason=req.reason, hotfix=req.hotfix, now=r.now)
        rollout_key = keys.rollout(model_id, stage, pointer.rollout_count)
        writes = [Put(keys.stage(model_id, stage), records.encode(pointer)),
                  Put(rollout_key, rollouts.encode(rollout))]
        audit = res.AuditEvent(
            action=res.AUDIT_ACTION_START_ROLLOUT,
            resource=req.name,
            model=model_id,
            stage=stage,
            from_value=str(old.version or ""),
            to_value=str(req.version),
            reason=req.reason,
            hotfix=req.hotfix,
            rollout=rollout.name,
        )
        response = svc.PromoteVersionResponse(stage=pointer, rollout=rollout)
        # Create-only: a record left under this number (never, unless etcd was edited) is
        # not overwritten; the commit then fails and the decision is made again on it.
        return Plan(writes, audit, response, guards=[Unchanged(rollout_key, 0)])

    async def rollback(
        self, call: Call, req: svc.RollbackStageRequest
    ) -> svc.RollbackStageResponse:
        """Moves a stage back to its last known-good version, or to a named former one."""
        names.parse_stage("name", req.name)
        _check_move(req)
        if req.to_version < 0:
            raise InvalidArgumentError.field(
                "to_version", "must be 0 (last known-good) or positive"
            )
        if req.allow_unserved and not req.to_version:
            raise InvalidArgumentError.field(
                "allow_unserved", "applies to a named to_version only: name the version to force")
        if req.allow_unserved and not req.reason.strip():
            raise InvalidArgumentError.field("reason", "is required with allow_unserved")
        resp = await self._mutate(call, self.rollback_decision(call.actor, req),
                                  svc.RollbackStageResponse)
        if resp.HasField("rollout"):
            resp.rollout.commit_revision = resp.revision
        return resp

    def rollback_decision(self, actor: str, req: svc.RollbackStageRequest) -> Decide:
        """The decision of a rollback (``req`` validated), for ``rollback`` and the guard.

        The rollout guard (``guard``) rolls back through here, so its rollback is exactly an
        operator's: the same candidates, the same fleet evidence, an emergency rollout on a
        governed stage.
        """
        model_id, stage = names.parse_stage("name", req.name)
        stage_key = keys.stage(model_id, stage)

        async def decide(r: Reader) -> Plan:
            await r.get_many([keys.model(model_id), stage_key])
            model = await self._model(r, model_id)
            lifecycle.check_stage_declared(model, stage, "name")
            entry = await r.get(stage_key)
            records.check_etag(req.etag, req.name, entry)
            old = _pointer(entry, model_id, stage)
            candidates = list(old.rollback_candidates)
            versions = await r.get_many([keys.version(model_id, c) for c in candidates])
            deprecated = {
                c for c, e in zip(candidates, versions, strict=True)
                if e is None or res.ModelVersion.FromString(e.value).HasField("sunset_time")
            }
            fleet = await fleet_record(r, model_id, stage, [old.version, *candidates])
            move = lifecycle.rollback(
                model_id,
                stage,
                old,
                req.to_version,
                deprecated=deprecated,
                fleet=fleet,
                allow_unserved=req.allow_unserved,
                reason=req.reason,
                actor=actor,
                now=r.now,
            )
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_ROLLBACK,
                resource=req.name,
                model=model_id,
                stage=stage,
                from_value=str(move.from_version),
                to_value=str(move.pointer.version),
                reason=req.reason,
                skipped=move.skipped,
                forced=move.forced,
            )
            response = svc.RollbackStageResponse(
                stage=move.pointer, rolled_back_version=move.from_version, skipped=move.skipped,
                fleet_evidence=fleet.evidence,
            )
            plan = Plan([], audit, response)
            if stage in model.rollout_policies:
                await self._emergency(r, model_id, stage, old, move,
                                      model.rollout_policies[stage], actor, req, plan)
            plan.writes = [*_move_writes(model_id, stage, move), *plan.writes]
            return plan

        return decide

    async def _emergency(self, r: Reader, model_id: str, stage: str, old: res.StagePointer,
                         move: lifecycle.Move, policy: res.RolloutPolicy, actor: str,
                         req: svc.RollbackStageRequest, plan: Plan) -> None:
        """A rollback of a governed stage: an emergency rollout, committed at once.

        No prepare (the version rolled back to is normally still warm on every node): the
        pointer moves now with activation on receipt, under a ROLLBACK rollout record born
        COMMITTED; a rollout still preparing is aborted in the same transaction. Adds to
        ``plan`` (whose pointer is ``move.pointer``).
        """
        rollout = rollouts.emergency(
            model_id, stage, old, move.pointer, policy, self._regions, actor=actor,
            reason=req.reason, now=r.now)
        rollout_key = keys.rollout(model_id, stage, move.pointer.rollout_count)
        plan.writes = [*plan.writes, Put(rollout_key, rollouts.encode(rollout))]
        plan.guards.append(Unchanged(rollout_key, 0))
        plan.audit.rollout = rollout.name
        assert isinstance(plan.response, svc.RollbackStageResponse)
        plan.response.stage.CopyFrom(move.pointer)
        plan.response.rollout.CopyFrom(rollout)
        superseded = await rollouts.supersede(
            r, old, f"superseded by a rollback of {req.name} to version "
                    f"{move.pointer.version} ({rollout.name})")
        if superseded is not None:
            aborted, writes = superseded
            plan.writes = [*plan.writes, *writes]
            plan.earlier_audit.append(rollouts.abort_audit(aborted, aborted.abort_reason))
            plan.response.aborted_rollout = aborted.name

    async def clear(self, call: Call, req: svc.ClearStageRequest) -> svc.ClearStageResponse:
        """Empties a stage pointer (version 0); production only with force and a reason."""
        model_id, stage = names.parse_stage("name", req.name)
        _check_move(req)
        if req.force and not req.reason.strip():
            raise InvalidArgumentError.field("reason", "is required with force")
        stage_key = keys.stage(model_id, stage)

        async def decide(r: Reader) -> Plan:
            await r.get_many([keys.model(model_id), stage_key])
            model = await self._model(r, model_id)
            lifecycle.check_stage_declared(model, stage, "name")
            entry = await r.get(stage_key)
            records.check_etag(req.etag, req.name, entry)
            old = _pointer(entry, model_id, stage)
            if old.pending_rollout:
                raise RolloutInProgressError(req.name, old.pending_rollout,
                                             "the stage cannot be cleared now")
            move = lifecycle.clear(
                model_id, stage, old, force=req.force,
                reason=req.reason, actor=call.actor, now=r.now,
            )
            writes = _move_writes(model_id, stage, move)
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_CLEAR_STAGE,
                resource=req.name,
                model=model_id,
                stage=stage,
                from_value=str(move.from_version),
                to_value="",
                reason=req.reason,
                forced=move.forced,
            )
            response = svc.ClearStageResponse(stage=move.pointer,
                                              cleared_version=move.from_version)
            return Plan(writes, audit, response)

        return await self._mutate(call, decide, svc.ClearStageResponse)

    async def history(self, req: svc.ListStageHistoryRequest) -> svc.ListStageHistoryResponse:
        """The moves of one stage pointer, newest first."""
        model_id, stage = names.parse_stage("name", req.name)
        v = validation.Violations()
        size = validation.page_size(v, req.page_size)
        v.raise_if_any()
        prefix = keys.history_prefix(model_id, stage)
        page = await records.list_page(
            self._store, prefix, keys.prefix_end(prefix), page_size=size, token=req.page_token,
            reverse=True,
        )
        return svc.ListStageHistoryResponse(
            entries=[records.decode(e, res.PointerHistoryEntry) for e in page.entries],
            next_page_token=page.next_token,
            revision=page.revision,
        )

