"""The lifecycle rules, as pure functions of the state read: no I/O, easy to test alone.

Stages are pointers; a version's state is derived from them:

* ``production`` pointer names it → PRODUCTION; ``staging`` names it → STAGING;
* it has a sunset time → DEPRECATED;
* it left production before (``former_versions`` of the production pointer) → ARCHIVED;
* otherwise REGISTERED.

Promotion to production requires the version to be the one in staging, unless it takes the
hotfix path (reason required; flagged back-fill required until the version reaches staging).
It archives the previous production version in the same transaction: the new pointer value
records it as a former version and first rollback candidate. Rollback returns to the most
recent known-good former version (or a named one among them); the version rolled away from is
never a candidate again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from modelreg.server.domain import names
from modelreg.server.domain.errors import FailedPreconditionError, InvalidArgumentError
from modelreg.server.domain.validation import BUILTIN_STAGES
from modelreg.v1 import resources_pb2

STAGING, PRODUCTION = BUILTIN_STAGES
MAX_CANDIDATES = 32
"""Rollback candidates kept per pointer; older ones drop off (history keeps every move)."""

VS = resources_pb2.VersionState


def derive_state(
    mv: resources_pb2.ModelVersion, pointers: Mapping[str, resources_pb2.StagePointer]
) -> tuple[resources_pb2.VersionState.ValueType, list[str]]:
    """The state of a version and the stages whose pointers name it."""
    stages = sorted(stage for stage, p in pointers.items() if p.version == mv.version)
    production = pointers.get(PRODUCTION)
    if PRODUCTION in stages:
        state = VS.VERSION_STATE_PRODUCTION
    elif STAGING in stages:
        state = VS.VERSION_STATE_STAGING
    elif mv.HasField("sunset_time"):
        state = VS.VERSION_STATE_DEPRECATED
    elif production is not None and mv.version in production.former_versions:
        state = VS.VERSION_STATE_ARCHIVED
    else:
        state = VS.VERSION_STATE_REGISTERED
    return state, stages


def check_stage_declared(model: resources_pb2.RegisteredModel, stage: str, field: str) -> None:
    """Refuses stages neither built in nor declared: a typo never makes an unwatched pointer."""
    if stage not in BUILTIN_STAGES and stage not in model.custom_stages:
        declared = ", ".join([*BUILTIN_STAGES, *model.custom_stages])
        raise InvalidArgumentError.field(
            field,
            f"unknown stage {stage!r} for {model.name}; its stages are: {declared} "
            "(declare custom stages with UpdateModel custom_stages)",
        )


@dataclass(frozen=True)
class Move:
    """A decided pointer move."""

    pointer: resources_pb2.StagePointer
    history: resources_pb2.PointerHistoryEntry
    from_version: int


def _without(items: Sequence[int], *drop: int) -> list[int]:
    return [i for i in items if i not in drop]


def _move(
    old: resources_pb2.StagePointer,
    model_id: str,
    stage: str,
    to_version: int,
    candidates: list[int],
    kind: resources_pb2.PointerMoveKind.ValueType,
    *,
    actor: str,
    reason: str,
    now: timestamp_pb2.Timestamp,
    hotfix: bool = False,
    backfill_required: bool = False,
) -> Move:
    former = list(old.former_versions)
    if old.version and old.version not in former:
        former.append(old.version)
    pointer = resources_pb2.StagePointer(
        name=names.stage_name(model_id, stage),
        version=to_version,
        previous_version=old.version,
        rollback_candidates=candidates[:MAX_CANDIDATES],
        former_versions=former,
        generation=old.generation + 1,
        hotfix=hotfix,
        backfill_required=backfill_required,
        reason=reason,
        updated_by=actor,
        update_time=now,
        last_move=kind,
    )
    history = resources_pb2.PointerHistoryEntry(
        name=f"{pointer.name}/history/{pointer.generation}",
        generation=pointer.generation,
        kind=kind,
        from_version=old.version,
        to_version=to_version,
        hotfix=hotfix,
        reason=reason,
        actor=actor,
        time=now,
    )
    return Move(pointer, history, old.version)


def promote(
    model_id: str,
    stage: str,
    old: resources_pb2.StagePointer,
    mv: resources_pb2.ModelVersion,
    staging: resources_pb2.StagePointer | None,
    *,
    hotfix: bool,
    reason: str,
    actor: str,
    now: timestamp_pb2.Timestamp,
) -> Move:
    """Decides a promotion of ``mv`` to ``stage`` whose pointer is ``old`` (empty if none)."""
    if mv.HasField("sunset_time"):
        raise FailedPreconditionError(
            "VERSION_DEPRECATED",
            f"{mv.name} is deprecated (it has a sunset time) and cannot be promoted",
        )
    if old.version == mv.version:
        raise FailedPreconditionError(
            "ALREADY_IN_STAGE", f"{old.name or stage} already points at version {mv.version}"
        )
    in_staging = staging is not None and staging.version == mv.version
    if stage == PRODUCTION and not in_staging and not hotfix:
        where = f"staging has version {staging.version}" if staging and staging.version else (
            "staging is empty"
        )
        raise FailedPreconditionError(
            "STAGING_REQUIRED",
            f"version {mv.version} is not in staging ({where}): promote it to staging first, "
            "or take the hotfix path with a reason",
            version=str(mv.version),
        )
    candidates = _without([old.version, *old.rollback_candidates] if old.version else
                          list(old.rollback_candidates), mv.version, 0)
    return _move(
        old, model_id, stage, mv.version, candidates,
        resources_pb2.POINTER_MOVE_KIND_PROMOTE,
        actor=actor, reason=reason, now=now,
        hotfix=hotfix, backfill_required=hotfix and not in_staging,
    )


def rollback(
    model_id: str,
    stage: str,
    old: resources_pb2.StagePointer,
    to_version: int,
    *,
    deprecated: Collection[int] = (),
    reason: str,
    actor: str,
    now: timestamp_pb2.Timestamp,
) -> Move:
    """Decides a rollback of ``old`` to its last known-good version, or to ``to_version``.

    The last known-good version is the most recent candidate that is not ``deprecated``; a
    deprecated version is never rolled back to, named or not.
    """
    candidates = list(old.rollback_candidates)
    usable = [c for c in candidates if c not in deprecated]
    if not usable:
        raise FailedPreconditionError(
            "NO_ROLLBACK_CANDIDATE",
            f"{names.stage_name(model_id, stage)} has no known-good former version to roll back "
            "to" + (" that is not deprecated" if candidates else ""),
        )
    target = to_version or usable[0]
    if target in deprecated:
        raise FailedPreconditionError(
            "VERSION_DEPRECATED", f"version {target} is deprecated and cannot be rolled back to"
        )
    if target not in candidates:
        raise FailedPreconditionError(
            "NOT_A_ROLLBACK_CANDIDATE",
            f"version {target} is not a known-good former version of "
            f"{names.stage_name(model_id, stage)}; candidates: "
            + ", ".join(str(c) for c in candidates),
            candidates=",".join(str(c) for c in candidates),
        )
    return _move(
        old, model_id, stage, target, _without(candidates, target, old.version),
        resources_pb2.POINTER_MOVE_KIND_ROLLBACK,
        actor=actor, reason=reason, now=now,
    )


def clear_backfill(
    production: resources_pb2.StagePointer, version: int
) -> resources_pb2.StagePointer | None:
    """The production pointer with its back-fill flag cleared, if ``version`` settles it."""
    if production.version != version or not production.backfill_required:
        return None
    cleared = resources_pb2.StagePointer()
    cleared.CopyFrom(production)
    cleared.backfill_required = False
    return cleared
