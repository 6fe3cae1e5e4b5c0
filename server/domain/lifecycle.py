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
recent known-good former version (or a named one among them): one that served in the stage, as
the fleet recorded it (``outcomes``); the version rolled away from is never a candidate again.
Clearing empties a pointer (version 0) and makes the version it named its first candidate.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from modelreg.server.domain import names
from modelreg.server.domain.errors import FailedPreconditionError, InvalidArgumentError
from modelreg.server.domain.outcomes import FleetRecord
from modelreg.server.domain.validation import BUILTIN_STAGES
from modelreg.v1 import resources_pb2
from modelreg.v1.errors_pb2 import ErrorReason

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
    skipped: tuple[resources_pb2.SkippedCandidate, ...] = ()
    """Rollbacks: candidates passed over on the way to the target, most recent first."""
    forced: bool = False
    """The move passed only because the caller overrode a safety check."""


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
        # A move ends any rollout preparing (its caller aborts or commits it in the same
        # transaction) but keeps the count that numbers the stage's rollouts.
        rollout_count=old.rollout_count,
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
            ErrorReason.VERSION_DEPRECATED,
            f"{mv.name} is deprecated (it has a sunset time) and cannot be promoted",
        )
    if old.version == mv.version:
        raise FailedPreconditionError(
            ErrorReason.ALREADY_IN_STAGE,
            f"{old.name or stage} already points at version {mv.version}",
        )
    in_staging = staging is not None and staging.version == mv.version
    if stage == PRODUCTION and not in_staging and not hotfix:
        where = f"staging has version {staging.version}" if staging and staging.version else (
            "staging is empty"
        )
        raise FailedPreconditionError(
            ErrorReason.STAGING_REQUIRED,
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


def _no_candidate(name: str, candidates: Sequence[int],
                  skipped: Sequence[resources_pb2.SkippedCandidate]) -> FailedPreconditionError:
    if not candidates:
        return FailedPreconditionError(
            ErrorReason.NO_ROLLBACK_CANDIDATE,
            f"{name} has no known-good former version to roll back to")
    why = "; ".join(f"v{s.version}: {s.detail}" for s in skipped)
    hint = ("; name one with to_version and allow_unserved (and a reason) to roll back anyway"
            if any(s.reason != resources_pb2.SKIP_REASON_DEPRECATED for s in skipped) else "")
    return FailedPreconditionError(
        ErrorReason.NO_ROLLBACK_CANDIDATE,
        f"{name} has no known-good former version to roll back to (skipped {why}){hint}",
        candidates=",".join(str(c) for c in candidates),
        skipped=",".join(f"{s.version}:{_skip_name(s.reason)}" for s in skipped),
    )


def _skip_name(reason: resources_pb2.SkipReason.ValueType) -> str:
    return resources_pb2.SkipReason.Name(reason).removeprefix("SKIP_REASON_").lower()


def rollback(
    model_id: str,
    stage: str,
    old: resources_pb2.StagePointer,
    to_version: int,
    *,
    deprecated: Collection[int] = (),
    fleet: FleetRecord | None = None,
    allow_unserved: bool = False,
    reason: str,
    actor: str,
    now: timestamp_pb2.Timestamp,
) -> Move:
    """Decides a rollback of ``old`` to its last known-good version, or to ``to_version``.

    The last known-good version is the most recent candidate that is not ``deprecated`` and,
    when the ``fleet`` has reported on this stage at all, served in it (``outcomes``); the
    candidates passed over on the way are returned as ``skipped``. A deprecated version is never
    rolled back to, named or not; a named one the fleet refused or never served needs
    ``allow_unserved`` (the move is then ``forced``).
    """
    name = names.stage_name(model_id, stage)
    candidates = list(old.rollback_candidates)
    fleet = fleet or FleetRecord()

    def why_not(version: int) -> resources_pb2.SkippedCandidate | None:
        if version in deprecated:
            return resources_pb2.SkippedCandidate(
                version=version, reason=resources_pb2.SKIP_REASON_DEPRECATED,
                detail="deprecated (it has a sunset time)")
        return fleet.skip(version, stage)

    skipped: list[resources_pb2.SkippedCandidate] = []
    forced = False
    if not candidates:
        raise _no_candidate(name, candidates, skipped)
    if not to_version:
        for candidate in candidates:
            skip = why_not(candidate)
            if skip is None:
                target = candidate
                break
            skipped.append(skip)
        else:
            raise _no_candidate(name, candidates, skipped)
    else:
        target = to_version
        if target in deprecated:
            raise FailedPreconditionError(
                ErrorReason.VERSION_DEPRECATED,
                f"version {target} is deprecated and cannot be rolled back to",
            )
        if target not in candidates:
            raise FailedPreconditionError(
                ErrorReason.NOT_A_ROLLBACK_CANDIDATE,
                f"version {target} is not a known-good former version of {name}; candidates: "
                + (", ".join(str(c) for c in candidates) or "none"),
                candidates=",".join(str(c) for c in candidates),
            )
        skip = fleet.skip(target, stage)
        if skip is not None and not allow_unserved:
            refused = skip.reason == resources_pb2.SKIP_REASON_REFUSED
            rule = (ErrorReason.VERSION_REFUSED_BY_FLEET if refused
                    else ErrorReason.VERSION_NEVER_SERVED)
            raise FailedPreconditionError(
                rule,
                f"version {target} is no known-good version of {name}: {skip.detail}; "
                "set allow_unserved (with a reason) to roll back to it anyway",
                version=str(target), why=_skip_name(skip.reason),
            )
        forced = skip is not None
    move = _move(
        old, model_id, stage, target, _without(candidates, target, old.version),
        resources_pb2.POINTER_MOVE_KIND_ROLLBACK,
        actor=actor, reason=reason, now=now,
    )
    return Move(move.pointer, move.history, move.from_version, tuple(skipped), forced)


def clear(
    model_id: str,
    stage: str,
    old: resources_pb2.StagePointer,
    *,
    force: bool,
    reason: str,
    actor: str,
    now: timestamp_pb2.Timestamp,
) -> Move:
    """Decides emptying a stage: ``production`` only with ``force`` (the caller checks reason).

    The pointer stays, naming version 0, so watchers see the change; the version it named
    becomes its first rollback candidate, so a rollback undoes the clear.
    """
    name = names.stage_name(model_id, stage)
    if not old.version:
        raise FailedPreconditionError(
            ErrorReason.STAGE_ALREADY_EMPTY, f"{name} names no version; there is nothing to clear")
    if stage == PRODUCTION and not force:
        raise FailedPreconditionError(
            ErrorReason.PROTECTED_STAGE,
            f"{name} serves version {old.version}: clearing production takes the model out of "
            "service wherever nodes follow it; set force (with a reason) to clear it anyway",
            version=str(old.version),
        )
    move = _move(
        old, model_id, stage, 0, _without([old.version, *old.rollback_candidates], 0),
        resources_pb2.POINTER_MOVE_KIND_CLEAR, actor=actor, reason=reason, now=now,
    )
    return Move(move.pointer, move.history, move.from_version, forced=stage == PRODUCTION)


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
