"""Compare-and-swap under real concurrency: one winner per etag, one production version."""

from __future__ import annotations

import asyncio
import itertools
import random

import aetcd
import grpc
import pytest

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, PARENT, error_info, make_model, stage


async def _promote(stub, version: int, etag: str = "") -> object:
    try:
        return await stub.PromoteVersion(svc.PromoteVersionRequest(
            name=stage("production"), version=version, etag=etag, hotfix=True,
            reason=f"race {version}"))
    except grpc.aio.AioRpcError as err:
        return err


class TestCompareAndSwap:
    async def test_sixteen_promotions_with_one_etag(self, stub):
        """16 concurrent promotions with the same etag: exactly one wins, 15 are ABORTED."""
        await make_model(stub, versions=16)
        current = await stub.GetStage(svc.GetStageRequest(name=stage("production")))
        before = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))
        results = await asyncio.gather(
            *(_promote(stub, v, current.stage.etag) for v in range(1, 17)))
        wins = [r for r in results if isinstance(r, svc.PromoteVersionResponse)]
        losses = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(wins) == 1 and len(losses) == 15
        for err in losses:
            assert err.code() == grpc.StatusCode.ABORTED
            reason, metadata, _ = error_info(err)
            assert reason == "ETAG_MISMATCH"
            assert metadata["current_etag"] == wins[0].stage.etag
        final = await stub.GetStage(svc.GetStageRequest(name=stage("production")))
        assert final.stage.version == wins[0].stage.version
        after = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))
        assert len(after.audit_events) - len(before.audit_events) == 1

    async def test_interleavings_leave_one_production_version(self, stub, server):
        """Rounds of racing promotions with and without etags, on two connections: the audit
        trail counts exactly the successful moves and the history replays to the final pointer.
        """
        await make_model(stub, versions=8)
        rng = random.Random(7)
        successes = 0
        async with grpc.aio.insecure_channel(server.target) as other:
            from tests.helpers import ActorStub

            stubs = [stub, ActorStub(other, "bob")]
            for _ in range(6):
                current = await stub.GetStage(svc.GetStageRequest(name=stage("production")))
                calls = [
                    _promote(rng.choice(stubs), v, current.stage.etag if rng.random() < 0.5 else "")
                    for v in rng.sample(range(1, 9), 5)
                ]
                results = await asyncio.gather(*calls)
                for r in results:
                    if isinstance(r, grpc.aio.AioRpcError):
                        assert r.code() in (grpc.StatusCode.ABORTED,
                                            grpc.StatusCode.FAILED_PRECONDITION), r
                    else:
                        successes += 1
        events = await stub.ListAuditEvents(
            svc.ListAuditEventsRequest(parent=PARENT, page_size=1000))
        promotes = [e for e in events.audit_events if e.action == res.AUDIT_ACTION_PROMOTE]
        assert len(promotes) == successes
        history = await stub.ListStageHistory(
            svc.ListStageHistoryRequest(name=stage("production"), page_size=1000))
        assert len(history.entries) == successes
        chain = list(reversed(history.entries))
        for earlier, later in itertools.pairwise(chain):
            assert later.from_version == earlier.to_version  # no lost or forked update
        final = await stub.GetStage(svc.GetStageRequest(name=stage("production")))
        assert final.stage.version == chain[-1].to_version
        assert final.stage.generation == successes

    async def test_one_production_key_in_etcd(self, stub, etcd_server, etcd_prefix):
        """Etcd itself holds exactly one production pointer naming one version."""
        await make_model(stub, versions=3)
        await asyncio.gather(*(_promote(stub, v) for v in (1, 2, 3)))
        async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
            rows = await client.get_prefix(f"{etcd_prefix}stages/{MODEL}/".encode())
            pointers = [res.StagePointer.FromString(kv.value) for kv in rows]
        assert len(pointers) == 1 and pointers[0].version in (1, 2, 3)


class TestIdempotency:
    async def test_same_request_id_applied_once(self, stub):
        """A retried request_id returns the first response and writes nothing more."""
        await make_model(stub, versions=2)
        request = svc.PromoteVersionRequest(name=stage("staging"), version=1, request_id="req-1")
        first = await stub.PromoteVersion(request)
        again = await stub.PromoteVersion(request)
        assert again == first
        history = await stub.ListStageHistory(svc.ListStageHistoryRequest(name=stage("staging")))
        assert len(history.entries) == 1
        create = svc.CreateModelVersionRequest(
            parent=f"models/{MODEL}", model_version=res.ModelVersion(
                artifact_uri="file:///m3", sha256="c" * 64, size_bytes=3), request_id="req-2")
        a, b = await asyncio.gather(
            stub.CreateModelVersion(create), stub.CreateModelVersion(create))
        assert a.model_version.version == b.model_version.version == 3
        listed = await stub.ListModelVersions(
            svc.ListModelVersionsRequest(parent=f"models/{MODEL}"))
        assert len(listed.model_versions) == 3

    async def test_request_id_reused_for_another_request(self, stub):
        """Reusing a request_id for a different request is INVALID_ARGUMENT on request_id."""
        await make_model(stub, versions=2)
        await stub.PromoteVersion(
            svc.PromoteVersionRequest(name=stage("staging"), version=1, request_id="req-x"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("staging"), version=2, request_id="req-x"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["request_id"]
        got = await stub.GetStage(svc.GetStageRequest(name=stage("staging")))
        assert got.stage.version == 1

    async def test_request_records_expire(self, stub, etcd_server, etcd_prefix):
        """Idempotency records sit on an etcd lease of at least a day, so they do not pile up."""
        await make_model(stub, versions=1)
        await stub.PromoteVersion(
            svc.PromoteVersionRequest(name=stage("staging"), version=1, request_id="req-ttl"))
        async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
            records = list(await client.get_prefix(f"{etcd_prefix}requests/".encode()))
            assert len(records) == 1
            assert records[0].lease != 0
            info = await client.get_lease_info(records[0].lease)
        assert 24 * 3600 <= info.TTL <= 25 * 3600
