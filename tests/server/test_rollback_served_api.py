"""Issue 14 against real etcd and real servers: nodes report through FleetService the way the
watcher SDK does; the server records what served and what was refused, durably and once, and a
rollback lands on a version that served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aetcd
import grpc
import pytest

from modelreg.client import AsyncRegistryClient, FailedPreconditionError
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, RunningServer, error_info, make_model, stage, start_server

DIGEST = "DigestMismatchError: file:///models/3.bin: 1290 bytes, more than the registered 1234"


def _report(node_id: str, serving: int, *, failed: int = 0,
            error: str = "") -> fs.ReportNodeRequest:
    """A report as the watcher SDK sends it: one stage, what it serves, what it last failed."""
    return fs.ReportNodeRequest(ttl_seconds=15, node=fs.Node(node_id=node_id, region="eu", stages=[
        fs.ServedStage(stage=stage("production"), serving_version=serving,
                       prepared_version=serving, failed_version=failed, error=error)]))


async def _to_production(stub, version: int) -> None:
    for stage_id in ("staging", "production"):
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage(stage_id), version=version))


async def _etcd_snapshot(etcd: EmbeddedEtcd, prefix: str) -> dict[str, tuple[bytes, int]]:
    async with aetcd.Client(etcd.host, etcd.client_port, timeout=10) as client:
        return {kv.key.decode().removeprefix(prefix): (kv.value, kv.mod_revision)
                for kv in await client.get_prefix(prefix.encode())}


@pytest.fixture
async def fleet(server: RunningServer) -> AsyncIterator[fleet_service_pb2_grpc.FleetServiceStub]:
    """A FleetService stub on the test's server."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield fleet_service_pb2_grpc.FleetServiceStub(channel)


async def _incident(stub, fleet) -> None:
    """v1 served by two nodes, v3 refused by both, v4 promoted and served."""
    await make_model(stub, versions=4)
    await _to_production(stub, 1)
    for node in ("node-a", "node-b"):
        await fleet.ReportNode(_report(node, 1))
    await _to_production(stub, 3)
    for node in ("node-a", "node-b"):
        await fleet.ReportNode(_report(node, 1, failed=3, error=DIGEST))
    await _to_production(stub, 4)
    for node in ("node-a", "node-b"):
        await fleet.ReportNode(_report(node, 4))


class TestRollbackServed:
    async def test_incident_lands_on_served_version_after_nodes_are_gone(
        self, stub, fleet, server
    ):
        """v1 served, v3 refused by every node, v4 promoted; once the nodes are gone (their
        reports deleted) the rollback still skips v3 and lands on v1, and says so in the
        response and in the audit event.
        """
        await _incident(stub, fleet)
        for node in ("node-a", "node-b"):
            await fleet.DeleteNode(fs.DeleteNodeRequest(name=f"nodes/{node}"))
        assert list((await fleet.ListNodes(fs.ListNodesRequest())).nodes) == []
        async with AsyncRegistryClient(server.target, actor="ops") as client:
            resp = await client.rollback(MODEL, "production", reason="v4 p99")
        assert (resp.rolled_back_version, resp.stage.version) == (4, 1)
        assert resp.fleet_evidence
        assert [(s.version, s.reason) for s in resp.skipped] == [(3, res.SKIP_REASON_REFUSED)]
        assert "more than the registered 1234" in resp.skipped[0].detail
        events = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=f"models/{MODEL}"))
        rollback = events.audit_events[0]
        assert rollback.action == res.AUDIT_ACTION_ROLLBACK
        assert (rollback.from_value, rollback.to_value, rollback.actor) == ("4", "1", "ops")
        assert list(rollback.skipped) == list(resp.skipped)
        assert rollback.revision == resp.revision

    async def test_records_are_written_once_per_stage_version_and_outcome(
        self, stub, fleet, server, etcd_server, etcd_prefix
    ):
        """Thirty heartbeats from three nodes through two server processes leave exactly one
        record per (stage, version, outcome), never rewritten.
        """
        await make_model(stub, versions=3)
        await _to_production(stub, 1)
        await _to_production(stub, 3)
        other = await start_server(etcd_server.endpoint, etcd_prefix)
        try:
            async with grpc.aio.insecure_channel(other.target) as channel:
                fleet2 = fleet_service_pb2_grpc.FleetServiceStub(channel)
                await fleet.ReportNode(_report("node-a", 1, failed=3, error=DIGEST))
                first = {k: v for k, v in (await _etcd_snapshot(etcd_server, etcd_prefix)).items()
                         if k.startswith("outcomes/")}
                for _ in range(5):
                    await asyncio.gather(*(
                        stub_.ReportNode(_report(node, 1, failed=3, error=DIGEST))
                        for stub_ in (fleet, fleet2) for node in ("node-a", "node-b", "node-c")))
        finally:
            await other.stop()
        after = {k: v for k, v in (await _etcd_snapshot(etcd_server, etcd_prefix)).items()
                 if k.startswith("outcomes/")}
        assert sorted(after) == [
            f"outcomes/{MODEL}/production/000000000001/served",
            f"outcomes/{MODEL}/production/000000000003/failed",
        ]
        assert after == first  # same values, same mod_revisions: never rewritten

    async def test_named_refused_version_needs_allow_unserved(self, stub, fleet, server,
                                                              etcd_server, etcd_prefix):
        """Naming v3 is FAILED_PRECONDITION VERSION_REFUSED_BY_FLEET naming it, with etcd
        unchanged; with allow_unserved and a reason the client goes there and the audit event
        is marked forced.
        """
        await _incident(stub, fleet)
        before = await _etcd_snapshot(etcd_server, etcd_prefix)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RollbackStage(svc.RollbackStageRequest(name=stage("production"),
                                                              to_version=3))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        reason, metadata, _ = error_info(caught.value)
        assert (reason, metadata) == ("VERSION_REFUSED_BY_FLEET", {"version": "3",
                                                                    "why": "refused"})
        assert "version 3" in (caught.value.details() or "")
        assert {k: v for k, v in (await _etcd_snapshot(etcd_server, etcd_prefix)).items()
                if not k.startswith("nodes/")} == {
            k: v for k, v in before.items() if not k.startswith("nodes/")}
        async with AsyncRegistryClient(server.target) as client:
            with pytest.raises(FailedPreconditionError) as typed:
                await client.rollback(MODEL, "production", to_version=3)
            assert typed.value.reason == "VERSION_REFUSED_BY_FLEET"
            resp = await client.rollback(MODEL, "production", to_version=3, allow_unserved=True,
                                         reason="artifact re-uploaded, verified by hand")
        assert resp.stage.version == 3
        events = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=f"models/{MODEL}"))
        assert events.audit_events[0].forced

    @pytest.mark.parametrize(
        ("request_", "field"),
        [
            (svc.RollbackStageRequest(name=stage("production"), allow_unserved=True,
                                      reason="why"), "allow_unserved"),
            (svc.RollbackStageRequest(name=stage("production"), to_version=3,
                                      allow_unserved=True), "reason"),
            (svc.ClearStageRequest(name=stage("production"), force=True), "reason"),
            (svc.ClearStageRequest(name=stage("production"), reason="x" * 1025), "reason"),
            (svc.ClearStageRequest(name="models/fraud-detector/stages/Prod"), "name"),
            (svc.ClearStageRequest(name=stage("staging"), request_id="\n"), "request_id"),
            (fs.DeleteNodeRequest(name="node-a"), "name"),
            (fs.DeleteNodeRequest(name="nodes/Node_A"), "name"),
            (_report("node-a", -1), "node.stages[0].serving_version"),
            (_report("node-a", 1, failed=-3), "node.stages[0].failed_version"),
        ],
        ids=lambda value: value if isinstance(value, str) else type(value).__name__,
    )
    async def test_new_fields_are_validated(self, stub, fleet, etcd_server, etcd_prefix,
                                            request_, field):
        """Every new request field is checked: INVALID_ARGUMENT with a violation naming it,
        and nothing written.
        """
        await _incident(stub, fleet)
        before = await _etcd_snapshot(etcd_server, etcd_prefix)
        call = {
            svc.RollbackStageRequest: stub.RollbackStage,
            svc.ClearStageRequest: stub.ClearStage,
            fs.DeleteNodeRequest: fleet.DeleteNode,
            fs.ReportNodeRequest: fleet.ReportNode,
        }[type(request_)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request_)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2][0] == field
        assert await _etcd_snapshot(etcd_server, etcd_prefix) == before

    async def test_delete_node_removes_it_at_once(self, stub, fleet):
        """DeleteNode takes a node out of ListNodes and the rollout counts at once; a second
        delete is NOT_FOUND.
        """
        await make_model(stub, versions=1)
        await _to_production(stub, 1)
        await fleet.ReportNode(_report("node-a", 1))
        await fleet.ReportNode(_report("node-b", 1))
        await fleet.DeleteNode(fs.DeleteNodeRequest(name="nodes/node-a"))
        listed = await fleet.ListNodes(fs.ListNodesRequest())
        assert [n.node_id for n in listed.nodes] == ["node-b"]
        status = await fleet.GetRolloutStatus(fs.GetRolloutStatusRequest(name=stage("production")))
        assert status.total_nodes == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fleet.DeleteNode(fs.DeleteNodeRequest(name="nodes/node-a"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
