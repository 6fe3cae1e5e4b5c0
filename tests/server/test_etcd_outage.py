"""etcd stopped: UNAVAILABLE with a clear message; etcd back: same server, all state intact."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from modelreg.v1 import model_service_pb2 as svc
from tests.helpers import MODEL, PARENT, ActorStub, error_info, make_model, stage, start_server


async def _until_ok(call, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


class TestEtcdOutage:
    @pytest.mark.parametrize("fault", ["stop", "kill"])
    async def test_unavailable_then_recovers(self, own_etcd, fault):
        """Stopping (or SIGKILLing) etcd makes calls UNAVAILABLE; restarting it heals the
        same server process, with every version, pointer and audit event still there.
        """
        running = await start_server(own_etcd.endpoint, "/outage/", etcd_timeout=1.0)
        try:
            async with grpc.aio.insecure_channel(running.target) as channel:
                stub = ActorStub(channel, "alice")
                await make_model(stub, versions=2)
                await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                    version=2))
                getattr(own_etcd, fault)()

                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.PromoteVersion(svc.PromoteVersionRequest(
                        name=stage("production"), version=2))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "etcd at" in caught.value.details()
                reason, metadata, _ = error_info(caught.value)
                assert reason == "STORE_UNAVAILABLE"
                assert metadata["endpoint"] == own_etcd.endpoint
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetStage(svc.GetStageRequest(name=stage("staging")))
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

                own_etcd.restart()
                got = await _until_ok(lambda: stub.GetStage(
                    svc.GetStageRequest(name=stage("staging"))))
                assert got.stage.version == 2
                moved = await stub.PromoteVersion(svc.PromoteVersionRequest(
                    name=stage("production"), version=2))
                assert moved.stage.version == 2
                versions = await stub.ListModelVersions(
                    svc.ListModelVersionsRequest(parent=f"models/{MODEL}"))
                assert [v.version for v in versions.model_versions] == [1, 2]
                events = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))
                assert len(events.audit_events) == 5  # create model, 2 versions, 2 promotions
        finally:
            await running.stop()


class TestFrozenEtcd:
    async def test_after_one_timeout_calls_fail_fast_until_etcd_answers(self, own_etcd):
        """A frozen etcd (SIGSTOP) costs one call the store's timeout; later calls are refused
        UNAVAILABLE at once (within a client deadline shorter than that timeout), nothing is
        written, and the server answers again once etcd does.
        """
        running = await start_server(own_etcd.endpoint, "/frozen/", etcd_timeout=3.0)
        try:
            async with grpc.aio.insecure_channel(running.target) as channel:
                stub = ActorStub(channel, "alice")
                await make_model(stub, versions=1)
                await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                    version=1))
                os.kill(own_etcd.pid, signal.SIGSTOP)
                try:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.GetStage(svc.GetStageRequest(name=stage("staging")),
                                            timeout=30)
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                    for call in (
                        stub.PromoteVersion(svc.PromoteVersionRequest(
                            name=stage("production"), version=1), timeout=1.5),
                        stub.GetStage(svc.GetStageRequest(name=stage("staging")), timeout=1.5),
                    ):
                        with pytest.raises(grpc.aio.AioRpcError) as caught:
                            await call
                        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                        reason, metadata, _ = error_info(caught.value)
                        assert reason == "STORE_UNAVAILABLE"
                        assert "has not answered" in caught.value.details()
                        assert metadata["endpoint"] == own_etcd.endpoint
                finally:
                    os.kill(own_etcd.pid, signal.SIGCONT)
                got = await _until_ok(lambda: stub.GetStage(
                    svc.GetStageRequest(name=stage("production"))))
                assert got.stage.version == 0  # the refused promotion wrote nothing
                moved = await stub.PromoteVersion(svc.PromoteVersionRequest(
                    name=stage("production"), version=1))
                assert moved.stage.version == 1
        finally:
            await running.stop()
