"""Flows of a running multi-region cluster: the primary cut off through the latency proxy (a
region keeps serving what it has, refuses mutations at once, and converges when the link
heals), and the fleet's rollout added up across regions by the CLI.

Real processes throughout: the cluster ``modelreg up --regions us,eu`` runs (an etcd, a server
and, in eu, a replicator per region; a proxy on every link between them), with eu's server on
the regional store.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from modelreg.server.regions_cluster import Cluster
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc, watch_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import watch_service_pb2 as ws
from tests.e2e.regions_env import options
from tests.helpers import MODEL, ActorStub, error_info, make_model, stage
from tests.up_process import MODELREG

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """Regions us (primary) and eu, 5 ms links, bookmarks every 0.3 s; stopped at teardown."""
    monkeypatch.setenv("MODELREG_BOOKMARK_INTERVAL", "0.3")  # the servers' environment
    c = Cluster(options(tmp_path / "c", ("us", "eu"), latency=0.005))
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def _next(stream: AsyncIterator[ws.WatchStagesResponse], kind: int) -> ws.WatchStagesResponse:
    async with asyncio.timeout(30):
        async for message in stream:
            if message.type == kind:
                return message
    raise AssertionError("the watch stream ended")


class TestPrimaryCutOff:
    async def test_reads_watches_and_bookmarks_go_on_mutations_fail_fast_then_converge(
        self, cluster: Cluster
    ) -> None:
        """With every link cut, eu answers reads from its replica, its watch stream keeps
        bookmarking, and a promotion through it fails UNAVAILABLE PRIMARY_UNAVAILABLE with
        nothing written; once healed, a promotion through eu commits on the primary, reaches
        eu's stream, and both regions read the same pointer and etag.
        """
        us_addr, eu_addr = cluster.regions["us"].listen, cluster.regions["eu"].listen
        async with grpc.aio.insecure_channel(us_addr) as c_us, \
                grpc.aio.insecure_channel(eu_addr) as c_eu:
            us, eu = ActorStub(c_us, "alice"), ActorStub(c_eu, "alice")
            await make_model(eu, versions=2)
            promoted = await eu.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("staging"), version=1))
            fresh = (("x-modelreg-actor", "alice"),
                     ("x-modelreg-min-revision", str(promoted.revision)))
            before = await eu.GetStage(svc.GetStageRequest(name=stage("staging")),
                                       metadata=fresh)
            assert (before.stage.version, before.stage.etag) == (1, promoted.stage.etag)

            stream = watch_service_pb2_grpc.WatchServiceStub(c_eu).WatchStages(
                ws.WatchStagesRequest(models=[MODEL], stages=["staging"]),
                metadata=(("x-modelreg-actor", "alice"),))
            try:
                await _next(stream, ws.WATCH_MESSAGE_TYPE_SNAPSHOT)
                cluster.cut()

                read = await eu.GetStage(svc.GetStageRequest(name=stage("staging")))
                assert read.stage.version == 1
                first = await _next(stream, ws.WATCH_MESSAGE_TYPE_BOOKMARK)
                second = await _next(stream, ws.WATCH_MESSAGE_TYPE_BOOKMARK)
                assert second.revision >= first.revision >= promoted.revision
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await eu.PromoteVersion(
                        svc.PromoteVersionRequest(name=stage("staging"), version=2))
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                reason, metadata, _ = error_info(refused.value)
                assert (reason, metadata["primary"]) == ("PRIMARY_UNAVAILABLE", "us")
                on_primary = await us.GetStage(svc.GetStageRequest(name=stage("staging")))
                assert on_primary.stage.etag == promoted.stage.etag  # nothing was written

                cluster.heal()
                moved = None
                async with asyncio.timeout(60):
                    while moved is None:
                        try:
                            moved = await eu.PromoteVersion(
                                svc.PromoteVersionRequest(name=stage("staging"), version=2))
                        except grpc.aio.AioRpcError as err:
                            if err.code() != grpc.StatusCode.UNAVAILABLE:
                                raise
                            await asyncio.sleep(0.2)
                change = await _next(stream, ws.WATCH_MESSAGE_TYPE_CHANGES)
                assert change.revision == moved.revision
                assert [c.stage.version for c in change.changes] == [2]
            finally:
                stream.cancel()
            fresh = (("x-modelreg-actor", "alice"),
                     ("x-modelreg-min-revision", str(moved.revision)))
            in_eu = await eu.GetStage(svc.GetStageRequest(name=stage("staging")), metadata=fresh)
            in_us = await us.GetStage(svc.GetStageRequest(name=stage("staging")))
            assert (in_eu.stage.version, in_eu.stage.etag) == (2, in_us.stage.etag)
            assert in_us.stage.etag == moved.stage.etag


def _report(node_id: str, region: str, serving: int) -> fs.ReportNodeRequest:
    return fs.ReportNodeRequest(ttl_seconds=60, node=fs.Node(
        node_id=node_id, region=region,
        stages=[fs.ServedStage(stage=stage("staging"), serving_version=serving)]))


class TestRolloutAcrossRegions:
    async def test_rollout_adds_up_every_regions_fleet(self, cluster: Cluster) -> None:
        """Node reports stay in their region; `modelreg rollout` asked of eu's server shows each
        region's nodes and the total, in a table and as JSON.
        """
        us_addr, eu_addr = cluster.regions["us"].listen, cluster.regions["eu"].listen
        async with grpc.aio.insecure_channel(us_addr) as c_us, \
                grpc.aio.insecure_channel(eu_addr) as c_eu:
            us = ActorStub(c_us, "alice")
            await make_model(us, versions=2)
            moved = await us.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("staging"), version=2))
            await ActorStub(c_eu, "alice").GetStage(
                svc.GetStageRequest(name=stage("staging")),
                metadata=(("x-modelreg-actor", "alice"),
                          ("x-modelreg-min-revision", str(moved.revision))))
            fleet_us = fleet_service_pb2_grpc.FleetServiceStub(c_us)
            fleet_eu = fleet_service_pb2_grpc.FleetServiceStub(c_eu)
            for node_id, serving in (("us-1", 2), ("us-2", 1)):
                await fleet_us.ReportNode(_report(node_id, "us", serving))
            for node_id in ("eu-1", "eu-2", "eu-3"):
                await fleet_eu.ReportNode(_report(node_id, "eu", 2))

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([MODELREG, "--target", eu_addr, *args], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)

        done = await asyncio.to_thread(cli, "--json", "rollout", MODEL, "staging")
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert (got["total_nodes"], got["on_committed"]) == (5, 4)
        per_region = {e["region"]: e["rollout"]["total_nodes"] for e in got["regions"]}
        assert per_region == {"us": 2, "eu": 3}
        done = await asyncio.to_thread(cli, "rollout", MODEL, "staging")
        assert done.returncode == 0, done.stderr
        rows = [line.split()[:4] for line in done.stdout.splitlines()]
        assert rows[0] == ["REGION", "COMMITTED", "NODES", "ON"]
        assert ["us", "v2", "2", "1"] in rows and ["eu", "v2", "3", "3"] in rows
        assert ["all", "-", "5", "4"] in rows
        assert "us-2" in done.stdout  # us's lagging node, under its region

