"""What a pointer move reads and writes, shared by a promotion and a rollout's commit.

A promotion on an ungoverned stage and the commit of a rollout on a governed one move the
pointer the same way: the same reads (the model, the pointer, the version, the pointers the
lifecycle rules depend on), the same rules (``lifecycle.promote``, checked again at commit)
and the same writes (pointer, history entry, a settled back-fill flag). Only when they happen
differs, so both build on ``promotion`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from modelreg.server.domain import keys, lifecycle, names, records
from modelreg.server.domain.errors import NotFoundError
from modelreg.server.domain.ports import Entry, Put, Write
from modelreg.server.domain.transaction import Reader
from modelreg.v1 import resources_pb2 as res


def pointer(entry: Entry | None, model_id: str, stage: str) -> res.StagePointer:
    """The stored pointer, or an empty one (version 0, etag ``"0"``) for a stage never used."""
    if entry is None:
        return res.StagePointer(name=names.stage_name(model_id, stage), etag='"0"')
    return records.decode(entry, res.StagePointer)


def move_writes(model_id: str, stage: str, move: lifecycle.Move) -> list[Write]:
    """What every pointer move writes: the pointer, and its history entry under its generation."""
    return [
        Put(keys.stage(model_id, stage), records.encode(move.pointer)),
        Put(keys.history(model_id, stage, move.pointer.generation), records.encode(move.history)),
    ]


async def model(r: Reader, model_id: str) -> res.RegisteredModel:
    """The model, or NotFoundError."""
    entry = await r.get(keys.model(model_id))
    if entry is None:
        raise NotFoundError(names.model_name(model_id))
    return records.decode(entry, res.RegisteredModel)


@dataclass
class Promotion:
    """A decided promotion: the move, and what else it settles."""

    model: res.RegisteredModel
    old: res.StagePointer
    """The pointer before the move (its etag from the read)."""
    move: lifecycle.Move
    extra: list[Write] = field(default_factory=list)
    """Writes beyond the move's own: the production pointer whose back-fill a staging
    promotion settles."""

    def writes(self, model_id: str, stage: str) -> list[Write]:
        """The move's writes (from ``move.pointer`` as it is now) and the extra ones."""
        return [*move_writes(model_id, stage, self.move), *self.extra]


async def promotion(
    r: Reader,
    model_id: str,
    stage: str,
    version: int,
    *,
    hotfix: bool,
    reason: str,
    actor: str,
    etag: str = "",
    check: Callable[[res.StagePointer], None] | None = None,
) -> Promotion:
    """Reads what a promotion of ``version`` to ``stage`` depends on and decides it.

    Raises what the rules raise (``lifecycle.promote``), NotFoundError for a missing model or
    version, and EtagMismatchError for a stale ``etag`` of the pointer. ``check`` sees the
    pointer before the rules do (a promotion refuses a stage with a rollout preparing first).
    """
    stage_key = keys.stage(model_id, stage)
    version_key = keys.version(model_id, version)
    staging_key = keys.stage(model_id, lifecycle.STAGING)
    production_key = keys.stage(model_id, lifecycle.PRODUCTION)
    # Read only what this move's rules need, all in one round trip on a cold cache:
    # production depends on staging, staging may settle production's back-fill.
    related = {lifecycle.PRODUCTION: [staging_key], lifecycle.STAGING: [production_key]}
    await r.get_many([keys.model(model_id), stage_key, version_key, *related.get(stage, [])])
    found = await model(r, model_id)
    lifecycle.check_stage_declared(found, stage, "name")
    version_entry = await r.get(version_key)
    if version_entry is None:
        raise NotFoundError(names.version_name(model_id, version))
    pointer_entry = await r.get(stage_key)
    records.check_etag(etag, names.stage_name(model_id, stage), pointer_entry)
    staging = (pointer(await r.get(staging_key), model_id, lifecycle.STAGING)
               if stage == lifecycle.PRODUCTION else None)
    old = pointer(pointer_entry, model_id, stage)
    if check is not None:
        check(old)
    move = lifecycle.promote(
        model_id,
        stage,
        old,
        records.decode(version_entry, res.ModelVersion),
        staging,
        hotfix=hotfix,
        reason=reason,
        actor=actor,
        now=r.now,
    )
    extra: list[Write] = []
    if stage == lifecycle.STAGING:
        production = pointer(await r.get(production_key), model_id, lifecycle.PRODUCTION)
        cleared = lifecycle.clear_backfill(production, version)
        if cleared is not None:
            extra.append(Put(production_key, records.encode(cleared)))
    return Promotion(found, old, move, extra)
