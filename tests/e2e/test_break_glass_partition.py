"""Break glass in a running multi-region cluster, through the real CLI: with every link to the
primary cut, an operator pins production in eu (`modelreg rollback --local`); eu serves the
pinned version to its watch streams and `modelreg status` says so loudly, while us keeps its
own; once the links heal, the pin's audit event reaches the primary (and every region); the
pin stays until `modelreg stages unpin`, after which eu follows the primary again.

Real processes throughout, as ``test_regions_partition``: ``modelreg up --regions us,eu`` (an
etcd, a server and, in eu, a replicator per region; a latency proxy on every link), faults are
the proxy's cut.
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
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc
from tests.e2e.regions_env import options
from tests.helpers import MODEL, ActorStub, make_model, stage
from tests.up_process import MODELREG

pytestmark = pytest.mark.slow
PRODUCTION = stage("production")


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    """Regions us (primary) and eu, 5 ms links, bookmarks every 0.3 s; stopped at teardown."""
    monkeypatch.setenv("MODELREG_BOOKMARK_INTERVAL", "0.3")
    c = Cluster(options(tmp_path / "c", ("us", "eu"), latency=0.005))
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def _changes(stream: AsyncIterator[ws.WatchStagesResponse]) -> ws.WatchStagesResponse:
    async with asyncio.timeout(30):
        async for message in stream:
            if message.type == ws.WATCH_MESSAGE_TYPE_CHANGES:
                return message
    raise AssertionError("the watch stream ended")


async def _eventually(check: object, what: str, timeout: float = 60.0) -> object:
    """Runs ``check`` (a blocking callable, in a thread) until it returns something truthy."""
    assert callable(check)
    async with asyncio.timeout(timeout):
        while True:
            found = await asyncio.to_thread(check)
            if found:
                return found
            await asyncio.sleep(0.2)
    raise AssertionError(what)


class TestBreakGlassWithThePrimaryCutOff:
    async def test_pin_in_eu_is_served_shown_reported_and_cleared(self, cluster: Cluster) -> None:
        """Cut off from the primary, `modelreg rollback --local --region eu` pins production to
        v1 through eu's server: eu's watch stream gets the pinned pointer, `modelreg status`
        marks eu's cell PINNED and warns, us still serves v2; after the heal the pin's event is
        in the primary's audit log with its actor and region (and in eu's, once), the pin still
        in force; `modelreg stages unpin` makes eu follow v2 again, and that is reported too.
        """
        us_addr, eu_addr = cluster.regions["us"].listen, cluster.regions["eu"].listen

        def cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([MODELREG, "--target", target, "--actor", "oncall", *args],
                                  capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)

        async with grpc.aio.insecure_channel(us_addr) as c_us, \
                grpc.aio.insecure_channel(eu_addr) as c_eu:
            us, eu = ActorStub(c_us, "alice"), ActorStub(c_eu, "alice")
            await make_model(us, versions=2)
            for n in (1, 2):
                await us.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=n))
                moved = await us.PromoteVersion(svc.PromoteVersionRequest(name=PRODUCTION,
                                                                          version=n))
            await eu.GetStage(svc.GetStageRequest(name=PRODUCTION), metadata=(
                ("x-modelreg-actor", "alice"), ("x-modelreg-min-revision", str(moved.revision))))
            stream = watch_service_pb2_grpc.WatchServiceStub(c_eu).WatchStages(
                ws.WatchStagesRequest(models=[MODEL], stages=["production"]),
                metadata=(("x-modelreg-actor", "alice"),))
            try:
                cluster.cut()
                refused = await asyncio.to_thread(cli, eu_addr, "rollback", MODEL, "production",
                                                  "--reason", "v2 corrupts scores")
                assert refused.returncode == 3, refused.stderr  # the primary is unreachable
                no_reason = await asyncio.to_thread(cli, eu_addr, "rollback", MODEL,
                                                    "production", "--local", "--region", "eu")
                assert no_reason.returncode == 2, no_reason.stderr
                wrong = await asyncio.to_thread(cli, eu_addr, "rollback", MODEL, "production",
                                                "--local", "--region", "us", "--reason", "x")
                assert wrong.returncode == 1 and "NOT_THIS_REGION" in wrong.stderr
                pinned = await asyncio.to_thread(cli, eu_addr, "rollback", MODEL, "production",
                                                 "--local", "--region", "eu",
                                                 "--reason", "v2 corrupts scores")
                assert pinned.returncode == 0, pinned.stderr
                assert "PINNED (break glass) in eu to v1" in pinned.stdout

                async with asyncio.timeout(30):
                    while True:
                        change = await _changes(stream)
                        if change.local_change:
                            break
                assert [(c.stage.version, c.stage.local_pin.region) for c in change.changes] == [
                    (1, "regions/eu")]
                status = await asyncio.to_thread(cli, eu_addr, "status", MODEL)
                assert status.returncode == 0, status.stderr
                rows = [line.split() for line in status.stdout.splitlines()]
                assert ["production", "?", "v1[PINNED]"] in rows  # us* (cut off: no answer), eu
                assert "WARNING: production is PINNED (break glass) in eu to v1" in status.stdout
                in_us = await us.GetStage(svc.GetStageRequest(name=PRODUCTION))
                assert in_us.stage.version == 2 and not in_us.stage.HasField("local_pin")
            finally:
                stream.cancel()

            cluster.heal()

            def on_primary() -> list[dict[str, object]]:
                done = cli(us_addr, "--json", "audit", "--model", MODEL)
                events = json.loads(done.stdout)["audit_events"] if done.returncode == 0 else []
                return [e for e in events if str(e["action"]).startswith("break_glass")]
            events = await _eventually(on_primary, "the pin reported to the primary")
            assert isinstance(events, list)
            assert [(e["action"], e["actor"], e["region"], e["to_value"]) for e in events] == [
                ("break_glass_pin", "oncall", "regions/eu", "1")]
            read = await eu.GetStage(svc.GetStageRequest(name=PRODUCTION))
            assert read.stage.version == 1  # in force until cleared

            def eu_once() -> bool:
                done = cli(eu_addr, "--json", "audit", "--model", MODEL)
                found = [e for e in json.loads(done.stdout)["audit_events"]
                         if str(e["action"]).startswith("break_glass")]
                return len(found) == 1 and bool(found[0].get("report_time"))
            await _eventually(eu_once, "the primary's copy of the event replicated to eu")

            unpinned = await asyncio.to_thread(cli, eu_addr, "stages", "unpin", MODEL,
                                               "production", "--region", "eu",
                                               "--reason", "v2 fixed upstream")
            assert unpinned.returncode == 0, unpinned.stderr
            read = await eu.GetStage(svc.GetStageRequest(name=PRODUCTION))
            assert read.stage.version == 2 and not read.stage.HasField("local_pin")

            def both() -> bool:
                return len(on_primary()) == 2
            await _eventually(both, "the unpin reported to the primary")
