"""Break glass: an operator pins a stage in one region to a known-good version.

With the primary unreachable nothing can commit there, yet a region serving a bad model needs
a way out. A region's own server writes a **pin** to its own etcd only (``pins/{model}/
{stage}``, a region-local key, :class:`~modelreg.server.domain.ports.LocalStore`), with a
region-local audit event (``localaudit/{id}``) in the same compare-and-swap Txn. From then on
the region serves the pinned version: its GetStage, ListStages and WatchStages show the
pointer with ``version`` = the pin's and ``local_pin`` describing it (:func:`overlay`), until
an operator clears it, whatever the primary's pointer does meanwhile. Other regions never see
it.

**Which version.** As a rollback would decide it (``lifecycle.rollback``), from the region's
replica read fresh: the pointer's rollback candidates, their deprecation and the fleet's
outcome records (replicated like every primary key), or a named former version. Pinning a
pinned stage again starts from the pinned version. The replica's keys are the replicator's to
write, so the pin's Txn cannot guard them: a pin is an override of whatever the primary says,
decided on what the region knew.

**Never silently dropped.** Each local event is reported to the primary (``report``, called
through the primary's servers by :mod:`modelreg.server.pin_reporter`) as soon as one answers:
the primary writes it into its own audit log under the same id (``audit/{id}``), keeping its
actor, time and region, in a Txn guarded on that key being absent, so it is recorded once
however often it is sent (a second report gets ALREADY_EXISTS: it arrived). The region marks
the event reported once it has replicated the primary's copy, so a listing of the region's
audit log always shows it exactly once: the local copy until then (``local_events``), the
primary's after. The pin stays in force until cleared, reported or not.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

from modelreg.server.domain import keys, lifecycle, moves, names, records, validation
from modelreg.server.domain.errors import (
    AlreadyExistsError,
    ContentionError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.server.domain.pin_view import overlay, stored_pin
from modelreg.server.domain.ports import LocalChange, LocalStore, ModelStore, Put
from modelreg.server.domain.regions import PREFIX as REGION_PREFIX
from modelreg.server.domain.regions import Regions
from modelreg.server.domain.stages import fleet_record
from modelreg.server.domain.transaction import Call, Operations, Plan, Reader, now_timestamp
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import store_pb2
from modelreg.v1.errors_pb2 import ErrorReason

ATTEMPTS = 10
"""Decisions per pin or unpin before giving up (each after losing the pin record's CAS)."""
EVENT_ID = re.compile(r"[0-9]{20}-[0-9a-f]{8}")
"""The id of an audit event (``auditEvents/{id}``): the region's and the primary's alike."""
BREAK_GLASS = (res.AUDIT_ACTION_BREAK_GLASS_PIN, res.AUDIT_ACTION_BREAK_GLASS_UNPIN)


def _single(key: str) -> tuple[str, str]:
    return key, key + "\0"


def event_id(name: str) -> str:
    """The id of ``auditEvents/{id}``; InvalidArgumentError if it is none."""
    event = name.removeprefix("auditEvents/")
    if not name.startswith("auditEvents/") or not EVENT_ID.fullmatch(event):
        raise InvalidArgumentError.field(
            "audit_event.name", "must be auditEvents/{20 digits}-{8 hex digits}")
    return event


class Pins(Operations):
    """Break glass in this server's region (``pin``, ``unpin``), and the primary's ``report``."""

    def __init__(
        self,
        store: ModelStore,
        local: LocalStore | None,
        regions: Regions,
        clock: Callable[[], int] = time.time_ns,
        *,
        changed: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(store, clock)
        self._local = local
        self._topology = regions
        self._changed = changed
        """Called after each local change: the reporter reports it now rather than later."""

    # -- in a region --------------------------------------------------------------------

    def _admit(self, region: str, reason: str, request_id: str) -> LocalStore:
        """The checks every break-glass call makes before it reads anything."""
        v = validation.Violations()
        v.check(bool(reason.strip()), "reason", "is required: break glass is audited")
        validation.text(v, "reason", reason, validation.MAX_REASON)
        validation.request_id(v, request_id)
        v.check(bool(region), "region",
                "is required: regions/{region}, the region of the server you ask")
        v.raise_if_any()
        self._topology.check_own(region, "region")
        own = self._topology.own
        if self._local is None:
            why = ("it is the primary region, where every change commits: use RollbackStage"
                   if own.primary else "this server reads no region-local store of its own "
                   "(--region-reads direct)")
            raise FailedPreconditionError(
                ErrorReason.NOT_A_REGIONAL_SERVER,
                f"break glass pins a stage in a region outside the primary; regions/{own.name}: "
                f"{why}", region=REGION_PREFIX + own.name)
        return self._local

    def _event(self, action: res.AuditAction.ValueType, call: Call, name: str, reason: str,
               now_ns: int, applied: int) -> tuple[str, res.AuditEvent]:
        """A new region-local audit event and its key."""
        key = keys.local_audit(now_ns, random.getrandbits(32))
        model_id, stage = names.parse_stage("name", name)
        event = res.AuditEvent(
            name="auditEvents/" + key.removeprefix(keys.LOCAL_AUDIT_START), action=action,
            actor=call.actor, resource=name, model=model_id, stage=stage, reason=reason,
            request_id=call.request_id, time=now_timestamp(now_ns), revision=applied,
            region=REGION_PREFIX + self._topology.own.name)
        return key, event

    async def _local_event(self, local: LocalStore, name: str) -> res.AuditEvent:
        key = keys.LOCAL_AUDIT_START + name.removeprefix("auditEvents/")
        read = await local.read_local(*_single(key))
        if not read.entries or read.entries[0].value is None:
            return res.AuditEvent(name=name)
        return store_pb2.StoredLocalEvent.FromString(read.entries[0].value).event

    async def pin(self, call: Call, req: rs.PinStageRequest) -> rs.PinStageResponse:
        """Pins a stage in this region (see the module docstring)."""
        model_id, stage = names.parse_stage("name", req.name)
        if req.to_version < 0:
            raise InvalidArgumentError.field("to_version",
                                             "must be 0 (last known-good) or positive")
        if req.allow_unserved and not req.to_version:
            raise InvalidArgumentError.field(
                "allow_unserved", "applies to a named to_version only: name the version to force")
        local = self._admit(req.region, req.reason, req.request_id)
        pin_key, stage_key = keys.pin(model_id, stage), keys.stage(model_id, stage)
        for _ in range(ATTEMPTS):
            record = await local.read_local(*_single(pin_key))
            raw = record.entries[0].value if record.entries else None
            stored = stored_pin(raw)
            r = Reader(self._store, fresh=True, now_ns=self._clock())
            model_entry, entry = await r.get_many([keys.model(model_id), stage_key])
            if model_entry is None:
                raise NotFoundError(names.model_name(model_id))
            lifecycle.check_stage_declared(
                records.decode(model_entry, res.RegisteredModel), stage, "name")
            pointer = moves.pointer(entry, model_id, stage)
            if stored is not None and not stored.cleared and req.request_id \
                    and stored.request_id == req.request_id:
                event = await self._local_event(local, stored.event)
                return rs.PinStageResponse(stage=overlay(pointer, stored.pin), audit_event=event,
                                           revision=stored.changed_at)
            base = res.StagePointer()
            base.CopyFrom(pointer)
            pinned = stored.pin.version if stored is not None and not stored.cleared else 0
            if pinned:  # a pinned stage moves on from the pinned version
                base.version = pinned
                del base.rollback_candidates[:]
                base.rollback_candidates.extend(
                    c for c in pointer.rollback_candidates if c != pinned)
            candidates = list(base.rollback_candidates)
            versions = await r.get_many([keys.version(model_id, c) for c in candidates])
            deprecated = {
                c for c, e in zip(candidates, versions, strict=True)
                if e is None or res.ModelVersion.FromString(e.value).HasField("sunset_time")}
            fleet = await fleet_record(r, model_id, stage, [base.version, *candidates])
            move = lifecycle.rollback(
                model_id, stage, base, req.to_version, deprecated=deprecated, fleet=fleet,
                allow_unserved=req.allow_unserved, reason=req.reason, actor=call.actor,
                now=r.now)
            applied = (await self._store.read([], fresh=True)).revision
            now_ns = r.now.ToNanoseconds()
            event_key, event = self._event(res.AUDIT_ACTION_BREAK_GLASS_PIN, call, req.name,
                                           req.reason, now_ns, applied)
            event.from_value = str(base.version or "")
            event.to_value = str(move.pointer.version)
            event.skipped.extend(move.skipped)
            event.forced = move.forced
            pin = res.LocalPin(
                region=event.region, version=move.pointer.version,
                overridden_version=pointer.version, reason=req.reason, actor=call.actor,
                pin_time=r.now, applied_revision=applied, audit_event=event.name)
            new = store_pb2.StoredPin(pin=pin, changed_at=applied, request_id=req.request_id,
                                      event=event.name)
            done = await local.commit_local(
                {pin_key: raw, event_key: None},
                [Put(pin_key, new.SerializeToString(deterministic=True)),
                 Put(event_key, store_pb2.StoredLocalEvent(event=event).SerializeToString())])
            if done is not None:
                self._changed()
                return rs.PinStageResponse(stage=overlay(pointer, pin), skipped=move.skipped,
                                           audit_event=event, revision=applied)
        raise ContentionError(f"gave up after {ATTEMPTS} attempts: the pin of {req.name} kept "
                              "changing; retry")

    async def unpin(self, call: Call, req: rs.UnpinStageRequest) -> rs.UnpinStageResponse:
        """Clears this region's pin of a stage: it follows the primary's pointer again."""
        model_id, stage = names.parse_stage("name", req.name)
        local = self._admit(req.region, req.reason, req.request_id)
        pin_key = keys.pin(model_id, stage)
        for _ in range(ATTEMPTS):
            record = await local.read_local(*_single(pin_key))
            raw = record.entries[0].value if record.entries else None
            stored = stored_pin(raw)
            snap = await self._store.read([keys.stage(model_id, stage)], fresh=True)
            pointer = moves.pointer(snap.get(keys.stage(model_id, stage)), model_id, stage)
            if stored is not None and stored.cleared and req.request_id \
                    and stored.request_id == req.request_id:
                event = await self._local_event(local, stored.event)
                return rs.UnpinStageResponse(stage=pointer, cleared_pin=stored.pin,
                                             audit_event=event, revision=stored.changed_at)
            if stored is None or stored.cleared:
                raise FailedPreconditionError(
                    ErrorReason.STAGE_NOT_PINNED,
                    f"{req.name} is not pinned in regions/{self._topology.own.name}: it follows "
                    "the primary's pointer", region=REGION_PREFIX + self._topology.own.name)
            now_ns = self._clock()
            event_key, event = self._event(res.AUDIT_ACTION_BREAK_GLASS_UNPIN, call, req.name,
                                           req.reason, now_ns, snap.revision)
            event.from_value = str(stored.pin.version)
            event.to_value = str(pointer.version or "")
            new = store_pb2.StoredPin()
            new.CopyFrom(stored)
            new.cleared, new.changed_at = True, snap.revision
            new.request_id, new.event = req.request_id, event.name
            done = await local.commit_local(
                {pin_key: raw, event_key: None},
                [Put(pin_key, new.SerializeToString(deterministic=True)),
                 Put(event_key, store_pb2.StoredLocalEvent(event=event).SerializeToString())])
            if done is not None:
                self._changed()
                return rs.UnpinStageResponse(stage=pointer, cleared_pin=stored.pin,
                                             audit_event=event, revision=snap.revision)
        raise ContentionError(f"gave up after {ATTEMPTS} attempts: the pin of {req.name} kept "
                              "changing; retry")

    # -- reporting ----------------------------------------------------------------------

    async def unreported(self) -> list[LocalChange]:
        """This region's audit events the primary has not recorded yet, oldest first."""
        if self._local is None:
            return []
        read = await self._local.read_local(keys.LOCAL_AUDIT_START, keys.LOCAL_AUDIT_END)
        return [e for e in read.entries if e.value is not None
                and not store_pb2.StoredLocalEvent.FromString(e.value).reported]

    async def mark_reported(self, entry: LocalChange, recorded: res.AuditEvent) -> None:
        """Marks a local event (and its pin, if it is the pin's) as recorded by the primary.

        The caller has waited until the region holds the primary's copy. A lost CAS means
        another server of the region marked it first, or the pin changed: nothing to redo.
        """
        assert self._local is not None
        assert entry.value is not None
        stored = store_pb2.StoredLocalEvent.FromString(entry.value)
        stored.reported = True
        stored.event.report_time.CopyFrom(recorded.report_time)
        await self._local.commit_local({entry.key: entry.value},
                                       [Put(entry.key, stored.SerializeToString())])
        pin_key = keys.pin(stored.event.model, stored.event.stage)
        record = await self._local.read_local(*_single(pin_key))
        raw = record.entries[0].value if record.entries else None
        pin = stored_pin(raw)
        if pin is not None and pin.pin.audit_event == stored.event.name and not pin.pin.reported:
            pin.pin.reported = True
            await self._local.commit_local(
                {pin_key: raw}, [Put(pin_key, pin.SerializeToString(deterministic=True))])

    async def local_events(self) -> list[res.AuditEvent]:
        """This region's audit events not yet in the primary's log (what listings add)."""
        events = []
        for entry in await self.unreported():
            assert entry.value is not None
            events.append(store_pb2.StoredLocalEvent.FromString(entry.value).event)
        return events

    # -- on the primary -----------------------------------------------------------------

    async def report(
        self, call: Call, req: rs.ReportBreakGlassRequest
    ) -> rs.ReportBreakGlassResponse:
        """Records a region's break-glass event in this (the primary's) audit log, once."""
        event = req.audit_event
        audit_key = keys.AUDIT_START + event_id(event.name)
        v = validation.Violations()
        v.check(event.action in BREAK_GLASS, "audit_event.action",
                "must be AUDIT_ACTION_BREAK_GLASS_PIN or AUDIT_ACTION_BREAK_GLASS_UNPIN")
        v.check(self._topology.known(event.region) and event.region != REGION_PREFIX
                + self._topology.primary.name, "audit_event.region",
                "must be regions/{region}, a region of the topology other than the primary")
        v.check(bool(event.actor) and len(event.actor) <= validation.MAX_ACTOR,
                "audit_event.actor", f"must be 1-{validation.MAX_ACTOR} characters")
        validation.text(v, "audit_event.reason", event.reason, validation.MAX_REASON)
        v.check(event.HasField("time"), "audit_event.time", "is required")
        if event.HasField("time"):
            validation.timestamp(v, "audit_event.time", event.time)
        v.raise_if_any()
        model_id, stage = names.parse_stage("audit_event.resource", event.resource)
        if (event.model, event.stage) != (model_id, stage):
            raise InvalidArgumentError.field("audit_event.model",
                                             "model and stage must be those of the resource")

        async def decide(r: Reader) -> Plan:
            if await r.get(audit_key) is not None:
                raise AlreadyExistsError(event.name)
            recorded = res.AuditEvent()
            recorded.CopyFrom(event)
            recorded.ClearField("revision")
            recorded.report_time.CopyFrom(r.now)
            return Plan([], recorded, rs.ReportBreakGlassResponse(audit_event=recorded),
                        audit_key=audit_key)

        resp = await self._mutate(call, decide, rs.ReportBreakGlassResponse)
        resp.audit_event.revision = resp.revision
        return resp
