"""The fleet view: node reports on leases, node listings and rollout status."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from tests.helpers import MODEL, error_info, make_model, stage


def _report(node_id: str, serving: int, *, region: str = "eu", prepared: int = 0,
            failed: int = 0, error: str = "") -> fs.ReportNodeRequest:
    return fs.ReportNodeRequest(ttl_seconds=5, node=fs.Node(
        node_id=node_id, region=region, labels={"pool": "a"},
        stages=[fs.ServedStage(stage=stage("production"), serving_version=serving,
                               prepared_version=prepared or serving, failed_version=failed,
                               error=error)]))


class TestFleet:
    async def test_rollout_status_counts_live_nodes(self, stub, server):
        """Rollout status counts the nodes serving the committed version and names the rest;
        a node that stops reporting is gone once its lease expires.
        """
        await make_model(stub, versions=2)
        for v in (1, 2):
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=v))
            await stub.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("production"), version=v))
        async with grpc.aio.insecure_channel(server.target) as channel:
            fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
            await fleet.ReportNode(_report("node-a", 2))
            await fleet.ReportNode(_report("node-b", 2, region="us"))
            await fleet.ReportNode(_report("node-c", 1, failed=2, error="sha256 mismatch"))
            status = await fleet.GetRolloutStatus(
                fs.GetRolloutStatusRequest(name=stage("production")))
            assert status.stage.version == 2 and status.total_nodes == 3
            assert [(c.version, c.nodes) for c in status.serving] == [(2, 2), (1, 1)]
            assert [n.node_id for n in status.lagging] == ["node-c"]
            assert "2/3 nodes serve v2" in status.summary
            assert "node-c (v1, v2 failed: sha256 mismatch)" in status.summary
            eu = await fleet.GetRolloutStatus(
                fs.GetRolloutStatusRequest(name=stage("production"), region="eu"))
            assert eu.total_nodes == 2
            listed = await fleet.ListNodes(fs.ListNodesRequest(model=MODEL, region="us"))
            assert [n.name for n in listed.nodes] == ["nodes/node-b"]

            async with asyncio.timeout(20):  # node-b and node-c stop reporting
                while True:
                    await fleet.ReportNode(_report("node-a", 2))
                    listed = await fleet.ListNodes(fs.ListNodesRequest())
                    if [n.node_id for n in listed.nodes] == ["node-a"]:
                        break
                    await asyncio.sleep(1)
            status = await fleet.GetRolloutStatus(
                fs.GetRolloutStatusRequest(name=stage("production")))
            assert status.total_nodes == 1 and not status.lagging

    async def test_bad_reports_are_refused(self, server):
        """A report with a bad node id, stage or TTL is INVALID_ARGUMENT naming the fields."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
            bad = fs.ReportNodeRequest(ttl_seconds=1, node=fs.Node(
                node_id="Node_1", stages=[fs.ServedStage(stage="models/fraud/stages/latest")]))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await fleet.ReportNode(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == [
            "node.node_id", "node.stages[0].stage", "ttl_seconds"]
