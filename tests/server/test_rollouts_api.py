"""Issue 9's rollouts against real etcd (each build) and a real gRPC server: a promotion of a
governed stage starts a rollout without moving the pointer; one rollout at a time; the commit
moves the pointer as a promotion does; abort and cancel leave it; an emergency rollback aborts
a preparing rollout in its own transaction; policies are validated; regions report readiness;
WatchRollout streams until the rollout is done; CancelRollout is forwarded to the primary.

The coordinator's commit and abort are domain calls here (``app.registry.rollouts``) over the
server's own etcd store: the coordinator loop is tested with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelreg.server.domain import readiness as rd
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc, model_service_pb2_grpc, rollout_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as rs
from tests.helpers import (
    MODEL,
    PARENT,
    RunningServer,
    error_info,
    make_model,
    on_each_etcd_build,
    stage,
)
from tests.server.forward_env import deployment

__all__ = ["on_each_etcd_build"]  # every test here runs once per etcd build

PRODUCTION = stage("production")
ACTOR = (("x-modelreg-actor", "bob"),)


class Stubs:
    """ModelService, RolloutService and FleetService stubs on one server, as ``bob``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.models = _Acting(model_service_pb2_grpc.ModelServiceStub(channel))
        self.rollouts = _Acting(rollout_service_pb2_grpc.RolloutServiceStub(channel))
        self.fleet = _Acting(fleet_service_pb2_grpc.FleetServiceStub(channel))


class _Acting:
    """A stub whose unary calls carry the actor header and a timeout."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("metadata", ACTOR)
            kwargs.setdefault("timeout", 10)
            return method(request, **kwargs)

        return call


@pytest.fixture
async def api(server: RunningServer) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield Stubs(channel)


def policy_update(policies: dict[str, res.RolloutPolicy]) -> svc.UpdateModelRequest:
    return svc.UpdateModelRequest(
        model=res.RegisteredModel(name=PARENT, rollout_policies=policies),
        update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"]))


async def governed(api: Stubs, versions: int = 3, **policy: Any) -> None:
    """v1 in production before the policy, then production governed and v2 in staging."""
    await make_model(api.models, versions=versions)
    for stage_id in ("staging", "production"):
        await api.models.PromoteVersion(svc.PromoteVersionRequest(name=stage(stage_id), version=1))
    await api.models.UpdateModel(policy_update({"production": res.RolloutPolicy(**policy)}))
    await api.models.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=2))


async def start(api: Stubs, version: int = 2) -> svc.PromoteVersionResponse:
    resp: svc.PromoteVersionResponse = await api.models.PromoteVersion(
        svc.PromoteVersionRequest(name=PRODUCTION, version=version, reason="better auc"))
    return resp


async def etcd_keys(etcd: EmbeddedEtcd, prefix: str) -> dict[str, tuple[bytes, int]]:
    async with aetcd.Client(etcd.host, etcd.client_port, timeout=10) as client:
        return {kv.key.decode().removeprefix(prefix): (kv.value, kv.mod_revision)
                for kv in await client.get_prefix(prefix.encode())}


async def audit(api: Stubs) -> list[res.AuditEvent]:
    resp = await api.models.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))
    return list(resp.audit_events)


async def pointer(api: Stubs) -> res.StagePointer:
    resp = await api.models.GetStage(svc.GetStageRequest(name=PRODUCTION))
    found: res.StagePointer = resp.stage
    return found


class TestStart:
    async def test_promote_on_a_governed_stage_starts_a_preparing_rollout(self, api):
        """The pointer keeps its version and names the pending rollout; the record is
        PREPARING with the policy's defaults written out; the audit says START_ROLLOUT.
        """
        await governed(api)
        resp = await start(api)
        name = f"{PRODUCTION}/rollouts/1"
        assert (resp.stage.version, resp.stage.pending_version, resp.stage.pending_rollout) == (
            1, 2, name)
        r = resp.rollout
        assert (r.name, r.state, r.kind, r.target_version, r.from_version, r.actor) == (
            name, res.ROLLOUT_STATE_PREPARING, res.ROLLOUT_KIND_PROMOTE, 2, 1, "bob")
        assert list(r.regions) == ["default"]
        assert (r.policy.prepare_deadline.seconds, r.policy.activation_margin.seconds) == (300, 2)
        assert r.etag == resp.stage.etag == f'"{resp.revision}"'
        assert await pointer(api) == resp.stage
        got = await api.rollouts.GetRollout(rs.GetRolloutRequest(name=name))
        assert got.rollout == r
        events = await audit(api)
        assert events[0].action == res.AUDIT_ACTION_START_ROLLOUT
        assert (events[0].rollout, events[0].actor, events[0].revision) == (
            name, "bob", resp.revision)
        version = await api.models.GetModelVersion(
            svc.GetModelVersionRequest(name=f"{PARENT}/versions/1"))
        assert version.model_version.state == res.VERSION_STATE_PRODUCTION

    async def test_a_second_promote_is_aborted_and_writes_nothing(
        self, api, etcd_server, etcd_prefix
    ):
        """ABORTED, reason ROLLOUT_IN_PROGRESS naming the active rollout; etcd unchanged."""
        await governed(api)
        first = await start(api)
        await api.models.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                  version=3))
        before = await etcd_keys(etcd_server, etcd_prefix)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await start(api, 3)
        assert exc.value.code() == grpc.StatusCode.ABORTED
        reason, metadata, _ = error_info(exc.value)
        assert reason == "ROLLOUT_IN_PROGRESS"
        assert metadata["rollout"] == first.rollout.name
        assert await etcd_keys(etcd_server, etcd_prefix) == before

    async def test_ungoverned_stages_move_at_once(self, api):
        await governed(api)
        resp = await api.models.GetStage(svc.GetStageRequest(name=stage("staging")))
        assert resp.stage.version == 2 and not resp.stage.pending_rollout
        listed = await api.rollouts.ListRollouts(rs.ListRolloutsRequest(parent=stage("staging")))
        assert list(listed.rollouts) == []


class TestCommitAndAbort:
    async def test_commit_moves_the_pointer_exactly_like_a_promotion(self, api, server):
        """History, archive of v1, activation time = commit + margin, audit PROMOTE naming the
        rollout, record COMMITTED with the commit's revision.
        """
        await governed(api, activation_margin=duration_pb2.Duration(seconds=5))
        started = await start(api)
        done = await server.app.registry.rollouts.commit(started.rollout.name, actor="coord")
        assert (done.state, done.done) == (res.ROLLOUT_STATE_COMMITTED, True)
        moved = await pointer(api)
        assert moved.etag == f'"{done.commit_revision}"'
        assert (moved.version, moved.previous_version, moved.pending_version) == (2, 1, 0)
        assert (moved.pending_rollout, moved.rollout) == ("", done.name)
        assert list(moved.rollback_candidates) == [1] and list(moved.former_versions) == [1]
        assert moved.activation_time == done.activation_time
        margin = done.activation_time.ToNanoseconds() - done.end_time.ToNanoseconds()
        assert margin == 5 * 10**9
        history = await api.models.ListStageHistory(svc.ListStageHistoryRequest(name=PRODUCTION))
        assert (history.entries[0].to_version, history.entries[0].revision) == (
            2, done.commit_revision)
        archived = await api.models.GetModelVersion(
            svc.GetModelVersionRequest(name=f"{PARENT}/versions/1"))
        assert archived.model_version.state == res.VERSION_STATE_ARCHIVED
        events = await audit(api)
        assert events[0].action == res.AUDIT_ACTION_PROMOTE
        assert (events[0].rollout, events[0].actor, events[0].revision) == (
            done.name, "coord", done.commit_revision)
        got = await api.rollouts.GetRollout(rs.GetRolloutRequest(name=done.name))
        assert got.rollout == done

    async def test_cancel_clears_pending_and_a_done_rollout_cannot_be_cancelled(self, api):
        await governed(api)
        started = await start(api)
        request = rs.CancelRolloutRequest(name=started.rollout.name, reason="wrong build")
        cancelled = await api.rollouts.CancelRollout(request)
        r = cancelled.rollout
        assert (r.state, r.done, r.cancelled_by, r.abort_reason) == (
            res.ROLLOUT_STATE_ABORTED, True, "bob", "wrong build")
        left = await pointer(api)
        assert (left.version, left.pending_rollout, left.pending_version) == (1, "", 0)
        assert left.etag == f'"{cancelled.revision}"'
        events = await audit(api)
        assert events[0].action == res.AUDIT_ACTION_ABORT_ROLLOUT
        assert (events[0].reason, events[0].rollout) == ("wrong build", r.name)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.rollouts.CancelRollout(request)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        reason, metadata, _ = error_info(exc.value)
        assert (reason, metadata["state"]) == ("ROLLOUT_DONE", "ABORTED")

    async def test_the_coordinator_abort_names_its_reason(self, api, server):
        await governed(api)
        started = await start(api)
        done = await server.app.registry.rollouts.abort(
            started.rollout.name, "deadline passed: eu not ready", actor="coord")
        assert (done.state, done.abort_reason, done.cancelled_by) == (
            res.ROLLOUT_STATE_ABORTED, "deadline passed: eu not ready", "")
        assert (await pointer(api)).pending_rollout == ""
        again = await start(api)
        assert again.rollout.name == f"{PRODUCTION}/rollouts/2"

    async def test_emergency_rollback_aborts_the_preparing_rollout_in_the_same_txn(
        self, api, server
    ):
        """v2 committed, v3 preparing: a rollback to v1 commits at once under a ROLLBACK
        rollout and aborts rollout 2, all at one revision.
        """
        await governed(api)
        first = await start(api)
        await server.app.registry.rollouts.commit(first.rollout.name, actor="coord")
        await api.models.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                  version=3))
        preparing = await start(api, 3)
        back = await api.models.RollbackStage(svc.RollbackStageRequest(
            name=PRODUCTION, reason="p99", to_version=1, allow_unserved=True))
        assert (back.stage.version, back.aborted_rollout) == (1, preparing.rollout.name)
        r = back.rollout
        assert (r.kind, r.state, r.commit_revision) == (
            res.ROLLOUT_KIND_ROLLBACK, res.ROLLOUT_STATE_COMMITTED, back.revision)
        assert back.stage.activation_time == r.activation_time == r.end_time
        old = await api.rollouts.GetRollout(rs.GetRolloutRequest(name=preparing.rollout.name))
        assert old.rollout.state == res.ROLLOUT_STATE_ABORTED
        assert old.rollout.etag == f'"{back.revision}"'
        assert "superseded by a rollback" in old.rollout.abort_reason
        events = await audit(api)
        assert [e.action for e in events[:2]] == [res.AUDIT_ACTION_ROLLBACK,
                                                  res.AUDIT_ACTION_ABORT_ROLLOUT]
        assert {e.revision for e in events[:2]} == {back.revision}
        listed = await api.rollouts.ListRollouts(rs.ListRolloutsRequest(parent=PRODUCTION))
        assert [x.name.rsplit("/", 1)[1] for x in listed.rollouts] == ["3", "2", "1"]

    async def test_deleting_the_model_deletes_its_rollouts(self, api, etcd_server, etcd_prefix):
        """Refused while a rollout prepares; once it is cancelled and the stages emptied,
        the model goes with its rollouts.
        """
        await governed(api)
        started = await start(api)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.models.DeleteModel(svc.DeleteModelRequest(name=PARENT))
        assert error_info(exc.value)[0] == "ROLLOUT_IN_PROGRESS"
        await api.rollouts.CancelRollout(rs.CancelRolloutRequest(name=started.rollout.name,
                                                                 reason="stop"))
        for stage_id in ("staging", "production"):
            await api.models.ClearStage(svc.ClearStageRequest(name=stage(stage_id), force=True,
                                                              reason="retire"))
        await api.models.DeleteModel(svc.DeleteModelRequest(name=PARENT))
        assert not [k for k in await etcd_keys(etcd_server, etcd_prefix)
                    if k.startswith("rollouts/")]


class TestPolicies:
    @pytest.mark.parametrize(("policy", "field"), [
        (res.RolloutPolicy(readiness_fraction=2.0), "readiness_fraction"),
        (res.RolloutPolicy(prepare_deadline=duration_pb2.Duration(seconds=0)),
         "prepare_deadline"),
        (res.RolloutPolicy(activation_margin=duration_pb2.Duration(seconds=-1)),
         "activation_margin"),
        (res.RolloutPolicy(regions=["Eu West"]), "regions[0]"),
    ])
    async def test_bad_policies_are_refused_with_their_field(self, api, policy, field):
        await make_model(api.models)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.models.UpdateModel(policy_update({"production": policy}))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(exc.value)[2] == [f'model.rollout_policies["production"].{field}']

    async def test_a_policy_on_an_undeclared_stage_is_refused_at_create(self, api):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.models.CreateModel(svc.CreateModelRequest(
                model_id=MODEL, model=res.RegisteredModel(
                    rollout_policies={"canary": res.RolloutPolicy()})))
        assert error_info(exc.value)[2] == ['model.rollout_policies["canary"]']


class TestReadiness:
    async def test_region_readiness_from_reported_nodes(self, api):
        """Four nodes follow production: two prepared v2, one serves it, one failed it."""
        def node(node_id: str, **served: Any) -> fs.ReportNodeRequest:
            return fs.ReportNodeRequest(ttl_seconds=15, node=fs.Node(node_id=node_id, stages=[
                fs.ServedStage(stage=PRODUCTION, **served)]))

        await api.fleet.ReportNode(node("a", serving_version=1, prepared_version=2))
        await api.fleet.ReportNode(node("b", serving_version=1, prepared_version=2))
        await api.fleet.ReportNode(node("c", serving_version=2))
        await api.fleet.ReportNode(node("d", serving_version=1, failed_version=2,
                                        error="DigestMismatchError: bad bytes"))
        await api.fleet.ReportNode(fs.ReportNodeRequest(ttl_seconds=15, node=fs.Node(
            node_id="other", stages=[fs.ServedStage(stage=stage("staging"), serving_version=2)])))
        resp = await api.fleet.GetRegionReadiness(fs.GetRegionReadinessRequest(
            name=PRODUCTION, version=2, readiness_fraction=0.75))
        r = resp.readiness
        assert (r.region, r.live_nodes, r.ready_nodes, r.failed_nodes, r.ready) == (
            "default", 4, 3, 1, True)
        assert [(f.node, f.error) for f in r.failures] == [
            ("nodes/d", "DigestMismatchError: bad bytes")]
        strict = await api.fleet.GetRegionReadiness(fs.GetRegionReadinessRequest(
            name=PRODUCTION, version=2))
        assert not strict.readiness.ready
        assert rd.too_many_failed(strict.readiness, 0)
        assert not rd.too_many_failed(r, 0.75)

    @pytest.mark.parametrize(("request_", "field"), [
        (fs.GetRegionReadinessRequest(name=PRODUCTION, version=0), "version"),
        (fs.GetRegionReadinessRequest(name=PRODUCTION, version=2, readiness_fraction=1.5),
         "readiness_fraction"),
        (fs.GetRegionReadinessRequest(name="models/x", version=2), "name"),
    ])
    async def test_bad_readiness_requests(self, api, request_, field):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await api.fleet.GetRegionReadiness(request_)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(exc.value)[2] == [field]


class TestWatch:
    async def test_watch_streams_each_change_until_done(self, api, server):
        """The rollout now, its readiness update, then its commit; the stream ends there."""
        await governed(api)
        started = await start(api)
        rollouts = server.app.registry.rollouts
        seen: list[rs.WatchRolloutResponse] = []
        stream = api.rollouts.WatchRollout(rs.WatchRolloutRequest(name=started.rollout.name))
        seen.append(await stream.read())
        await rollouts.record_readiness(started.rollout.name, [res.RegionReadiness(
            region="default", live_nodes=1, ready_nodes=1, ready=True)])
        seen.append(await stream.read())
        await rollouts.commit(started.rollout.name, actor="coord")
        while (message := await stream.read()) is not grpc.aio.EOF:
            seen.append(message)
        assert [m.rollout.state for m in seen] == [
            res.ROLLOUT_STATE_PREPARING, res.ROLLOUT_STATE_PREPARING,
            res.ROLLOUT_STATE_COMMITTED]
        assert seen[0].rollout == started.rollout
        assert seen[1].rollout.readiness[0].ready_nodes == 1
        assert seen[2].rollout.done and seen[2].rollout.commit_revision > 0

    async def test_watch_of_a_missing_rollout_is_not_found(self, api):
        await make_model(api.models)
        stream = api.rollouts.WatchRollout(rs.WatchRolloutRequest(name=f"{PRODUCTION}/rollouts/9"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stream.read()
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND

    async def test_watch_refuses_a_bad_name(self, api):
        stream = api.rollouts.WatchRollout(rs.WatchRolloutRequest(name=f"{PRODUCTION}/rollouts/x"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await asyncio.wait_for(stream.read(), 10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestRegions:
    async def test_cancel_is_forwarded_and_policies_know_the_regions(
        self, etcd_server, etcd_prefix, tmp_path: Path
    ):
        """Through eu: a policy naming an unknown region is refused, one naming none waits
        for every region of the topology, and a cancel commits on the primary.
        """
        async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path) as env:
            async with grpc.aio.insecure_channel(env.eu.target) as channel:
                eu = Stubs(channel)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await make_model(eu.models, rollout_policies={
                        "production": res.RolloutPolicy(regions=["ap"])})
                assert error_info(exc.value)[2] == [
                    'model.rollout_policies["production"].regions[0]']
                await governed(eu)
                started = await start(eu)
                assert list(started.rollout.regions) == ["us", "eu"]
                cancelled = await eu.rollouts.CancelRollout(rs.CancelRolloutRequest(
                    name=started.rollout.name, reason="from eu"))
                assert cancelled.rollout.cancelled_by == "bob"
            primary = env.us[0].app.registry.rollouts
            got = await primary.get(rs.GetRolloutRequest(name=started.rollout.name))
            assert got.rollout.state == res.ROLLOUT_STATE_ABORTED
            assert got.rollout.etag == f'"{cancelled.revision}"'


class TestWiring:
    async def test_rollout_service_is_in_health_and_reflection(self, server):
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # The health loop sets the services' status after the server starts: wait for it.
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(
                        service="modelreg.v1.RolloutService"), timeout=10)
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    assert asyncio.get_running_loop().time() < deadline, "never registered"
                    await asyncio.sleep(0.05)
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                assert asyncio.get_running_loop().time() < deadline, "never SERVING"
                await asyncio.sleep(0.05)
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")]))
            listed = [s.name async for r in responses
                      for s in r.list_services_response.service]
            assert "modelreg.v1.RolloutService" in listed
