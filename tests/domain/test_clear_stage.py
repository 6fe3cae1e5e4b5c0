"""Domain rules of ClearStage (issue 14 section 2): a stage pointer can be emptied again.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite
(tests/server/test_clear_stage_api.py, tests/e2e/test_rollback_incident.py).
"""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2

from modelreg.server.domain import keys
from modelreg.server.domain.errors import (
    EtagMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.domain.env import MODEL, VS, Env, field_of
from tests.domain.fleet_env import audit_of, rollback


async def clear(env: Env, stage: str, *, force: bool = False, reason: str = "",
                etag: str = "") -> svc.ClearStageResponse:
    req = svc.ClearStageRequest(name=f"models/{MODEL}/stages/{stage}", force=force,
                                reason=reason, etag=etag)
    return await env.reg.stages.clear(env.call("ClearStage", req), req)


async def delete_model(env: Env) -> svc.DeleteModelResponse:
    req = svc.DeleteModelRequest(name=f"models/{MODEL}")
    return await env.reg.models.delete(env.call("DeleteModel", req), req)


class TestClearStage:
    async def test_clear_empties_the_pointer_and_audits_it(self, env: Env) -> None:
        """Clearing canary leaves its pointer at version 0, records a CLEAR move in the history
        and a CLEAR_STAGE audit event, and makes the cleared version its first candidate.
        """
        await env.setup(2, custom_stages=("canary",))
        await env.promote("canary", 1)
        await env.promote("canary", 2)
        resp = await clear(env, "canary", reason="canary off")
        p = resp.stage
        assert (p.version, p.previous_version, resp.cleared_version) == (0, 2, 2)
        assert p.last_move == res.POINTER_MOVE_KIND_CLEAR and p.generation == 3
        assert list(p.rollback_candidates) == [2, 1]
        assert p.etag == f'"{resp.revision}"'
        assert (await env.stage("canary")).version == 0
        history = await env.reg.stages.history(
            svc.ListStageHistoryRequest(name=f"models/{MODEL}/stages/canary"))
        newest = history.entries[0]
        assert (newest.kind, newest.from_version, newest.to_version) == (
            res.POINTER_MOVE_KIND_CLEAR, 2, 0)
        event = audit_of(await env.audit(), res.AUDIT_ACTION_CLEAR_STAGE)
        assert (event.from_value, event.to_value, event.reason) == ("2", "", "canary off")
        assert not event.forced
        assert (await env.version(2)).stages == []

    async def test_rollback_undoes_a_clear(self, env: Env) -> None:
        """A rollback of an emptied stage points it at the version it named before."""
        await env.setup(1, custom_stages=("shadow",))
        await env.promote("shadow", 1)
        await clear(env, "shadow")
        assert (await rollback(env, stage="shadow")).stage.version == 1

    async def test_production_needs_force(self, env: Env) -> None:
        """Clearing production without force is PROTECTED_STAGE, and nothing is written."""
        await env.setup(1)
        await env.to_production(1)
        commits = env.store.commits
        with pytest.raises(FailedPreconditionError) as exc:
            await clear(env, "production", reason="retire")
        assert exc.value.reason == "PROTECTED_STAGE"
        assert exc.value.metadata["version"] == "1"
        assert env.store.commits == commits

    @pytest.mark.parametrize("reason", ["", "  "])
    async def test_force_needs_a_reason(self, env: Env, reason: str) -> None:
        """A force without a reason is INVALID_ARGUMENT naming reason."""
        await env.setup(1)
        await env.to_production(1)
        with pytest.raises(InvalidArgumentError) as exc:
            await clear(env, "production", force=True, reason=reason)
        assert field_of(exc.value) == "reason"

    async def test_forced_production_clear_archives_and_is_audited_forced(self, env: Env) -> None:
        """Forced with a reason, production empties; its version turns ARCHIVED; the audit
        event is marked forced.
        """
        await env.setup(1)
        await env.to_production(1)
        await clear(env, "staging")
        await clear(env, "production", force=True, reason="model retired")
        assert (await env.version(1)).state == VS.VERSION_STATE_ARCHIVED
        assert audit_of(await env.audit(), res.AUDIT_ACTION_CLEAR_STAGE).forced

    async def test_empty_stage_is_refused(self, env: Env) -> None:
        """Clearing a stage that names no version is STAGE_ALREADY_EMPTY."""
        await env.setup(1)
        with pytest.raises(FailedPreconditionError) as exc:
            await clear(env, "staging")
        assert exc.value.reason == "STAGE_ALREADY_EMPTY"

    async def test_stale_etag_is_aborted(self, env: Env) -> None:
        """A stale etag is ABORTED with the current one, and nothing is written."""
        await env.setup(2)
        first = await env.promote("staging", 1)
        current = await env.promote("staging", 2)
        with pytest.raises(EtagMismatchError) as exc:
            await clear(env, "staging", etag=first.stage.etag)
        assert exc.value.current_etag == current.stage.etag
        assert (await clear(env, "staging", etag=current.stage.etag)).stage.version == 0

    async def test_undeclared_stage_and_bad_name_are_invalid(self, env: Env) -> None:
        """An undeclared stage or a malformed name is INVALID_ARGUMENT naming name."""
        await env.setup(1)
        for stage in ("canary", "Bad Stage"):
            with pytest.raises(InvalidArgumentError) as exc:
                await clear(env, stage)
            assert field_of(exc.value) == "name"

    async def test_unknown_model_is_not_found(self, env: Env) -> None:
        """Clearing a stage of a model that does not exist is NOT_FOUND."""
        with pytest.raises(NotFoundError):
            await clear(env, "staging")

    async def test_model_with_every_stage_cleared_can_be_deleted(self, env: Env) -> None:
        """Once every stage is empty the model is deleted; its stage keys stay, reset blank, so
        a model created again under the id inherits no rollback candidates.
        """
        await env.setup(2, custom_stages=("canary",))
        await env.to_production(1)
        await env.promote("canary", 2)
        await clear(env, "canary")
        await clear(env, "staging")
        with pytest.raises(FailedPreconditionError) as exc:
            await delete_model(env)
        assert exc.value.metadata["stages"] == "production"
        await clear(env, "production", force=True, reason="retire the model")
        await delete_model(env)
        for stage in ("canary", "production", "staging"):
            assert keys.stage(MODEL, stage) in env.store.data  # never deleted
        await env.create_model()
        await env.create_version()
        pointer = await env.stage("production")
        assert (pointer.version, list(pointer.rollback_candidates)) == (0, [])
        assert list(pointer.former_versions) == [] and pointer.generation == 0

    async def test_cleared_custom_stage_can_be_undeclared(self, env: Env) -> None:
        """A custom stage emptied by ClearStage can be removed from the model's stages."""
        await env.setup(1, custom_stages=("canary",))
        await env.promote("canary", 1)
        await clear(env, "canary")
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}"),
            update_mask=field_mask_pb2.FieldMask(paths=["custom_stages"]))
        resp = await env.reg.models.update(env.call("UpdateModel", req), req)
        assert list(resp.model.custom_stages) == []
