"""Two-phase rollouts through the watcher SDK against a real server and etcd (issue 9).

A governed stage's promotion makes a watching node prepare the target without serving it; the
commit (the domain's, as the coordinator calls it) makes it switch at the activation time, no
earlier and with nothing loaded again; an abort drops what it prepared; an emergency rollback
swaps the warm previous model back with no fetch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from modelreg.client.artifacts import ArtifactWriter
from modelreg.client.watcher import AsyncModelWatcher, Backoff, LoadedModel
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, RunningServer, Toy, load_toy, register, stage

CANARY = stage("canary")
COORDINATOR = "rollout-coordinator"


@dataclass
class Node:
    """A watcher and what it did: artifact transfers, loads, and the true time of each swap."""

    watcher: AsyncModelWatcher[Toy]
    fetches: list[str] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)
    swapped_at: list[tuple[int, float]] = field(default_factory=list)  # (version, time.time())


def counting_fetcher(node_fetches: list[str]) -> Callable[[str, ArtifactWriter], None]:
    def fetch(uri: str, out: ArtifactWriter) -> None:
        node_fetches.append(uri)
        out.write(Path(uri.removeprefix("file://")).read_bytes())

    return fetch


@pytest.fixture
async def node(server: RunningServer, stub: Any, tmp_path: Path) -> AsyncIterator[Node]:
    """v1-v3 registered; canary serves v1, then is governed (activation margin 1 s); a node
    watching canary serves v1.
    """
    await stub.CreateModel(svc.CreateModelRequest(
        model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"])))
    for n in (1, 2, 3):
        await register(stub, tmp_path, n)
    await stub.PromoteVersion(svc.PromoteVersionRequest(name=CANARY, version=1))
    policy = res.RolloutPolicy(activation_margin=duration_pb2.Duration(seconds=1))
    await stub.UpdateModel(svc.UpdateModelRequest(
        model=res.RegisteredModel(name=f"models/{MODEL}", rollout_policies={"canary": policy}),
        update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"])))
    fetches: list[str] = []
    loads: list[int] = []

    def load(path: Path) -> Toy:
        toy = load_toy(path)
        loads.append(toy.version)
        return toy

    def on_swap(new: LoadedModel[Toy], old: LoadedModel[Toy] | None) -> None:
        state.swapped_at.append((new.version, time.time()))

    watcher: AsyncModelWatcher[Toy] = AsyncModelWatcher(
        MODEL, "canary", load, target=server.target, node_id="rollout-node",
        cache_dir=tmp_path / "cache", fetchers={"file": counting_fetcher(fetches)},
        on_swap=on_swap, retry_backoff=Backoff(0.05, 0.2), reconnect_backoff=Backoff(0.05, 0.2))
    state = Node(watcher, fetches, loads)
    async with watcher:
        await watcher.wait_for_version(1, timeout=30)
        yield state


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def readiness(server: RunningServer, version: int) -> res.RegionReadiness:
    """This region's readiness for ``version`` of canary, as the coordinator asks for it."""
    got = await server.app.fleet.readiness(fs.GetRegionReadinessRequest(name=CANARY,
                                                                        version=version))
    return got.readiness


async def ready_nodes(server: RunningServer, version: int, count: int) -> res.RegionReadiness:
    """Waits until ``count`` nodes report ``version`` of canary prepared."""
    async with asyncio.timeout(30):
        while (got := await readiness(server, version)).ready_nodes != count:
            await asyncio.sleep(0.05)
    return got


async def start_rollout(stub: Any, node: Node, version: int, *, serving: int = 1) -> str:
    """Promotes ``version`` on the governed canary (serving ``serving``); waits until the node
    has prepared it.
    """
    started = await stub.PromoteVersion(svc.PromoteVersionRequest(name=CANARY, version=version))
    assert started.rollout.state == res.ROLLOUT_STATE_PREPARING
    assert (started.stage.version, started.stage.pending_version) == (serving, version)
    w = node.watcher
    await eventually(lambda: w.prepared is not None and w.prepared.version == version)
    return started.rollout.name


class TestRolloutWatcher:
    async def test_prepare_then_switch_after_the_activation_time(
        self, server: RunningServer, stub: Any, node: Node
    ) -> None:
        """A governed promotion makes the node load v2 beside v1 and report it prepared,
        serving v1; the commit makes it switch to the prepared v2 (no fetch, no load) after
        the activation time the commit set.
        """
        w = node.watcher
        name = await start_rollout(stub, node, 2)
        assert w.current is not None and w.current.version == 1
        assert node.loads == [1, 2] and len(node.fetches) == 2
        got = await ready_nodes(server, 2, 1)
        assert (got.live_nodes, got.failed_nodes, got.ready) == (1, 0, True)
        assert (w.stats.pending_rollout, w.stats.prepared_version) == (name, 2)

        committed = await server.app.registry.rollouts.commit(name, actor=COORDINATOR)
        assert committed.state == res.ROLLOUT_STATE_COMMITTED
        activation = committed.activation_time.ToNanoseconds() / 1e9
        await w.wait_for_version(2, timeout=30)
        assert node.swapped_at[-1][0] == 2 and node.swapped_at[-1][1] >= activation
        swap = w.stats.last_swap
        assert swap is not None and (swap.source, swap.rollout) == ("prepared", name)
        assert swap.activation_time is not None
        assert swap.activation_time.timestamp() == pytest.approx(activation, abs=1e-3)
        assert swap.local_time.timestamp() >= activation
        assert node.loads == [1, 2] and len(node.fetches) == 2  # nothing loaded again
        assert w.prepared is None and w.previous is not None and w.previous.version == 1
        assert abs(w.stats.clock_offset) < 1.0  # one machine: the servers' clock is ours

    async def test_abort_drops_the_prepared_model(
        self, server: RunningServer, stub: Any, node: Node
    ) -> None:
        """An aborted rollout leaves the node serving v1 with nothing prepared, and its
        reports stop counting it ready for v2.
        """
        w = node.watcher
        name = await start_rollout(stub, node, 2)
        await ready_nodes(server, 2, 1)
        aborted = await server.app.registry.rollouts.abort(name, "test: abort",
                                                           actor=COORDINATOR)
        assert aborted.state == res.ROLLOUT_STATE_ABORTED
        await eventually(lambda: w.prepared is None)
        assert w.current is not None and w.current.version == 1
        assert (w.stats.prepared_version, w.stats.pending_version, w.stats.swaps) == (0, 0, 1)
        got = await ready_nodes(server, 2, 0)
        assert got.live_nodes == 1
        assert [v for v, _ in node.swapped_at] == [1]

    async def test_emergency_rollback_swaps_the_warm_model_without_fetching(
        self, server: RunningServer, stub: Any, node: Node
    ) -> None:
        """After a rollout to v2, RollbackStage on the governed stage (committed at once,
        activation on receipt) swaps the warm v1 back: no transfer, no load.
        """
        w = node.watcher
        name = await start_rollout(stub, node, 2)
        await ready_nodes(server, 2, 1)
        await server.app.registry.rollouts.commit(name, actor=COORDINATOR)
        await w.wait_for_version(2, timeout=30)
        first = w.previous
        fetches, loads = len(node.fetches), len(node.loads)
        rolled = await stub.RollbackStage(svc.RollbackStageRequest(name=CANARY))
        assert rolled.stage.version == 1 and rolled.rollout.kind == res.ROLLOUT_KIND_ROLLBACK
        assert await w.wait_for_version(1, timeout=30) is first
        assert (len(node.fetches), len(node.loads)) == (fetches, loads)
        swap = w.stats.last_swap
        assert swap is not None and swap.source == "previous"
        assert swap.activation_time is None  # past when the server sent it: on receipt
        assert swap.rollout == rolled.rollout.name

    async def test_rollback_while_preparing_aborts_and_drops_the_target(
        self, server: RunningServer, stub: Any, node: Node
    ) -> None:
        """A rollback issued while a rollout prepares aborts it in the same move: the node
        drops the prepared model and swaps the warm previous one back, with no fetch.
        """
        w = node.watcher
        first = await server.app.registry.rollouts.commit(
            await start_rollout(stub, node, 3), actor=COORDINATOR)
        assert first.state == res.ROLLOUT_STATE_COMMITTED
        await w.wait_for_version(3, timeout=30)
        name = await start_rollout(stub, node, 2, serving=3)
        fetches = len(node.fetches)
        rolled = await stub.RollbackStage(svc.RollbackStageRequest(name=CANARY))
        assert rolled.aborted_rollout == name
        assert (rolled.stage.version, rolled.stage.pending_version) == (1, 0)
        await w.wait_for_version(1, timeout=30)
        await eventually(lambda: w.prepared is None)
        assert len(node.fetches) == fetches
        assert w.stats.last_swap is not None and w.stats.last_swap.source == "previous"
