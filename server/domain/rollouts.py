"""Rollouts: a governed stage moves in every region together, or in none (issue 9).

A stage is *governed* when its model has a rollout policy for it
(``RegisteredModel.rollout_policies``). Its moves go through a ``Rollout`` record,
``rollouts/{model}/{stage}/{id:012d}`` (``keys.rollout``), numbered by the pointer's
``rollout_count``:

* **start** (``PromoteVersion``, in ``stages``): one transaction writes the pointer with
  ``pending_rollout``/``pending_version`` set (its ``version`` unchanged), the record
  (PREPARING, with the policy in force, the regions resolved and the deadline) and the audit
  event START_ROLLOUT. The pointer is what every region and watcher already follows, so the
  intent reaches serving nodes with no new plumbing; they prepare the target and report it.
* **commit** (``commit``, by the coordinator): one transaction guarded on everything it read
  moves the pointer exactly as a promotion does (``moves.promotion``: history, archive of the
  old production version, back-fill), clears the pending fields, names the rollout and sets
  ``activation_time`` = commit time + the policy's margin; the record becomes COMMITTED and
  the audit event is a PROMOTE naming the rollout. The lifecycle rules are checked again: if
  they refuse now, the rollout aborts with their reason instead.
* **abort** (``abort`` by the coordinator, ``cancel`` by an operator): the pointer's pending
  fields cleared, the record ABORTED with its reason, the audit event ABORT_ROLLOUT.
* **emergency rollback** (``RollbackStage``, in ``stages``): committed at once with
  ``activation_time`` = now, as a ROLLBACK record COMMITTED from the start; a rollout still
  preparing is aborted in the same transaction (``supersede``).

A record changes only while PREPARING (readiness, then commit or abort), so a COMMITTED
record's ``mod_revision`` is its commit's revision: ``commit_revision`` is filled in from it
on every read rather than stored. The one exception, the rollout guard's verdict written on a
committed promotion (``guard``), stores the commit revision with it. The coordinator keeps
no state of its own: ``preparing`` finds every rollout to drive from etcd alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from modelreg.server.domain import keys, moves, names, records, validation
from modelreg.server.domain.errors import (
    ContentionError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RolloutDoneError,
)
from modelreg.server.domain.ports import Entry, Put, Unchanged, Write
from modelreg.server.domain.transaction import Call, Decide, Operations, Plan, Reader
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as rs

DEFAULT_PREPARE_DEADLINE = duration_pb2.Duration(seconds=300)
DEFAULT_ACTIVATION_MARGIN = duration_pb2.Duration(seconds=2)
WATCH_INTERVAL = 0.1
"""Seconds between two reads of a watched rollout's record."""
RECORD_ATTEMPTS = 10
"""Guarded readiness writes tried before giving up (each after another writer's change)."""
COORDINATOR_METHOD = "/modelreg.v1.RolloutService/(coordinator)"
"""The method a coordinator's commit or abort is recorded under (never an RPC)."""

Preparing = list[tuple[res.Rollout, int]]
"""Rollouts still preparing, each with its record's mod_revision."""

PREPARING = res.ROLLOUT_STATE_PREPARING
COMMITTED = res.ROLLOUT_STATE_COMMITTED
ABORTED = res.ROLLOUT_STATE_ABORTED


def state_name(state: res.RolloutState.ValueType) -> str:
    """``PREPARING``, ``COMMITTED``, ``ABORTED``."""
    return res.RolloutState.Name(state).removeprefix("ROLLOUT_STATE_")


def resolved_policy(policy: res.RolloutPolicy) -> res.RolloutPolicy:
    """The policy with its defaults written out, as a rollout records it."""
    out = res.RolloutPolicy()
    out.CopyFrom(policy)
    if not out.HasField("prepare_deadline"):
        out.prepare_deadline.CopyFrom(DEFAULT_PREPARE_DEADLINE)
    if not out.HasField("activation_margin"):
        out.activation_margin.CopyFrom(DEFAULT_ACTIVATION_MARGIN)
    return out


def _plus(ts: timestamp_pb2.Timestamp, d: duration_pb2.Duration) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(ts.ToNanoseconds() + d.ToNanoseconds())
    return out


def decode(entry: Entry) -> res.Rollout:
    """A stored rollout, with its etag and (once committed) its commit revision."""
    rollout = records.decode(entry, res.Rollout)
    if rollout.state == COMMITTED and not rollout.commit_revision:
        rollout.commit_revision = entry.mod_revision
    return rollout


def encode(rollout: res.Rollout, *, keep_commit_revision: bool = False) -> bytes:
    """The stored form of a rollout: without etag and commit revision (both derived).

    Not ``records.encode``: a rollout's ``state`` is its own, not derived from pointers. A
    committed record written again (the guard's verdict: ``keep_commit_revision``) stores its
    commit revision, which its ``mod_revision`` no longer is.
    """
    stored = res.Rollout()
    stored.CopyFrom(rollout)
    stored.ClearField("etag")
    if not keep_commit_revision:
        stored.ClearField("commit_revision")  # the record's mod_revision (see module docstring)
    return stored.SerializeToString(deterministic=True)


def start(
    model_id: str,
    stage: str,
    old: res.StagePointer,
    target: int,
    policy: res.RolloutPolicy,
    regions: Sequence[str],
    *,
    actor: str,
    reason: str,
    hotfix: bool,
    now: timestamp_pb2.Timestamp,
) -> tuple[res.StagePointer, res.Rollout]:
    """The pointer and the record of a promotion's rollout starting (pure).

    ``regions`` are the deployment's; the policy's own list wins when it names any.
    """
    rollout_id = old.rollout_count + 1
    name = names.rollout_name(model_id, stage, rollout_id)
    policy = resolved_policy(policy)
    pointer = res.StagePointer()
    pointer.CopyFrom(old)
    pointer.ClearField("etag")
    pointer.name = names.stage_name(model_id, stage)
    pointer.pending_rollout = name
    pointer.pending_version = target
    pointer.rollout_count = rollout_id
    rollout = res.Rollout(
        name=name,
        kind=res.ROLLOUT_KIND_PROMOTE,
        state=PREPARING,
        target_version=target,
        from_version=old.version,
        regions=list(policy.regions) or list(regions),
        policy=policy,
        create_time=now,
        deadline=_plus(now, policy.prepare_deadline),
        actor=actor,
        reason=reason,
        hotfix=hotfix,
    )
    return pointer, rollout


def emergency(
    model_id: str,
    stage: str,
    old: res.StagePointer,
    new: res.StagePointer,
    policy: res.RolloutPolicy,
    regions: Sequence[str],
    *,
    actor: str,
    reason: str,
    now: timestamp_pb2.Timestamp,
) -> res.Rollout:
    """The record of an emergency rollback, COMMITTED at once; names it on ``new`` (pure).

    ``new`` is the rolled-back pointer: it gets the rollout's number and name and an
    activation time of now (nodes switch on receipt).
    """
    rollout_id = old.rollout_count + 1
    name = names.rollout_name(model_id, stage, rollout_id)
    new.rollout_count = rollout_id
    new.rollout = name
    new.activation_time.CopyFrom(now)
    policy = resolved_policy(policy)
    return res.Rollout(
        name=name,
        kind=res.ROLLOUT_KIND_ROLLBACK,
        state=COMMITTED,
        done=True,
        target_version=new.version,
        from_version=old.version,
        regions=list(policy.regions) or list(regions),
        policy=policy,
        create_time=now,
        activation_time=now,
        end_time=now,
        actor=actor,
        reason=reason,
    )


def aborted(rollout: res.Rollout, reason: str, now: timestamp_pb2.Timestamp, *,
            cancelled_by: str = "") -> res.Rollout:
    """``rollout`` ABORTED, for ``reason`` (pure)."""
    out = res.Rollout()
    out.CopyFrom(rollout)
    out.ClearField("etag")
    out.state = ABORTED
    out.done = True
    out.abort_reason = reason
    out.cancelled_by = cancelled_by
    out.end_time.CopyFrom(now)
    return out


def abort_audit(rollout: res.Rollout, reason: str) -> res.AuditEvent:
    """The ABORT_ROLLOUT event of ``rollout``."""
    model_id, stage, _ = names.parse_rollout("name", rollout.name)
    return res.AuditEvent(
        action=res.AUDIT_ACTION_ABORT_ROLLOUT,
        resource=rollout.name,
        model=model_id,
        stage=stage,
        from_value=str(rollout.from_version or ""),
        to_value=str(rollout.target_version),
        reason=reason,
        hotfix=rollout.hotfix,
        rollout=rollout.name,
    )


async def supersede(
    r: Reader, pointer: res.StagePointer, reason: str
) -> tuple[res.Rollout, list[Write]] | None:
    """The rollout preparing on ``pointer``, aborted for ``reason``, and its write; or None.

    For a move that replaces the rollout (an emergency rollback): the move itself clears the
    pointer's pending fields. The read is guarded like every read of the decision.
    """
    if not pointer.pending_rollout:
        return None
    model_id, stage, rollout_id = names.parse_rollout("name", pointer.pending_rollout)
    key = keys.rollout(model_id, stage, rollout_id)
    entry = await r.get(key)
    if entry is None:
        return None
    rollout = decode(entry)
    if rollout.state != PREPARING:
        return None
    done = aborted(rollout, reason, r.now)
    return done, [Put(key, encode(done))]


class Rollouts(Operations):
    """Reads, cancels and (for the coordinator) drives the rollouts of governed stages."""

    async def get(self, req: rs.GetRolloutRequest) -> rs.GetRolloutResponse:
        """Reads one rollout, fresh."""
        key = _key(req.name)
        snap = await self._store.read([key], fresh=True)
        entry = snap.get(key)
        if entry is None:
            raise NotFoundError(req.name)
        return rs.GetRolloutResponse(rollout=decode(entry), revision=snap.revision)

    async def list(self, req: rs.ListRolloutsRequest) -> rs.ListRolloutsResponse:
        """The rollouts of one stage, newest first."""
        model_id, stage = names.parse_stage("parent", req.parent)
        v = validation.Violations()
        size = validation.page_size(v, req.page_size)
        v.raise_if_any()
        prefix = keys.rollouts_prefix(model_id, stage)
        page = await records.list_page(
            self._store, prefix, keys.prefix_end(prefix), page_size=size, token=req.page_token,
            reverse=True,
        )
        return rs.ListRolloutsResponse(
            rollouts=[decode(e) for e in page.entries],
            next_page_token=page.next_token,
            revision=page.revision,
        )

    async def watch(
        self, req: rs.WatchRolloutRequest, *, interval: float = WATCH_INTERVAL
    ) -> AsyncIterator[rs.WatchRolloutResponse]:
        """The rollout now, then at every change of its record, until it is done.

        Polls the record (one fresh single-key read every ``interval`` seconds) rather than
        following etcd's watch: the stage hub follows stage pointers only, and readiness
        updates change the record alone. A record that vanishes (its model deleted) ends the
        stream with NOT_FOUND.
        """
        get = rs.GetRolloutRequest(name=req.name)
        last = ""
        while True:
            now = await self.get(get)
            if now.rollout.etag != last:
                last = now.rollout.etag
                yield rs.WatchRolloutResponse(rollout=now.rollout, revision=now.revision)
            if now.rollout.done:
                return
            await asyncio.sleep(interval)

    async def cancel(self, call: Call, req: rs.CancelRolloutRequest) -> rs.CancelRolloutResponse:
        """Aborts a rollout still preparing, for the operator's reason (required)."""
        _key(req.name)
        v = validation.Violations()
        v.check(bool(req.reason.strip()), "reason", "is required: say why the rollout stops")
        validation.text(v, "reason", req.reason, validation.MAX_REASON)
        validation.request_id(v, req.request_id)
        v.raise_if_any()
        decide = self._abort_decision(req.name, req.reason, cancelled_by=call.actor)

        async def plan(r: Reader) -> Plan:
            made = await decide(r)
            assert isinstance(made.response, rs.GetRolloutResponse)
            made.response = rs.CancelRolloutResponse(rollout=made.response.rollout)
            return made

        return await self._mutate(call, plan, rs.CancelRolloutResponse)

    async def preparing(self) -> Preparing:
        """Every rollout still preparing, read fresh, each with its record's mod_revision.

        Found through the stage pointers (a preparing rollout is always named by its pointer's
        ``pending_rollout``: both are written in one transaction), so the cost follows the
        number of stages, not of rollouts ever made.
        """
        page = await self._store.scan(keys.STAGES_START, keys.STAGES_END, limit=0)
        pending = (res.StagePointer.FromString(e.value).pending_rollout for e in page.entries)
        wanted = [_key(name) for name in pending if name]
        if not wanted:
            return []
        snap = await self._store.read(wanted, fresh=True)
        found = ((decode(e), e.mod_revision) for e in map(snap.get, wanted) if e is not None)
        return [(rollout, revision) for rollout, revision in found if rollout.state == PREPARING]

    async def record_readiness(
        self, name: str, readiness: Sequence[res.RegionReadiness]
    ) -> res.Rollout | None:
        """Records the regions' readiness on a preparing rollout (no audit event).

        A guarded write of the record alone, retried on a concurrent change; None if the
        rollout is no longer PREPARING (committed or aborted meanwhile).
        """
        key = _key(name)
        snap = await self._store.read([key], fresh=True)
        for _ in range(RECORD_ATTEMPTS):
            current = snap.get(key)
            if current is None:
                raise NotFoundError(name)
            rollout = decode(current)
            if rollout.state != PREPARING:
                return None
            rollout.ClearField("readiness")
            rollout.readiness.extend(readiness)
            result = await self._store.commit(
                [Unchanged(key, current.mod_revision)], [Put(key, encode(rollout))],
                refresh=[key])
            if result.succeeded:
                rollout.etag = f'"{result.revision}"'
                return rollout
            assert result.fresh is not None
            snap = result.fresh
        raise ContentionError(
            f"gave up after {RECORD_ATTEMPTS} attempts: {name} kept changing while its "
            "readiness was recorded")

    async def commit(self, name: str, *, actor: str) -> res.Rollout:
        """Commits a preparing rollout: the pointer moves, nodes switch at activation time.

        The lifecycle rules are checked again on what the stage holds now; if they refuse the
        move, the rollout is aborted with their reason instead (the returned rollout says
        which). ``actor`` (the coordinator) is the audit event's actor; the pointer and its
        history name who started the rollout.

        Raises:
            RolloutDoneError: The rollout is no longer PREPARING.
            NotFoundError: No such rollout.

        """
        model_id, stage, rollout_id = names.parse_rollout("name", name)
        key = keys.rollout(model_id, stage, rollout_id)
        stage_key = keys.stage(model_id, stage)

        async def decide(r: Reader) -> Plan:
            await r.get_many([key, stage_key, keys.model(model_id)])
            rollout = await _preparing(r, key, name)
            pointer = moves.pointer(await r.get(stage_key), model_id, stage)
            if pointer.pending_rollout != name:
                return _abort_plan(r, key, rollout, pointer, "the stage no longer names this "
                                   "rollout as pending", "")
            try:
                promotion = await moves.promotion(
                    r, model_id, stage, rollout.target_version, hotfix=rollout.hotfix,
                    reason=rollout.reason, actor=rollout.actor)
            except (FailedPreconditionError, NotFoundError, InvalidArgumentError) as err:
                return _abort_plan(r, key, rollout, pointer,
                                   f"the move was refused at commit: {err.message}", "")
            move = promotion.move
            move.pointer.rollout = name
            activation = _plus(r.now, resolved_policy(rollout.policy).activation_margin)
            move.pointer.activation_time.CopyFrom(activation)
            done = res.Rollout()
            done.CopyFrom(rollout)
            done.ClearField("etag")
            done.state, done.done = COMMITTED, True
            done.activation_time.CopyFrom(activation)
            done.end_time.CopyFrom(r.now)
            writes = [*promotion.writes(model_id, stage), Put(key, encode(done))]
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_PROMOTE,
                resource=names.stage_name(model_id, stage),
                model=model_id,
                stage=stage,
                from_value=str(move.from_version or ""),
                to_value=str(rollout.target_version),
                reason=rollout.reason,
                hotfix=rollout.hotfix,
                rollout=name,
            )
            return Plan(writes, audit, rs.GetRolloutResponse(rollout=done))

        call = Call(actor=actor, method=COORDINATOR_METHOD, request=rs.GetRolloutRequest(name=name))
        resp = await self._mutate(call, decide, rs.GetRolloutResponse)
        if resp.rollout.state == COMMITTED:
            resp.rollout.commit_revision = resp.revision
        return resp.rollout

    async def abort(self, name: str, reason: str, *, actor: str) -> res.Rollout:
        """Aborts a preparing rollout for ``reason`` (the coordinator's: deadline, failures).

        Raises:
            RolloutDoneError: The rollout is no longer PREPARING.
            NotFoundError: No such rollout.

        """
        call = Call(actor=actor, method=COORDINATOR_METHOD, request=rs.GetRolloutRequest(name=name))
        resp = await self._mutate(call, self._abort_decision(name, reason),
                                  rs.GetRolloutResponse)
        return resp.rollout

    def _abort_decision(self, name: str, reason: str, *, cancelled_by: str = "") -> Decide:
        model_id, stage, rollout_id = names.parse_rollout("name", name)
        key = keys.rollout(model_id, stage, rollout_id)
        stage_key = keys.stage(model_id, stage)

        async def decide(r: Reader) -> Plan:
            await r.get_many([key, stage_key])
            rollout = await _preparing(r, key, name)
            pointer = moves.pointer(await r.get(stage_key), model_id, stage)
            return _abort_plan(r, key, rollout, pointer, reason, cancelled_by)

        return decide


def _key(name: str) -> str:
    model_id, stage, rollout_id = names.parse_rollout("name", name)
    return keys.rollout(model_id, stage, rollout_id)


async def _preparing(r: Reader, key: str, name: str) -> res.Rollout:
    entry = await r.get(key)
    if entry is None:
        raise NotFoundError(name)
    rollout = decode(entry)
    if rollout.state != PREPARING:
        raise RolloutDoneError(name, state_name(rollout.state))
    return rollout


def _abort_plan(r: Reader, key: str, rollout: res.Rollout, pointer: res.StagePointer,
                reason: str, cancelled_by: str) -> Plan:
    """The abort of ``rollout``: record ABORTED, the pointer's pending fields cleared."""
    done = aborted(rollout, reason, r.now, cancelled_by=cancelled_by)
    writes: list[Write] = [Put(key, encode(done))]
    if pointer.pending_rollout == rollout.name:
        cleared = res.StagePointer()
        cleared.CopyFrom(pointer)
        cleared.ClearField("pending_rollout")
        cleared.ClearField("pending_version")
        writes.append(Put(keys.stage(*names.parse_stage("name", pointer.name)),
                          records.encode(cleared)))
    return Plan(writes, abort_audit(rollout, reason), rs.GetRolloutResponse(rollout=done))

