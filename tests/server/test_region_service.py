"""RegionService: the topology as a server knows it, and its own region's health and lag."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from modelreg.replication import AgentConfig, Replicator
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1 import region_service_pb2_grpc
from tests.helpers import error_info, make_model
from tests.server.forward_env import deployment


async def eventually(check, what: str, timeout: float = 60.0):
    """Polls ``check()`` (async) until it returns something true; the bound only stops a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert loop.time() < deadline, f"{what} never happened"
        await asyncio.sleep(0.05)


class TestOneRegion:
    async def test_a_server_without_topology_is_its_own_primary(self, server):
        """Without a topology the server lists one region, `regions/default`, the primary,
        current with its store and never behind.
        """
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = region_service_pb2_grpc.RegionServiceStub(channel)
            listed = await stub.ListRegions(rs.ListRegionsRequest())
            assert [(r.name, r.primary) for r in listed.regions] == [("regions/default", True)]
            assert listed.region == "regions/default" and not listed.next_page_token
            got = await stub.GetRegionStatus(rs.GetRegionStatusRequest(name="regions/default"))
            status = got.region_status
            assert (status.primary, status.primary_reachable, status.primary_region) == (
                True, True, "regions/default")
            assert status.applied_revision == got.revision > 0
            assert (status.lag.revisions, status.lag.seconds, status.lag.current) == (0, 0, True)


@pytest.fixture
async def regions(etcd_server, etcd_prefix, tmp_path: Path):
    async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path) as env:
        yield env


class TestTopology:
    async def test_every_server_lists_the_topology(self, regions):
        """Servers of both regions list us (the primary) and eu with their servers, in the
        file's order, and say which region answered; pages follow their tokens.
        """
        for server, own in ((regions.us[0], "regions/us"), (regions.eu, "regions/eu")):
            listed = await regions.region_stub(server).ListRegions(rs.ListRegionsRequest())
            assert [(r.name, r.primary, list(r.servers)) for r in listed.regions] == [
                ("regions/us", True, regions.primary_addresses),
                ("regions/eu", False, [regions.eu.target]),
            ]
            assert listed.region == own
        stub = regions.region_stub(regions.eu)
        first = await stub.ListRegions(rs.ListRegionsRequest(page_size=1))
        second = await stub.ListRegions(rs.ListRegionsRequest(
            page_size=1, page_token=first.next_page_token))
        assert [r.name for r in (*first.regions, *second.regions)] == ["regions/us",
                                                                       "regions/eu"]
        assert first.next_page_token and not second.next_page_token

    @pytest.mark.parametrize(("name", "code", "reason"), [
        ("regions/us", grpc.StatusCode.FAILED_PRECONDITION, "NOT_THIS_REGION"),
        ("regions/ap", grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        ("eu", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ])
    async def test_a_server_answers_for_its_own_region_only(self, regions, name, code, reason):
        """Asking eu's server about another region names that region's servers; an unknown
        or malformed name is refused as such.
        """
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await regions.region_stub(regions.eu).GetRegionStatus(
                rs.GetRegionStatusRequest(name=name))
        assert err.value.code() == code
        got_reason, metadata, _ = error_info(err.value)
        assert got_reason == reason
        if reason == "NOT_THIS_REGION":
            assert metadata == {"region": "regions/us",
                                "servers": ",".join(regions.primary_addresses)}

    async def test_a_bad_page_token_is_invalid(self, regions):
        """A page token from nowhere is refused INVALID_ARGUMENT naming page_token."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await regions.region_stub(regions.eu).ListRegions(
                rs.ListRegionsRequest(page_token="bm9wZQ=="))
        assert error_info(err.value)[2] == ["page_token"]


class TestRegionalStatus:
    async def test_the_region_says_whether_it_reaches_the_primary(self, regions):
        """The status of eu names the primary and says it is reachable; once the primary's servers
        stop, it says it is not, while still answering.
        """
        stub = regions.region_stub(regions.eu)
        status = (await stub.GetRegionStatus(rs.GetRegionStatusRequest())).region_status
        assert (status.name, status.primary, status.primary_region) == (
            "regions/eu", False, "regions/us")
        assert status.primary_reachable and not status.HasField("lag")
        await regions.us[0].stop()
        status = (await stub.GetRegionStatus(rs.GetRegionStatusRequest())).region_status
        assert not status.primary_reachable and status.applied_revision > 0

    async def test_lag_comes_from_the_region_replicator(
        self, etcd_server, etcd_prefix, own_etcd, tmp_path: Path
    ):
        """With a real replicator copying the primary into eu's etcd, eu's status carries its
        lag figures, current while it runs and marked overdue once it stops.
        """
        config = AgentConfig(primary=(etcd_server.endpoint,), region_etcd=(own_etcd.endpoint,),
                             region="eu", prefix=etcd_prefix, replica_id="r1", lease_ttl=2,
                             probe_interval=0.2, idle_flush=0.1, status_interval=0.2)
        async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path,
                              eu_etcd=own_etcd.endpoint) as env:
            stub = env.region_stub(env.eu)
            await make_model(env.model_stub(env.us[0]), versions=1)

            async def lag(current: bool) -> rs.ReplicationLag | None:
                status = (await stub.GetRegionStatus(rs.GetRegionStatusRequest())).region_status
                ok = status.HasField("lag") and status.lag.current == current
                return status.lag if ok else None

            async with Replicator(config):
                running = await eventually(lambda: lag(True), "a current status record")
                assert running.revisions >= 0 and running.primary_revision > 0
                assert running.update_time.seconds > 0
            stopped = await eventually(lambda: lag(False), "an overdue status record")
            assert stopped.seconds >= 0
