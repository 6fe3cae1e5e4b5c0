"""Three serving nodes in their own processes; one is SIGKILLed and leaves the fleet view."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, stage

NODE = Path(__file__).parents[1] / "node_process.py"


async def _register(stub, directory: Path, n: int) -> None:
    path = directory / f"artifact-{n}.bin"
    path.write_bytes(f"model {n}".encode() * 100)
    data = path.read_bytes()
    await stub.CreateModelVersion(svc.CreateModelVersionRequest(
        parent=f"models/{MODEL}", model_version=res.ModelVersion(
            artifact_uri=path.as_uri(), sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data))))


async def _until(check, timeout: float = 30.0):
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.2)
    return result


class TestFleetProcesses:
    async def test_killed_node_leaves_and_counts_stay_right(self, stub, server, tmp_path):
        """Three nodes follow production; after a promotion all serve v2; one is SIGKILLed
        and, once its lease expires, is gone from the node list and the rollout counts.
        """
        await stub.CreateModel(svc.CreateModelRequest(model_id=MODEL))
        for n in (1, 2):
            await _register(stub, tmp_path, n)
        for n in (1,):
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=n))
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("production"),
                                                                version=n))
        nodes = {}
        try:
            for i, region in enumerate(["eu", "eu", "us"]):
                node_id = f"node-{i}"
                nodes[node_id] = await asyncio.create_subprocess_exec(
                    sys.executable, str(NODE), server.target, MODEL, "production", node_id,
                    region, str(tmp_path / node_id),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
            async with grpc.aio.insecure_channel(server.target) as channel:
                fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)

                async def rollout(expect_total: int, expect_version: int):
                    status = await fleet.GetRolloutStatus(
                        fs.GetRolloutStatusRequest(name=stage("production")))
                    serving = [(c.version, c.nodes) for c in status.serving]
                    return status if serving == [(expect_version, expect_total)] and \
                        status.total_nodes == expect_total else None

                await _until(lambda: rollout(3, 1))
                await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                    version=2))
                await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("production"),
                                                                    version=2))
                status = await _until(lambda: rollout(3, 2))
                assert "3/3 nodes serve v2" in status.summary

                nodes["node-1"].send_signal(signal.SIGKILL)
                await nodes["node-1"].wait()
                status = await _until(lambda: rollout(2, 2))
                assert status.lagging == []
                listed = await fleet.ListNodes(fs.ListNodesRequest())
                assert sorted(n.node_id for n in listed.nodes) == ["node-0", "node-2"]
                eu = await fleet.ListNodes(fs.ListNodesRequest(region="eu"))
                assert [n.node_id for n in eu.nodes] == ["node-0"]
        finally:
            for proc in nodes.values():
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
