"""Read-your-writes: ``x-modelreg-min-revision`` holds a call until its revision is applied."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from modelreg.client import AsyncRegistryClient, RegistryClient, UnavailableError
from modelreg.server.api.consistency import MIN_REVISION_HEADER
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1 import region_service_pb2_grpc, watch_service_pb2_grpc
from modelreg.v1 import watch_service_pb2 as ws
from tests.helpers import MODEL, error_info, make_model, stage, start_server
from tests.server.forward_env import deployment


def at_least(revision: int, actor: str = "alice") -> tuple[tuple[str, str], ...]:
    """Call metadata asking for ``revision``."""
    return (("x-modelreg-actor", actor), (MIN_REVISION_HEADER, str(revision)))


@pytest.fixture
async def server(etcd_server, etcd_prefix):
    running = await start_server(etcd_server.endpoint, etcd_prefix, min_revision_wait=30.0)
    try:
        yield running
    finally:
        await running.stop()


class TestMinRevision:
    async def test_a_revision_already_applied_answers_at_once(self, server, stub):
        """A read asking for the revision its own write returned answers with that write."""
        await make_model(stub, versions=1)
        promoted = await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                       version=1))
        got = await stub.GetStage(svc.GetStageRequest(name=stage("staging")),
                                  metadata=at_least(promoted.revision))
        assert got.stage.version == 1 and got.revision >= promoted.revision

    async def test_a_revision_not_yet_reached_waits_for_it(self, server, stub):
        """A read asking for a revision the store has not reached waits, and answers once
        later commits reach it, reflecting them.
        """
        await make_model(stub, versions=3)
        now = (await stub.ListStages(svc.ListStagesRequest(parent=f"models/{MODEL}"))).revision
        read = asyncio.ensure_future(stub.GetStage(svc.GetStageRequest(name=stage("staging")),
                                                 metadata=at_least(now + 3), timeout=60))
        await asyncio.sleep(0.1)
        assert not read.done()
        for version in (1, 2, 3):
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                version=version))
        got = await read
        assert got.revision >= now + 3 and got.stage.version == 3

    async def test_past_the_deadline_it_fails_naming_the_applied_revision(self, server, stub):
        """A revision the store does not reach before the call's deadline fails UNAVAILABLE
        (REVISION_NOT_YET_APPLIED) before that deadline, naming the region, the revision the
        store had applied and the one asked for.
        """
        await make_model(stub)
        now = (await stub.GetModel(svc.GetModelRequest(name=f"models/{MODEL}"))).revision
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetModel(svc.GetModelRequest(name=f"models/{MODEL}"),
                                metadata=at_least(now + 1000), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # not DEADLINE_EXCEEDED
        reason, metadata, _ = error_info(err.value)
        assert reason == "REVISION_NOT_YET_APPLIED"
        assert metadata["region"] == "default" and metadata["min_revision"] == str(now + 1000)
        assert now <= int(metadata["applied_revision"]) < now + 1000
        assert f"has applied revision {metadata['applied_revision']}" in err.value.details()

    @pytest.mark.parametrize("value", ["-1", "ten", "1e3", "9" * 30, ""])
    async def test_a_malformed_revision_is_invalid(self, server, stub, value):
        """A header that is no revision is refused INVALID_ARGUMENT naming the header."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListModels(svc.ListModelsRequest(), metadata=(
                ("x-modelreg-actor", "alice"), (MIN_REVISION_HEADER, value)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(err.value)[2] == [MIN_REVISION_HEADER]

    async def test_the_server_caps_the_wait(self, etcd_server, etcd_prefix):
        """Without a deadline (a watch stream), the server waits at most its
        --min-revision-wait, then refuses the call with REVISION_NOT_YET_APPLIED.
        """
        running = await start_server(etcd_server.endpoint, etcd_prefix, min_revision_wait=0.3)
        try:
            async with grpc.aio.insecure_channel(running.target) as channel:
                watch = watch_service_pb2_grpc.WatchServiceStub(channel)
                stream = watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]),
                                           metadata=at_least(10**9))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream.read()
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_info(err.value)[0] == "REVISION_NOT_YET_APPLIED"
        finally:
            await running.stop()

    async def test_a_watch_opens_once_its_revision_is_applied(self, server, stub):
        """A WatchStages stream asking for a revision ahead of the store opens once a commit
        reaches it, with a snapshot that reflects that commit.
        """
        await make_model(stub, versions=2)
        now = (await stub.ListStages(svc.ListStagesRequest(parent=f"models/{MODEL}"))).revision
        async with grpc.aio.insecure_channel(server.target) as channel:
            stream = watch_service_pb2_grpc.WatchServiceStub(channel).WatchStages(
                ws.WatchStagesRequest(models=[MODEL]), metadata=at_least(now + 2))
            first = asyncio.ensure_future(stream.read())
            await asyncio.sleep(0.1)
            assert not first.done()
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=1))
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=2))
            opening = await asyncio.wait_for(first, 30)
            assert opening.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT
            assert opening.revision >= now + 2
            pointers = {p.name: p.version for p in opening.snapshot}
            assert pointers[stage("staging")] == 2
            stream.cancel()

    async def test_region_calls_honour_it_too(self, server):
        """RegionService calls, answered from the store too, wait for the revision as well."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            regions = region_service_pb2_grpc.RegionServiceStub(channel)
            now = (await regions.GetRegionStatus(rs.GetRegionStatusRequest())).revision
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await regions.GetRegionStatus(rs.GetRegionStatusRequest(),
                                              metadata=at_least(now + 1000), timeout=0.5)
            assert error_info(err.value)[0] == "REVISION_NOT_YET_APPLIED"


class TestReadYourWritesAcrossRegions:
    async def test_a_write_through_the_primary_read_in_the_region(
        self, etcd_server, etcd_prefix, tmp_path: Path
    ):
        """The revision a promotion on the primary returned, passed to eu, gets that promotion
        from eu's store; forwarded mutations ignore the header (the primary is never behind).
        """
        async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path) as env:
            us, eu = env.model_stub(env.us[0]), env.model_stub(env.eu)
            await make_model(us, versions=1)
            promoted = await us.PromoteVersion(svc.PromoteVersionRequest(
                name=stage("staging"), version=1))
            got = await eu.GetStage(svc.GetStageRequest(name=stage("staging")),
                                    metadata=at_least(promoted.revision))
            assert got.stage.etag == promoted.stage.etag
            cleared = await eu.ClearStage(svc.ClearStageRequest(name=stage("staging")),
                                          metadata=at_least(promoted.revision + 10**6))
            assert cleared.cleared_version == 1


class TestClientMinRevision:
    async def test_the_typed_clients_send_it_on_reads(self, server, stub):
        """`min_revision=` on the asyncio and blocking clients' reads waits for the revision,
        and one the region does not reach in the call's timeout raises UnavailableError
        (REVISION_NOT_YET_APPLIED) naming the applied revision.
        """
        await make_model(stub, versions=1)
        promoted = await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                       version=1))
        async with AsyncRegistryClient(server.target, actor="alice") as client:
            got = await client.get_stage(MODEL, "staging", min_revision=promoted.revision)
            assert got.stage.version == 1
            with pytest.raises(UnavailableError) as err:
                await client.list_stages(MODEL, min_revision=promoted.revision + 1000,
                                         timeout=1.0)
            assert err.value.reason == "REVISION_NOT_YET_APPLIED"
            assert int(err.value.metadata["applied_revision"]) >= promoted.revision
            with pytest.raises(ValueError, match="min_revision"):
                await client.get_model(MODEL, min_revision=-1)

        def blocking() -> None:
            with RegistryClient(server.target, actor="alice") as client:
                versions = client.list_versions(MODEL, min_revision=promoted.revision)
                assert [v.version for v in versions.model_versions] == [1]
                with pytest.raises(UnavailableError):
                    client.get_version(MODEL, 1, min_revision=promoted.revision + 1000,
                                       timeout=1.0)

        await asyncio.to_thread(blocking)
