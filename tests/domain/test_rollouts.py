"""Domain rules of rollouts (issue 9): start, one at a time, commit, abort, cancel, emergency
rollback. Unit tests over the in-memory store; the proof against etcd and gRPC is
``tests/server/test_rollouts_api.py``.
"""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from modelreg.server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    RolloutDoneError,
    RolloutInProgressError,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as rs
from tests.domain.env import MODEL, Env, field_of
from tests.domain.fleet_env import audit_of

PRODUCTION = f"models/{MODEL}/stages/production"


def policy(**fields: object) -> res.RolloutPolicy:
    return res.RolloutPolicy(**fields)  # type: ignore[arg-type]


async def govern(env: Env, stage: str = "production", **fields: object) -> res.RegisteredModel:
    """Puts ``stage`` of the model under a rollout policy."""
    model = res.RegisteredModel(name=f"models/{MODEL}", rollout_policies={stage: policy(**fields)})
    req = svc.UpdateModelRequest(model=model,
                                 update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"]))
    return (await env.reg.models.update(env.call("UpdateModel", req), req)).model


async def started(env: Env, *, versions: int = 2) -> svc.PromoteVersionResponse:
    """v1 in production (before the policy), v2 in staging, then a rollout of v2 started."""
    await env.setup(versions)
    await env.to_production(1)
    await govern(env)
    await env.promote("staging", 2)
    return await env.promote("production", 2, actor="bob", reason="better auc")


class TestStart:
    async def test_promote_on_governed_stage_starts_a_rollout(self, env: Env) -> None:
        """The pointer does not move: it names the pending rollout; the record is PREPARING."""
        resp = await started(env)
        name = f"{PRODUCTION}/rollouts/1"
        assert (resp.stage.version, resp.stage.pending_version) == (1, 2)
        assert resp.stage.pending_rollout == name and resp.stage.rollout_count == 1
        assert resp.archived_version == 0
        r = resp.rollout
        assert (r.name, r.state, r.done, r.kind) == (
            name, res.ROLLOUT_STATE_PREPARING, False, res.ROLLOUT_KIND_PROMOTE)
        assert (r.target_version, r.from_version, r.actor, r.reason) == (2, 1, "bob", "better auc")
        assert list(r.regions) == ["default"]
        assert r.policy.prepare_deadline.seconds == 300
        assert r.policy.activation_margin.seconds == 2
        assert r.deadline.ToNanoseconds() - r.create_time.ToNanoseconds() == 300 * 10**9
        assert r.etag == resp.stage.etag == f'"{resp.revision}"'
        assert await env.stage("production") == resp.stage
        got = await env.reg.rollouts.get(rs.GetRolloutRequest(name=name))
        assert got.rollout == r
        event = audit_of(await env.audit(), res.AUDIT_ACTION_START_ROLLOUT)
        assert (event.rollout, event.from_value, event.to_value, event.actor) == (
            name, "1", "2", "bob")
        assert (await env.version(1)).state == res.VERSION_STATE_PRODUCTION

    async def test_second_promote_is_refused_and_writes_nothing(self, env: Env) -> None:
        """ABORTED ROLLOUT_IN_PROGRESS naming the active rollout, before the lifecycle rules."""
        await started(env, versions=3)
        commits = env.store.commits
        with pytest.raises(RolloutInProgressError) as exc:
            await env.promote("production", 3)
        assert exc.value.reason == "ROLLOUT_IN_PROGRESS"
        assert exc.value.metadata["rollout"] == f"{PRODUCTION}/rollouts/1"
        assert env.store.commits == commits

    async def test_ungoverned_stages_move_at_once(self, env: Env) -> None:
        """Staging has no policy: it moves as before, with no rollout."""
        await env.setup(2)
        await govern(env)
        resp = await env.promote("staging", 2)
        assert resp.stage.version == 2 and not resp.HasField("rollout")
        assert resp.stage.rollout_count == 0

    async def test_the_policy_regions_win(self, env: Env) -> None:
        """A policy naming regions records those; unset figures take their defaults."""
        await env.setup(1)
        await govern(env, "staging", regions=["default"], readiness_fraction=0.5,
                     prepare_deadline=duration_pb2.Duration(seconds=30))
        resp = await env.promote("staging", 1)
        assert list(resp.rollout.regions) == ["default"]
        assert resp.rollout.policy.readiness_fraction == 0.5
        assert resp.rollout.policy.prepare_deadline.seconds == 30


class TestCommit:
    async def test_commit_moves_the_pointer_like_a_promotion(self, env: Env) -> None:
        """History, archive, activation time = commit + margin, audit PROMOTE naming it."""
        resp = await started(env)
        name = resp.rollout.name
        done = await env.reg.rollouts.commit(name, actor="coordinator")
        assert (done.state, done.done) == (res.ROLLOUT_STATE_COMMITTED, True)
        assert done.commit_revision > 0 and done.etag == f'"{done.commit_revision}"'
        pointer = await env.stage("production")
        assert (pointer.version, pointer.previous_version, pointer.pending_version) == (2, 1, 0)
        assert pointer.pending_rollout == "" and pointer.rollout == name
        assert pointer.rollout_count == 1
        assert list(pointer.rollback_candidates) == [1]
        assert pointer.updated_by == "bob" and pointer.reason == "better auc"
        margin = done.activation_time.ToNanoseconds() - done.end_time.ToNanoseconds()
        assert margin == 2 * 10**9
        assert pointer.activation_time == done.activation_time
        assert (await env.version(1)).state == res.VERSION_STATE_ARCHIVED
        event = audit_of(await env.audit(), res.AUDIT_ACTION_PROMOTE)
        assert (event.rollout, event.actor, event.from_value, event.to_value) == (
            name, "coordinator", "1", "2")
        history = await env.reg.stages.history(svc.ListStageHistoryRequest(name=PRODUCTION))
        assert history.entries[0].to_version == 2 and history.entries[0].actor == "bob"
        got = (await env.reg.rollouts.get(rs.GetRolloutRequest(name=name))).rollout
        assert got == done

    async def test_commit_of_a_done_rollout_is_refused(self, env: Env) -> None:
        resp = await started(env)
        await env.reg.rollouts.commit(resp.rollout.name, actor="c")
        with pytest.raises(RolloutDoneError) as exc:
            await env.reg.rollouts.commit(resp.rollout.name, actor="c")
        assert (exc.value.reason, exc.value.metadata["state"]) == ("ROLLOUT_DONE", "COMMITTED")

    async def test_rules_refusing_at_commit_abort_the_rollout(self, env: Env) -> None:
        """The target was deprecated meanwhile: the commit aborts with the rule's words."""
        resp = await started(env)
        await env.deprecate(2)
        done = await env.reg.rollouts.commit(resp.rollout.name, actor="c")
        assert done.state == res.ROLLOUT_STATE_ABORTED
        assert "deprecated" in done.abort_reason
        pointer = await env.stage("production")
        assert (pointer.version, pointer.pending_rollout) == (1, "")

    async def test_a_new_rollout_after_commit_gets_the_next_number(self, env: Env) -> None:
        resp = await started(env, versions=3)
        await env.reg.rollouts.commit(resp.rollout.name, actor="c")
        await env.promote("staging", 3)
        again = await env.promote("production", 3)
        assert again.rollout.name == f"{PRODUCTION}/rollouts/2"
        listed = await env.reg.rollouts.list(rs.ListRolloutsRequest(parent=PRODUCTION))
        assert [r.name for r in listed.rollouts] == [f"{PRODUCTION}/rollouts/{i}" for i in (2, 1)]


class TestAbort:
    async def test_abort_clears_pending_and_audits(self, env: Env) -> None:
        resp = await started(env)
        done = await env.reg.rollouts.abort(resp.rollout.name, "eu not ready", actor="coord")
        assert (done.state, done.abort_reason, done.cancelled_by) == (
            res.ROLLOUT_STATE_ABORTED, "eu not ready", "")
        pointer = await env.stage("production")
        assert (pointer.version, pointer.pending_rollout, pointer.pending_version) == (1, "", 0)
        assert pointer.rollout_count == 1 and pointer.generation == resp.stage.generation
        event = audit_of(await env.audit(), res.AUDIT_ACTION_ABORT_ROLLOUT)
        assert (event.reason, event.actor, event.rollout) == ("eu not ready", "coord",
                                                              resp.rollout.name)
        again = await env.promote("production", 2)
        assert again.rollout.name == f"{PRODUCTION}/rollouts/2"

    async def test_cancel_records_who_and_refuses_when_done(self, env: Env) -> None:
        resp = await started(env)
        req = rs.CancelRolloutRequest(name=resp.rollout.name, reason="wrong build")
        done = (await env.reg.rollouts.cancel(env.call("CancelRollout", req, "carol"), req)).rollout
        assert (done.state, done.cancelled_by, done.abort_reason) == (
            res.ROLLOUT_STATE_ABORTED, "carol", "wrong build")
        with pytest.raises(RolloutDoneError) as exc:
            await env.reg.rollouts.cancel(env.call("CancelRollout", req, "carol"), req)
        assert isinstance(exc.value, FailedPreconditionError)
        assert exc.value.metadata["state"] == "ABORTED"

    async def test_cancel_needs_a_reason(self, env: Env) -> None:
        resp = await started(env)
        req = rs.CancelRolloutRequest(name=resp.rollout.name, reason=" ")
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.rollouts.cancel(env.call("CancelRollout", req), req)
        assert field_of(exc.value) == "reason"


class TestEmergencyRollback:
    async def test_rollback_commits_at_once_and_aborts_the_preparing_rollout(
        self, env: Env
    ) -> None:
        """v2 committed, v3 preparing; a rollback goes to v1 now and supersedes rollout 2."""
        resp = await started(env, versions=3)
        await env.reg.rollouts.commit(resp.rollout.name, actor="c")
        await env.promote("staging", 3)
        preparing = await env.promote("production", 3)
        back = await env.rollback()
        assert (back.stage.version, back.rolled_back_version) == (1, 2)
        assert back.aborted_rollout == preparing.rollout.name
        r = back.rollout
        assert (r.name, r.kind, r.state, r.done) == (
            f"{PRODUCTION}/rollouts/3", res.ROLLOUT_KIND_ROLLBACK, res.ROLLOUT_STATE_COMMITTED,
            True)
        assert r.commit_revision == back.revision and r.activation_time == r.end_time
        assert back.stage.rollout == r.name and back.stage.pending_rollout == ""
        assert back.stage.activation_time == r.activation_time
        old = (await env.reg.rollouts.get(rs.GetRolloutRequest(name=preparing.rollout.name)))
        assert old.rollout.state == res.ROLLOUT_STATE_ABORTED
        assert "superseded by a rollback" in old.rollout.abort_reason
        events = await env.audit()
        assert events[0].action == res.AUDIT_ACTION_ROLLBACK and events[0].rollout == r.name
        assert events[1].action == res.AUDIT_ACTION_ABORT_ROLLOUT
        assert events[1].rollout == preparing.rollout.name
        assert events[0].revision == events[1].revision == back.revision


class TestPolicies:
    @pytest.mark.parametrize(("fields", "where"), [
        ({"readiness_fraction": 1.5}, "readiness_fraction"),
        ({"readiness_fraction": float("nan")}, "readiness_fraction"),
        ({"prepare_deadline": duration_pb2.Duration(nanos=5)}, "prepare_deadline"),
        ({"prepare_deadline": duration_pb2.Duration(seconds=90_000)}, "prepare_deadline"),
        ({"activation_margin": duration_pb2.Duration(seconds=61)}, "activation_margin"),
        ({"regions": ["EU"]}, "regions[0]"),
        ({"regions": ["mars"]}, "regions[0]"),
        ({"regions": ["default", "default"]}, "regions"),
    ])
    async def test_bad_figures_are_named(self, env: Env, fields: dict[str, object],
                                         where: str) -> None:
        await env.setup(0)
        with pytest.raises(InvalidArgumentError) as exc:
            await govern(env, **fields)
        assert field_of(exc.value) == f'model.rollout_policies["production"].{where}'

    async def test_undeclared_stage_is_refused(self, env: Env) -> None:
        await env.setup(0)
        with pytest.raises(InvalidArgumentError) as exc:
            await govern(env, "canary")
        assert field_of(exc.value) == 'model.rollout_policies["canary"]'

    async def test_policy_cannot_go_while_a_rollout_prepares(self, env: Env) -> None:
        await started(env)
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}"),
            update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"]))
        with pytest.raises(RolloutInProgressError):
            await env.reg.models.update(env.call("UpdateModel", req), req)

    async def test_create_model_with_a_policy(self, env: Env) -> None:
        req = svc.CreateModelRequest(model_id="m2", model=res.RegisteredModel(
            rollout_policies={"production": policy(readiness_fraction=0.9)}))
        model = (await env.reg.models.create(env.call("CreateModel", req), req)).model
        assert model.rollout_policies["production"].readiness_fraction == 0.9


class TestMore:
    async def test_clear_waits_for_the_rollout(self, env: Env) -> None:
        await started(env)
        req = svc.ClearStageRequest(name=PRODUCTION, force=True, reason="retire")
        with pytest.raises(RolloutInProgressError):
            await env.reg.stages.clear(env.call("ClearStage", req), req)

    async def test_a_retried_promote_gets_the_same_rollout(self, env: Env) -> None:
        await started(env, versions=3)
        await env.reg.rollouts.abort(f"{PRODUCTION}/rollouts/1", "again", actor="c")
        req = svc.PromoteVersionRequest(name=PRODUCTION, version=2, request_id="r-1")
        first = await env.reg.stages.promote(env.call("PromoteVersion", req), req)
        again = await env.reg.stages.promote(env.call("PromoteVersion", req), req)
        assert again == first and first.rollout.name == f"{PRODUCTION}/rollouts/2"

    async def test_a_governed_custom_stage_cannot_be_dropped_alone(self, env: Env) -> None:
        """Removing a custom stage but not its policy leaves a policy on no stage: refused."""
        await env.setup(0, custom_stages=("canary",))
        await govern(env, "canary")
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}"),
            update_mask=field_mask_pb2.FieldMask(paths=["custom_stages"]))
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.models.update(env.call("UpdateModel", req), req)
        assert field_of(exc.value) == 'model.rollout_policies["canary"]'

    async def test_preparing_lists_what_the_coordinator_drives(self, env: Env) -> None:
        resp = await started(env)
        found = await env.reg.rollouts.preparing()
        assert [(r.name, rev) for r, rev in found] == [
            (resp.rollout.name, resp.revision)]
        updated = await env.reg.rollouts.record_readiness(
            resp.rollout.name, [res.RegionReadiness(region="default", ready=True)])
        assert updated is not None and updated.readiness[0].ready
        await env.reg.rollouts.commit(resp.rollout.name, actor="c")
        assert await env.reg.rollouts.preparing() == []
        assert await env.reg.rollouts.record_readiness(resp.rollout.name, []) is None
