"""The CLI across regions: ``modelreg regions``, the regional ``modelreg status``, and mutations
through a regional server, with the real ``modelreg`` binary against real servers.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from modelreg.replication import AgentConfig, Replicator
from modelreg.v1 import model_service_pb2 as svc
from tests.helpers import MODEL, make_model, stage
from tests.server.forward_env import address, deployment
from tests.up_process import MODELREG


async def cli(target: str, *args: str) -> tuple[int, str, str]:
    """Runs ``modelreg --target TARGET ARGS``; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        MODELREG, "--target", target, "--actor", "carol", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rows(table: str) -> list[list[str]]:
    """A CLI table's rows (header first), split on runs of two spaces or more."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.strip()]


@pytest.fixture
async def regions(etcd_server, etcd_prefix, tmp_path: Path):
    async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path) as env:
        yield env


async def until_ok(target: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """``modelreg regions --json`` once every region is healthy (the bound stops a hang)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, out, err = await cli(target, "regions", "--json")
        assert code == 0, err
        found = json.loads(out)["regions"]
        if all(r["health"] == "ok" for r in found):
            return found
        assert loop.time() < deadline, f"regions never all ok: {found}"
        await asyncio.sleep(0.2)


class TestRegionsCommand:
    async def test_lists_every_region_with_health_and_lag(
        self, etcd_server, etcd_prefix, own_etcd, tmp_path: Path
    ):
        """`modelreg regions`, asked of eu, lists us (primary, no lag) and eu (its
        replicator's lag, the primary reachable), each asked through its own server; --json
        has the same in the API's field names.
        """
        config = AgentConfig(primary=(etcd_server.endpoint,), region_etcd=(own_etcd.endpoint,),
                             region="eu", prefix=etcd_prefix, replica_id="r1", lease_ttl=2,
                             probe_interval=0.2, idle_flush=0.1, status_interval=0.2)
        async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path,
                              eu_etcd=own_etcd.endpoint) as env, Replicator(config):
            found = await until_ok(env.eu.target)
            assert [(r["name"], r["primary"], r["server"]) for r in found] == [
                ("regions/us", True, env.us[0].target), ("regions/eu", False, env.eu.target)]
            us, eu = found
            assert us["servers"] == env.primary_addresses and us["error"] is None
            assert us["status"]["lag"]["revisions"] == 0 and us["status"]["applied_revision"] > 0
            assert eu["status"]["primary_reachable"] is True
            assert eu["status"]["primary_region"] == "regions/us"
            assert eu["status"]["lag"]["current"] is True

            code, out, _ = await cli(env.eu.target, "regions")
            assert code == 0
            table = rows(out)
            assert table[0] == ["REGION", "ROLE", "HEALTH", "APPLIED", "LAG REVISIONS",
                                "LAG SECONDS", "REACHES PRIMARY", "SERVER", "DETAIL"]
            assert [row[:3] for row in table[1:]] == [["us", "primary", "ok"],
                                                      ["eu", "replica", "ok"]]

    async def test_a_region_without_an_answer_is_shown_not_fatal(self, regions):
        """With the primary's servers stopped, `modelreg regions` through eu still answers:
        us unreachable with the error, eu degraded because it cannot reach the primary.
        """
        for server in regions.us:
            await server.stop()
        code, out, err = await cli(regions.eu.target, "regions", "--json")
        assert code == 0, err
        us, eu = json.loads(out)["regions"]
        assert (us["health"], us["status"], us["error"]["code"]) == (
            "unreachable", None, "UNAVAILABLE")
        assert eu["health"] == "degraded" and eu["status"]["primary_reachable"] is False
        code, out, _ = await cli(regions.eu.target, "regions")
        by_region = {row[0]: row for row in rows(out)[1:]}
        assert by_region["us"][2] == "unreachable" and by_region["eu"][2] == "degraded"
        assert "primary unreachable" in by_region["eu"][-1]

    async def test_one_region_without_a_topology(self, server):
        """A server without a topology is the one region, `default`, the primary, ok."""
        code, out, _ = await cli(server.target, "regions", "--json")
        assert code == 0
        (only,) = json.loads(out)["regions"]
        assert (only["name"], only["primary"], only["health"]) == ("regions/default", True, "ok")


class TestStatusAcrossRegions:
    async def test_status_shows_each_region_version_and_lag(self, regions):
        """`modelreg status MODEL` with regions adds a stage-by-region table of versions and
        the regions' health; --json keeps the stages on top and adds them per region.
        """
        us = regions.model_stub(regions.us[0])
        await make_model(us, versions=1)
        await us.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=1))
        code, out, err = await cli(regions.eu.target, "status", MODEL)
        assert code == 0, err
        local, by_region, health = out.strip().split("\n\n")
        assert rows(local)[0][:2] == ["STAGE", "VERSION"]
        assert rows(by_region)[0] == ["STAGE", "US*", "EU"]
        assert ["staging", "v1", "v1"] in rows(by_region)
        assert [r[0] for r in rows(health)[1:]] == ["us", "eu"]

        code, out, _ = await cli(regions.eu.target, "status", MODEL, "--json")
        data = json.loads(out)
        assert {s["name"]: s["version"] for s in data["stages"]}[stage("staging")] == 1
        assert [r["name"] for r in data["regions"]] == ["regions/us", "regions/eu"]
        assert all({s["name"]: s["version"] for s in r["stages"]}[stage("staging")] == 1
                   for r in data["regions"])

    async def test_a_missing_model_fails_as_before(self, regions):
        """`modelreg status` of a model that does not exist exits 1, as without regions."""
        code, _, err = await cli(regions.eu.target, "status", "no-such-model", "--json")
        assert code == 1 and json.loads(err)["error"]["code"] == "NOT_FOUND"


class TestMutationsThroughARegion:
    async def test_promote_through_eu_and_with_the_primary_down(self, regions):
        """`modelreg promote` through eu commits on the primary (same etag there); with the
        primary's servers stopped it exits 3 with PRIMARY_UNAVAILABLE naming the primary,
        while `modelreg status` through eu still answers.
        """
        us = regions.model_stub(regions.us[0])
        await make_model(us, versions=2)
        code, out, err = await cli(regions.eu.target, "promote", MODEL, "staging", "1",
                                   "--reason", "via eu", "--json")
        assert code == 0, err
        promoted = json.loads(out)
        on_primary = await us.GetStage(svc.GetStageRequest(name=stage("staging")))
        assert f'"{promoted["stage"]["etag"]}"' == on_primary.stage.etag
        assert on_primary.stage.updated_by == "carol"

        for server in regions.us:
            await server.stop()
        code, _, err = await cli(regions.eu.target, "promote", MODEL, "staging", "2", "--json")
        assert code == 3
        error = json.loads(err)["error"]
        assert (error["code"], error["reason"]) == ("UNAVAILABLE", "PRIMARY_UNAVAILABLE")
        assert error["metadata"]["primary"] == "us"
        code, out, err = await cli(regions.eu.target, "stages", "list", MODEL, "--json")
        assert code == 0, err
        assert {s["name"]: s["version"] for s in json.loads(out)["stages"]}[
            stage("staging")] == 1

    async def test_a_region_listing_only_dead_servers(self, etcd_server, etcd_prefix, tmp_path):
        """A primary whose listed servers are all down makes eu's mutations fail fast (exit
        3) and its row in `modelreg regions` unreachable.
        """
        async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path, primary_servers=0,
                              dead_primary_addresses=[address(), address()]) as env:
            code, _, err = await cli(env.eu.target, "models", "create", MODEL, "--json")
            assert code == 3 and json.loads(err)["error"]["reason"] == "PRIMARY_UNAVAILABLE"
            code, out, _ = await cli(env.eu.target, "regions", "--json")
            assert [r["health"] for r in json.loads(out)["regions"]] == ["unreachable",
                                                                         "degraded"]
