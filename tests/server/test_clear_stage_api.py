"""ClearStage against real etcd and a real server: the pointer empties (its key stays, so watch
streams see the change), production needs force, and a model whose stages are all empty can be
deleted at last.
"""

from __future__ import annotations

import asyncio

import aetcd
import grpc
import pytest

from modelreg.client import AsyncRegistryClient
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc
from tests.helpers import MODEL, error_info, make_model, stage
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)

CHANGES = ws.WATCH_MESSAGE_TYPE_CHANGES


async def _changes(stream, count: int) -> list[ws.StageChange]:
    """The next ``count`` stage changes of a stream (bookmarks skipped)."""
    got: list[ws.StageChange] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            message = await stream.read()
            assert message is not grpc.aio.EOF
            if message.type == CHANGES:
                got.extend(message.changes)
    return got


async def _stage_keys(etcd, prefix: str) -> dict[str, int]:
    async with aetcd.Client(etcd.host, etcd.client_port, timeout=10) as client:
        return {kv.key.decode().removeprefix(prefix): kv.mod_revision
                for kv in await client.get_prefix(f"{prefix}stages/".encode())}


class TestClearStage:
    async def test_clear_is_seen_by_watch_streams_and_keeps_the_key(
        self, stub, server, etcd_server, etcd_prefix
    ):
        """Clearing canary reaches an open watch stream as a change to version 0 (a CLEAR
        move, from v2), and the pointer's key stays in etcd at the clear's revision.
        """
        await make_model(stub, versions=2, custom_stages=["canary"])
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("canary"), version=2))
        async with grpc.aio.insecure_channel(server.target) as channel:
            stream = watch_service_pb2_grpc.WatchServiceStub(channel).WatchStages(
                ws.WatchStagesRequest(models=[MODEL], stages=["canary"]))
            assert (await stream.read()).type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT
            async with AsyncRegistryClient(server.target, actor="ops") as client:
                resp = await client.clear_stage(MODEL, "canary", reason="canary done")
            [change] = await _changes(stream, 1)
            stream.cancel()
        assert (change.stage.version, change.from_version) == (0, 2)
        assert change.stage.last_move == res.POINTER_MOVE_KIND_CLEAR
        assert change.stage.etag == f'"{resp.revision}"'
        assert resp.cleared_version == 2
        keys = await _stage_keys(etcd_server, etcd_prefix)
        assert keys[f"stages/{MODEL}/canary"] == resp.revision
        events = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=f"models/{MODEL}"))
        event = events.audit_events[0]
        assert (event.action, event.actor, event.from_value, event.reason) == (
            res.AUDIT_ACTION_CLEAR_STAGE, "ops", "2", "canary done")

    async def test_production_needs_force_and_a_reason(self, stub, server):
        """Production is refused without force (FAILED_PRECONDITION PROTECTED_STAGE) and
        cleared with force and a reason, the audit event marked forced.
        """
        await make_model(stub, versions=1)
        for stage_id in ("staging", "production"):
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage(stage_id), version=1))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ClearStage(svc.ClearStageRequest(name=stage("production"), reason="why"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value)[0] == "PROTECTED_STAGE"
        assert (await stub.GetStage(svc.GetStageRequest(name=stage("production")))).stage.version
        cleared = await stub.ClearStage(svc.ClearStageRequest(
            name=stage("production"), force=True, reason="model retired"))
        assert cleared.stage.version == 0
        events = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=f"models/{MODEL}"))
        assert events.audit_events[0].forced

    async def test_model_with_every_stage_empty_is_deleted(
        self, stub, server, etcd_server, etcd_prefix
    ):
        """Once every stage is cleared, DeleteModel succeeds (it was MODEL_HAS_STAGED_VERSIONS
        forever before); the stage keys stay in etcd, and the model created again starts with
        blank pointers.
        """
        await make_model(stub, versions=2)
        for stage_id in ("staging", "production"):
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage(stage_id), version=1))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DeleteModel(svc.DeleteModelRequest(name=f"models/{MODEL}"))
        assert error_info(caught.value)[0] == "MODEL_HAS_STAGED_VERSIONS"
        await stub.ClearStage(svc.ClearStageRequest(name=stage("staging")))
        etag = (await stub.GetStage(svc.GetStageRequest(name=stage("production")))).stage.etag
        await stub.ClearStage(svc.ClearStageRequest(
            name=stage("production"), etag=etag, force=True, reason="retire"))
        await stub.DeleteModel(svc.DeleteModelRequest(name=f"models/{MODEL}"))
        assert sorted(await _stage_keys(etcd_server, etcd_prefix)) == [
            f"stages/{MODEL}/production", f"stages/{MODEL}/staging"]
        await make_model(stub, versions=1)
        pointer = (await stub.GetStage(svc.GetStageRequest(name=stage("production")))).stage
        assert (pointer.version, list(pointer.rollback_candidates), pointer.generation) == (
            0, [], 0)

    async def test_stale_etag_is_aborted(self, stub, server):
        """A stale etag on ClearStage is ABORTED carrying the current etag."""
        await make_model(stub, versions=2)
        first = await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                    version=1))
        now = await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                  version=2))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ClearStage(svc.ClearStageRequest(name=stage("staging"),
                                                        etag=first.stage.etag))
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert error_info(caught.value)[1]["current_etag"] == now.stage.etag
