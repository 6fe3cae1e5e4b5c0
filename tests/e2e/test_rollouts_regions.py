"""Cross-region rollouts on three real regions (``modelreg up --regions``' launcher: an etcd, a
server and, outside the primary, a replicator per region, with a latency proxy on every link),
followed by real watcher-SDK nodes in every region, each on its own region's server.

What is checked is what the issue asks: a rollout reaches every node in every region and each
switches after the activation time; history and audit agree in every region; a region cut off
during prepare makes the rollout abort at its deadline with no node anywhere ever serving the
target, and everything converges on the old version after the heal; an emergency rollback
switches every node to its warm previous model with no fetch.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from modelreg.client.artifacts import ArtifactWriter
from modelreg.client.watcher import AsyncModelWatcher, Backoff, LoadedModel
from modelreg.server.regions_cluster import Cluster
from modelreg.server.regions_plan import server_command
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as ro
from modelreg.v1 import rollout_service_pb2_grpc as ro_grpc
from tests.e2e.regions_env import options
from tests.helpers import ActorStub, Toy, load_toy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and prctl"),
]
MODEL = "fraud"
PRODUCTION = f"models/{MODEL}/stages/production"
REGIONS = ("us", "eu", "ap")
NODES_PER_REGION = 2


@dataclass
class Node:
    """A watcher in one region, and what it did: fetches and every swap with its true time."""

    region: str
    watcher: AsyncModelWatcher[Toy]
    fetches: list[str] = field(default_factory=list)
    corrupt: set[int] = field(default_factory=set)
    """Versions whose artifact this node receives damaged (its digest check fails)."""
    swaps: list[tuple[int, float]] = field(default_factory=list)  # (version, time.time())

    def served(self) -> set[int]:
        return {version for version, _ in self.swaps}


def _fetcher(node: Node) -> Callable[[str, ArtifactWriter], None]:
    def fetch(uri: str, out: ArtifactWriter) -> None:
        node.fetches.append(uri)
        data = Path(uri.removeprefix("file://")).read_bytes()
        version = int(uri.rsplit("-", 1)[-1].removesuffix(".txt"))
        out.write(data[:-1] + b"!" if version in node.corrupt else data)

    return fetch


async def _register(stub: Any, directory: Path, n: int) -> None:
    path = directory / f"fraud-{n}.txt"
    path.write_text(f"version:{n}\n" + "#" * 1000)
    data = path.read_bytes()
    await stub.CreateModelVersion(svc.CreateModelVersionRequest(
        parent=f"models/{MODEL}", model_version=res.ModelVersion(
            artifact_uri=path.as_uri(), sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data))), timeout=10)


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def _finished(target: str, rollout: res.Rollout, timeout: float = 90.0) -> res.Rollout:
    """The rollout once done, followed on the given server's WatchRollout (once that server's
    region has applied the rollout's start: read-your-writes).
    """
    name = rollout.name
    metadata = (("x-modelreg-min-revision", rollout.etag.strip('"')),)
    async with grpc.aio.insecure_channel(target) as channel:
        stream = ro_grpc.RolloutServiceStub(channel).WatchRollout(
            ro.WatchRolloutRequest(name=name), timeout=timeout, metadata=metadata)
        last = None
        async for message in stream:
            last = message.rollout
        assert last is not None and last.done, f"{name} did not finish: {last}"
        return last


def _policy(deadline: float, margin: float) -> res.RolloutPolicy:
    policy = res.RolloutPolicy(regions=list(REGIONS),
                               prepare_deadline=duration_pb2.Duration(seconds=int(deadline)))
    policy.activation_margin.FromNanoseconds(int(margin * 1e9))
    return policy


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three regions, 10 ms links, every part running; stopped at teardown."""
    c = Cluster(options(tmp_path / "cluster", REGIONS), server_command=server_command)
    try:
        await c.start()
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def fleet(cluster: Cluster, tmp_path: Path) -> AsyncIterator[tuple[Any, list[Node]]]:
    """``fraud`` with versions 1-3, production governed; two nodes per region serving v1."""
    async with grpc.aio.insecure_channel(cluster.regions["us"].listen) as channel:
        stub = ActorStub(channel, "alice")
        await stub.CreateModel(svc.CreateModelRequest(model_id=MODEL), timeout=10)
        for n in (1, 2, 3):
            await _register(stub, tmp_path, n)
        await stub.PromoteVersion(svc.PromoteVersionRequest(
            name=f"models/{MODEL}/stages/staging", version=1), timeout=10)
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=PRODUCTION, version=1),
                                  timeout=10)
        await stub.UpdateModel(svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}",
                                      rollout_policies={"production": _policy(60, 1.0)}),
            update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"])), timeout=10)
        nodes = []
        for region in REGIONS:
            for i in range(NODES_PER_REGION):
                node = Node(region, None)  # type: ignore[arg-type]

                def on_swap(new: LoadedModel[Toy], old: LoadedModel[Toy] | None,
                            node: Node = node) -> None:
                    node.swaps.append((new.version, time.time()))

                node.watcher = AsyncModelWatcher(
                    MODEL, "production", load_toy, target=cluster.regions[region].listen,
                    node_id=f"{region}-node-{i}", region=region,
                    cache_dir=tmp_path / f"cache-{region}-{i}",
                    fetchers={"file": _fetcher(node)}, on_swap=on_swap,
                    retry_backoff=Backoff(0.05, 0.5), reconnect_backoff=Backoff(0.05, 0.5),
                    idle_timeout=5.0)
                nodes.append(node)
        for node in nodes:
            await node.watcher.start()
        try:
            for node in nodes:
                await node.watcher.wait_for_version(1, timeout=60)
            yield stub, nodes
        finally:
            for node in nodes:
                await node.watcher.stop()


async def _promote_staged(stub: Any, version: int) -> res.Rollout:
    await stub.PromoteVersion(svc.PromoteVersionRequest(
        name=f"models/{MODEL}/stages/staging", version=version), timeout=10)
    started = await stub.PromoteVersion(svc.PromoteVersionRequest(
        name=PRODUCTION, version=version, reason=f"v{version}"), timeout=10)
    assert started.rollout.state == res.ROLLOUT_STATE_PREPARING
    return started.rollout


class TestRolloutAcrossRegions:
    async def test_every_node_in_every_region_switches_after_the_activation_time(
        self, cluster: Cluster, fleet: tuple[Any, list[Node]]
    ) -> None:
        """v2 is prepared by every node in us, eu and ap, committed once, and every node
        switches to the model it prepared, no earlier than the activation time; the pointer's
        history and the audit events are the same in every region.
        """
        stub, nodes = fleet
        rollout = await _promote_staged(stub, 2)
        done = await _finished(cluster.regions["ap"].listen, rollout)
        assert done.state == res.ROLLOUT_STATE_COMMITTED, done.abort_reason
        assert [r.region for r in done.readiness] == list(REGIONS)
        assert all(r.ready and r.ready_nodes == NODES_PER_REGION for r in done.readiness)
        activation = done.activation_time.ToNanoseconds() / 1e9
        for node in nodes:
            await node.watcher.wait_for_version(2, timeout=30)
        for node in nodes:
            version, at = node.swaps[-1]
            assert version == 2 and at >= activation, (node.region, at, activation)
            swap = node.watcher.stats.last_swap
            assert swap is not None and swap.source == "prepared"
            assert swap.rollout == rollout.name
        histories, audits = [], []
        for region in REGIONS:
            async with grpc.aio.insecure_channel(cluster.regions[region].listen) as channel:
                there = ActorStub(channel, "alice")
                metadata = (("x-modelreg-min-revision", str(done.commit_revision)),)
                history = await there.ListStageHistory(svc.ListStageHistoryRequest(
                    name=PRODUCTION), timeout=30, metadata=metadata)
                events = await there.ListAuditEvents(svc.ListAuditEventsRequest(
                    parent=f"models/{MODEL}"), timeout=30, metadata=metadata)
            histories.append([e.SerializeToString(deterministic=True) for e in history.entries])
            audits.append([e.SerializeToString(deterministic=True)
                           for e in events.audit_events])
            assert history.entries[0].to_version == 2
            assert history.entries[0].revision == done.commit_revision
            commits = [e for e in events.audit_events
                       if e.rollout == rollout.name and e.action == res.AUDIT_ACTION_PROMOTE]
            assert len(commits) == 1 and commits[0].revision == done.commit_revision
        assert histories[0] == histories[1] == histories[2]
        assert audits[0] == audits[1] == audits[2]

    async def test_a_region_cut_off_during_prepare_aborts_and_no_node_serves_the_target(
        self, cluster: Cluster, fleet: tuple[Any, list[Node]]
    ) -> None:
        """Every inter-region link cut while v2 prepares: the coordinator cannot hear from eu
        and ap, the rollout aborts at its deadline naming them, no node anywhere ever serves
        v2, and after the heal every region's nodes still serve v1 and drop what they prepared.
        """
        stub, nodes = fleet
        await stub.UpdateModel(svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}",
                                      rollout_policies={"production": _policy(3, 1.0)}),
            update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"])), timeout=10)
        cluster.cut()
        try:
            rollout = await _promote_staged(stub, 2)
            done = await _finished(cluster.regions["us"].listen, rollout)
        finally:
            cluster.heal()
        assert done.state == res.ROLLOUT_STATE_ABORTED
        assert "eu" in done.abort_reason and "ap" in done.abort_reason
        aborted_at = int(done.etag.strip('"'))
        for node in nodes:
            await _until(lambda node=node: node.watcher.stats.last_revision >= aborted_at,
                         f"{node.region}'s node saw the abort")
        async with grpc.aio.insecure_channel(cluster.regions["us"].listen) as channel:
            stage = (await ActorStub(channel, "alice").GetStage(
                svc.GetStageRequest(name=PRODUCTION), timeout=10)).stage
        assert stage.version == 1 and stage.pending_rollout == ""
        for node in nodes:
            await _until(lambda node=node: node.watcher.prepared is None,
                         f"{node.region} dropped what it prepared")
            assert 2 not in node.served(), (node.region, node.swaps)
            assert node.watcher.current is not None and node.watcher.current.version == 1

    async def test_emergency_rollback_switches_every_node_to_its_warm_previous_model(
        self, cluster: Cluster, fleet: tuple[Any, list[Node]]
    ) -> None:
        """After v2 is committed everywhere, RollbackStage commits at once (a ROLLBACK
        rollout, activation on receipt) and every node in every region swaps back to the v1
        it kept warm, with no fetch.
        """
        stub, nodes = fleet
        rollout = await _promote_staged(stub, 2)
        done = await _finished(cluster.regions["us"].listen, rollout)
        assert done.state == res.ROLLOUT_STATE_COMMITTED, done.abort_reason
        for node in nodes:
            await node.watcher.wait_for_version(2, timeout=30)
        fetched = {node.watcher.node_id: len(node.fetches) for node in nodes}
        rolled = await stub.RollbackStage(svc.RollbackStageRequest(
            name=PRODUCTION, reason="error rate"), timeout=10)
        assert rolled.stage.version == 1
        assert rolled.rollout.kind == res.ROLLOUT_KIND_ROLLBACK
        assert rolled.rollout.state == res.ROLLOUT_STATE_COMMITTED
        for node in nodes:
            await node.watcher.wait_for_version(1, timeout=30)
        for node in nodes:
            swap = node.watcher.stats.last_swap
            assert swap is not None and swap.version == 1 and swap.source == "previous"
            assert len(node.fetches) == fetched[node.watcher.node_id]

    async def test_a_digest_failure_in_one_region_aborts_the_rollout(
        self, cluster: Cluster, fleet: tuple[Any, list[Node]]
    ) -> None:
        """The nodes of eu receive v2 damaged: they refuse it (digest) and report the failure; with
        readiness 1.0 the coordinator aborts at once naming eu and the error, and no node
        anywhere serves v2.
        """
        stub, nodes = fleet
        for node in nodes:
            if node.region == "eu":
                node.corrupt.add(2)
        rollout = await _promote_staged(stub, 2)
        done = await _finished(cluster.regions["us"].listen, rollout)
        assert done.state == res.ROLLOUT_STATE_ABORTED
        assert "eu" in done.abort_reason and "sha256" in done.abort_reason.lower()
        eu = next(r for r in done.readiness if r.region == "eu")
        assert eu.failed_nodes >= 1 and eu.failures
        for node in nodes:
            assert 2 not in node.served(), (node.region, node.swaps)

    async def test_the_coordinator_killed_during_prepare_and_after_commit_leaves_no_split(
        self, cluster: Cluster, fleet: tuple[Any, list[Node]]
    ) -> None:
        """The us server (the only coordinator) is SIGKILLed just after the promotion, and
        again as soon as eu has seen the commit (before the activation time); the launcher
        restarts it. The restarted coordinator resumes the rollout from etcd, and every node
        in every region ends on v2, each switching no earlier than the activation time: no
        region is left on another version.
        """
        stub, nodes = fleet
        supervisor = asyncio.create_task(cluster.supervise(every=0.05))
        try:
            us = cluster.regions["us"].server
            assert us is not None and us.pid is not None
            rollout = await _promote_staged(stub, 2)
            first = us.pid
            os.kill(first, signal.SIGKILL)
            await _until(lambda: us.pid not in (None, first), "us's server restarted")
            await cluster.wait_serving("us")
            done = await _finished(cluster.regions["eu"].listen, rollout)
            assert done.state == res.ROLLOUT_STATE_COMMITTED, done.abort_reason
            second = us.pid
            os.kill(second, signal.SIGKILL)  # after the commit, before the activation time
            activation = done.activation_time.ToNanoseconds() / 1e9
            await _until(lambda: us.pid not in (None, second), "us's server restarted again")
            for node in nodes:
                await node.watcher.wait_for_version(2, timeout=60)
            for node in nodes:
                version, at = node.swaps[-1]
                assert version == 2 and at >= activation, (node.region, at, activation)
        finally:
            supervisor.cancel()
