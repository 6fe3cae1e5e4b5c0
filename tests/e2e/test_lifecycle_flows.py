"""The seed flows of the lifecycle, end to end through a real server on a real etcd."""

from __future__ import annotations

import grpc
import pytest

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, PARENT, error_info, make_model, stage

VS = res.VersionState


async def _state(stub, version: int) -> int:
    got = await stub.GetModelVersion(
        svc.GetModelVersionRequest(name=f"models/{MODEL}/versions/{version}"))
    return got.model_version.state


class TestSeedFlow:
    async def test_promotion_archives_and_rollback_restores(self, stub):
        """v4 in production, v5 through staging to production archives v4; rollback restores v4."""
        await make_model(stub, versions=5)
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=4))
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("production"), version=4))
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=5))
        promoted = await stub.PromoteVersion(
            svc.PromoteVersionRequest(name=stage("production"), version=5, reason="better auc"))
        assert promoted.stage.version == 5
        assert promoted.archived_version == 4
        assert list(promoted.stage.rollback_candidates) == [4]
        assert await _state(stub, 4) == VS.VERSION_STATE_ARCHIVED
        assert await _state(stub, 5) == VS.VERSION_STATE_PRODUCTION

        rolled = await stub.RollbackStage(
            svc.RollbackStageRequest(name=stage("production"), reason="p99 regression"))
        assert rolled.stage.version == 4
        assert rolled.rolled_back_version == 5
        assert list(rolled.stage.rollback_candidates) == []
        assert await _state(stub, 4) == VS.VERSION_STATE_PRODUCTION
        assert await _state(stub, 5) == VS.VERSION_STATE_STAGING

        history = await stub.ListStageHistory(svc.ListStageHistoryRequest(name=stage("production")))
        assert [(e.kind, e.from_version, e.to_version) for e in history.entries] == [
            (res.POINTER_MOVE_KIND_ROLLBACK, 5, 4),
            (res.POINTER_MOVE_KIND_PROMOTE, 4, 5),
            (res.POINTER_MOVE_KIND_PROMOTE, 0, 4),
        ]
        assert history.entries[0].revision == rolled.revision
        assert history.entries[0].actor == "alice"

    async def test_skipping_staging_is_refused_and_writes_nothing(self, stub):
        """Promoting a registered version straight to production is FAILED_PRECONDITION."""
        await make_model(stub, versions=1)
        before = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("production"), version=1))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value)[0] == "STAGING_REQUIRED"
        after = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))
        assert len(after.audit_events) == len(before.audit_events)
        got = await stub.GetStage(svc.GetStageRequest(name=stage("production")))
        assert got.stage.version == 0

    async def test_hotfix_path_needs_reason_and_is_flagged(self, stub):
        """A hotfix skips staging only with a reason, and stays flagged until back-filled."""
        await make_model(stub, versions=2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("production"), version=2, hotfix=True))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["reason"]

        fixed = await stub.PromoteVersion(svc.PromoteVersionRequest(
            name=stage("production"), version=2, hotfix=True, reason="CVE-2026-1 in v1 featurizer"))
        assert fixed.stage.hotfix and fixed.stage.backfill_required
        events = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT, page_size=1))
        event = events.audit_events[0]
        assert event.hotfix and event.reason == "CVE-2026-1 in v1 featurizer"
        assert event.revision == fixed.revision

        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=2))
        production = await stub.GetStage(svc.GetStageRequest(name=stage("production")))
        assert production.stage.version == 2
        assert production.stage.hotfix and not production.stage.backfill_required

    async def test_latest_is_never_a_stage(self, stub):
        """The 'latest' stage is refused as INVALID_ARGUMENT naming the field."""
        await make_model(stub, versions=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("latest"), version=1))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["name"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateModel(svc.CreateModelRequest(
                model_id="other", model=res.RegisteredModel(custom_stages=["latest"])))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["model.custom_stages[0]"]

    async def test_custom_stage_must_be_declared(self, stub):
        """An undeclared stage is INVALID_ARGUMENT; once declared, versions promote into it."""
        await make_model(stub, versions=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("canary"), version=1))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[0] == "INVALID_ARGUMENT"
        await stub.UpdateModel(svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}", custom_stages=["canary"]),
            update_mask={"paths": ["custom_stages"]}))
        moved = await stub.PromoteVersion(
            svc.PromoteVersionRequest(name=stage("canary"), version=1))
        assert moved.stage.version == 1
        stages = await stub.ListStages(svc.ListStagesRequest(parent=f"models/{MODEL}"))
        assert [(s.name.rsplit("/", 1)[1], s.version) for s in stages.stages] == [
            ("staging", 0), ("production", 0), ("canary", 1)]

    async def test_delete_refused_while_staged(self, stub):
        """A model with a staged version cannot be deleted; without one it can, versions and all."""
        await make_model(stub, versions=1)
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=1))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DeleteModel(svc.DeleteModelRequest(name=f"models/{MODEL}"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value)[0] == "MODEL_HAS_STAGED_VERSIONS"

        await make_model(stub, "spare", versions=2)
        await stub.DeleteModel(svc.DeleteModelRequest(name="models/spare"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModelVersion(svc.GetModelVersionRequest(name="models/spare/versions/1"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


class TestVersions:
    async def test_versions_are_numbered_and_immutable(self, stub):
        """The server numbers versions; annotations change with an etag, immutable fields never."""
        await make_model(stub, versions=3)
        listed = await stub.ListModelVersions(
            svc.ListModelVersionsRequest(parent=f"models/{MODEL}"))
        assert [v.version for v in listed.model_versions] == [1, 2, 3]
        v2 = listed.model_versions[1]
        assert v2.created_by == "alice" and v2.state == VS.VERSION_STATE_REGISTERED

        updated = await stub.UpdateModelVersion(svc.UpdateModelVersionRequest(
            model_version=res.ModelVersion(name=v2.name, description="tuned", etag=v2.etag),
            update_mask={"paths": ["description"]}))
        assert updated.model_version.description == "tuned"
        assert updated.model_version.sha256 == v2.sha256
        assert updated.model_version.etag != v2.etag

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.UpdateModelVersion(svc.UpdateModelVersionRequest(
                model_version=res.ModelVersion(name=v2.name, description="again", etag=v2.etag),
                update_mask={"paths": ["description"]}))
        assert caught.value.code() == grpc.StatusCode.ABORTED
        reason, metadata, _ = error_info(caught.value)
        assert reason == "ETAG_MISMATCH"
        assert metadata["current_etag"] == updated.model_version.etag

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.UpdateModelVersion(svc.UpdateModelVersionRequest(
                model_version=res.ModelVersion(name=v2.name, artifact_uri="file:///evil"),
                update_mask={"paths": ["artifact_uri"]}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["update_mask"]

    async def test_list_filters_by_state_and_paginates(self, stub):
        """Listing by state returns only matching versions; pages cover everything once."""
        await make_model(stub, versions=5)
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=3))
        staged = await stub.ListModelVersions(svc.ListModelVersionsRequest(
            parent=f"models/{MODEL}", state=VS.VERSION_STATE_STAGING))
        assert [v.version for v in staged.model_versions] == [3]
        seen, token = [], ""
        while True:
            page = await stub.ListModelVersions(svc.ListModelVersionsRequest(
                parent=f"models/{MODEL}", page_size=2, page_token=token))
            seen += [v.version for v in page.model_versions]
            token = page.next_page_token
            if not token:
                break
        assert seen == [1, 2, 3, 4, 5]


class TestAudit:
    async def test_audit_filters(self, stub, server):
        """Audit events filter by model and by actor; each names the revision of its change."""
        await make_model(stub, "a-model", versions=1)
        async with grpc.aio.insecure_channel(server.target) as channel:
            from tests.helpers import ActorStub

            bob = ActorStub(channel, "bob")
            await make_model(bob, "b-model", versions=1)
        by_model = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent="models/b-model"))
        assert {e.actor for e in by_model.audit_events} == {"bob"}
        assert len(by_model.audit_events) == 2
        by_actor = await stub.ListAuditEvents(svc.ListAuditEventsRequest(actor="alice"))
        assert {e.model for e in by_actor.audit_events} == {"a-model"}
        everything = await stub.ListAuditEvents(svc.ListAuditEventsRequest())
        revisions = [e.revision for e in everything.audit_events]
        assert revisions == sorted(revisions, reverse=True) and len(set(revisions)) == 4


class TestRollbackSkipsDeprecated:
    async def test_deprecated_versions_are_not_rollback_targets(self, stub):
        """Rollback skips a deprecated former version and refuses it when named."""
        await make_model(stub, versions=3)
        for v in (1, 2, 3):
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=v))
            await stub.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("production"), version=v))
        await stub.UpdateModelVersion(svc.UpdateModelVersionRequest(
            model_version=res.ModelVersion(name=f"models/{MODEL}/versions/2",
                                           sunset_time={"seconds": 1_900_000_000}),
            update_mask={"paths": ["sunset_time"]}))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RollbackStage(
                svc.RollbackStageRequest(name=stage("production"), to_version=2))
        assert error_info(caught.value)[0] == "VERSION_DEPRECATED"
        rolled = await stub.RollbackStage(svc.RollbackStageRequest(name=stage("production")))
        assert rolled.stage.version == 1
