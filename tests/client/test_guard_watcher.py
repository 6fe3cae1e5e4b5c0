"""The rollout guard through the watcher SDK (issue 9, item 8): serving nodes publish health
figures (``set_health``) with their fleet reports; when the figures of a newly rolled-out
version breach the stage's guard, the server's own coordinator rolls the stage back and every
node swaps the warm previous model back, with no fetch. Against a real server (coordinator on)
and etcd of each build.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from modelreg.client.artifacts import ArtifactWriter
from modelreg.client.watcher import AsyncModelWatcher, Backoff, ThreadedModelWatcher
from modelreg.server.domain.rollouts import Rollouts
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as rs
from tests.helpers import (
    MODEL,
    ActorStub,
    RunningServer,
    Toy,
    load_toy,
    register,
    stage,
    start_server,
)
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)

CANARY = stage("canary")
COORDINATOR = "modelreg-coordinator"


def seconds(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(n * 1e9))
    return d


@pytest.fixture
async def guarded(etcd_server: Any, etcd_prefix: str,
                  tmp_path: Path) -> AsyncIterator[tuple[RunningServer, Any]]:
    """A server running its coordinator; v1 and v2 registered; canary serves v1, then is
    governed by a policy with a guard (error_rate at most 0.05, breach 0.2 s, bake 60 s).
    """
    server = await start_server(etcd_server.endpoint, etcd_prefix, coordinator="auto",
                                rollout_interval=0.05, coordinator_lease=2)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = ActorStub(channel, "alice")
            await stub.CreateModel(svc.CreateModelRequest(
                model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"])))
            for n in (1, 2):
                await register(stub, tmp_path, n)
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=CANARY, version=1))
            guard = res.RolloutGuard(max_values={"error_rate": 0.05}, bake_window=seconds(60),
                                     breach_duration=seconds(0.2))
            policy = res.RolloutPolicy(activation_margin=seconds(0.2), guard=guard)
            await stub.UpdateModel(svc.UpdateModelRequest(
                model=res.RegisteredModel(name=f"models/{MODEL}",
                                          rollout_policies={"canary": policy}),
                update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"])))
            yield server, stub
    finally:
        await server.stop()


def watcher_of(server: RunningServer, node_id: str, cache: Path,
               fetches: list[str]) -> AsyncModelWatcher[Toy]:
    def fetch(uri: str, out: ArtifactWriter) -> None:
        fetches.append(uri)
        out.write(Path(uri.removeprefix("file://")).read_bytes())

    return AsyncModelWatcher(
        MODEL, "canary", load_toy, target=server.target, node_id=node_id, cache_dir=cache,
        fetchers={"file": fetch}, retry_backoff=Backoff(0.05, 0.2),
        reconnect_backoff=Backoff(0.05, 0.2))


async def eventually(predicate: Callable[[], Any], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


class TestGuardThroughTheSdk:
    async def test_bad_figures_after_a_rollout_swap_every_node_back(
            self, guarded: tuple[RunningServer, Any], tmp_path: Path) -> None:
        """Two nodes serve v1; v2 is rolled out (prepared, committed by the coordinator,
        switched to); both publish an error rate of 0.3: the guard rolls canary back and both
        swap the warm v1 back without a fetch. The rollout's verdict and the audit event say
        why; the figures, bound to v2, are no longer reported on v1.
        """
        server, stub = guarded
        fetches: list[str] = []
        a = watcher_of(server, "node-a", tmp_path / "a", fetches)
        b = watcher_of(server, "node-b", tmp_path / "b", fetches)
        async with a, b:
            await a.wait_for_version(1, timeout=30)
            await b.wait_for_version(1, timeout=30)
            started = await stub.PromoteVersion(svc.PromoteVersionRequest(name=CANARY, version=2))
            name = started.rollout.name
            await a.wait_for_version(2, timeout=30)
            await b.wait_for_version(2, timeout=30)
            assert a.health == {} and len(fetches) == 4
            warm = (a.previous, b.previous)
            a.set_health({"error_rate": 0.3, "latency_p99_ms": 120})
            b.set_health({"error_rate": 0.3})
            assert a.health == {"error_rate": 0.3, "latency_p99_ms": 120.0}

            assert await a.wait_for_version(1, timeout=30) is warm[0]
            assert await b.wait_for_version(1, timeout=30) is warm[1]
            assert len(fetches) == 4  # v1 was warm: nothing fetched again
            for w in (a, b):
                swap = w.stats.last_swap
                assert swap is not None and swap.source == "previous"
                assert w.health == {}  # the figures were v2's

            rollout = (await Rollouts(server.app.store).get(
                rs.GetRolloutRequest(name=name))).rollout
            assert rollout.guard.rollback == swap.rollout
            assert "error_rate 0.3 > max 0.05 on 2 of 2 live nodes" in rollout.guard.evidence
            events = await stub.ListAuditEvents(svc.ListAuditEventsRequest(
                parent=f"models/{MODEL}", actor=COORDINATOR))
            rollback = events.audit_events[0]
            assert (rollback.action, rollback.reason, rollback.rollout) == (
                res.AUDIT_ACTION_ROLLBACK, rollout.guard.evidence, rollout.guard.rollback)

    async def test_the_threaded_watcher_reports_figures_at_once(
            self, guarded: tuple[RunningServer, Any], tmp_path: Path) -> None:
        """``set_health`` from another thread reaches the fleet view without waiting for the
        next periodic report (the lease is 60 s: a report every 20 s otherwise).
        """
        server, _ = guarded
        watcher: ThreadedModelWatcher[Toy] = ThreadedModelWatcher(
            MODEL, "canary", load_toy, target=server.target, node_id="node-t",
            cache_dir=tmp_path / "t", ttl_seconds=60)
        with watcher:
            await asyncio.to_thread(watcher.wait_for_version, 1, 30)
            await asyncio.to_thread(watcher.set_health, {"error_rate": 0.01})
            async with grpc.aio.insecure_channel(server.target) as channel:
                fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)

                async def reported() -> dict[str, float]:
                    nodes = (await fleet.ListNodes(fs.ListNodesRequest(), timeout=10)).nodes
                    return {k: v for n in nodes for s in n.stages for k, v in s.health.items()}
                async with asyncio.timeout(30):
                    while await reported() != {"error_rate": 0.01}:
                        await asyncio.sleep(0.05)
            assert watcher.health == {"error_rate": 0.01}


class TestCheckHealth:
    @pytest.mark.parametrize(("figures", "error"), [
        ({"Error Rate": 0.1}, ValueError),
        ({"": 0.1}, ValueError),
        ({"error_rate": math.nan}, ValueError),
        ({"error_rate": math.inf}, ValueError),
        ({"error_rate": "high"}, TypeError),
        ({"error_rate": True}, TypeError),
        ({f"f{i}": 1.0 for i in range(33)}, ValueError),
    ])
    def test_bad_figures_raise_before_anything_is_sent(
            self, figures: dict[str, Any], error: type[Exception]) -> None:
        """What the server would refuse is refused in the caller's hands."""
        watcher: AsyncModelWatcher[Toy] = AsyncModelWatcher(MODEL, "canary", load_toy)
        with pytest.raises(error):
            watcher.set_health(figures)
        assert watcher.health == {}
