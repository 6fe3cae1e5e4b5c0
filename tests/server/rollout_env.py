"""Building blocks of the coordinator tests: two real regions, their servers, nodes that report.

``us`` is the primary: its etcd is the session etcd (under the test's prefix), its servers run
the coordinator. ``eu`` is a real region: an etcd of its own, kept by an in-process replicator
(``modelreg.replication.Replicator``), and a regional server reading its replica; its serving
nodes' reports live in its etcd only (``nodes/`` is region-held), so each region's readiness is
its own. Every process and task started here is stopped by :func:`regions` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from google.protobuf import duration_pb2

from modelreg.replication import AgentConfig, Replicator
from modelreg.server.domain.rollouts import Rollouts
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.rollout_coordinator import LEADER_KEY
from modelreg.server.store.etcd import EtcdStore
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as rs
from tests.helpers import MODEL, ActorStub, RunningServer, start_server, version_message
from tests.server.forward_env import address, write_topology

STAGE = f"models/{MODEL}/stages/staging"
FAST = {"coordinator": "auto", "rollout_interval": 0.05, "coordinator_lease": 2,
        "forward_connect_timeout": 0.5}
"""Coordinator settings of the test servers: as deployed (the test helpers' default is off),
with quick ticks and a short lease."""


@pytest.fixture(scope="session")
def eu_etcd(etcd_server: EmbeddedEtcd,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    """The eu region's own etcd, of the same build as the session etcd (the primary)."""
    binary = getattr(etcd_server, "_binary", None)
    with EmbeddedEtcd(tmp_path_factory.mktemp("etcd-eu"), binary=binary, name="eu") as etcd:
        yield etcd


async def until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Awaits ``condition()`` (sync or async) until truthy; returns it. A bound, not a timing."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.02)


@dataclass
class Regions:
    """A primary region ``us`` and a replicated region ``eu``."""

    primary_etcd: str
    eu_etcd: str
    prefix: str
    topology: Path
    us_listens: list[str]
    eu_listen: str
    us: list[RunningServer] = field(default_factory=list)
    eu: RunningServer | None = None
    replicator: Replicator | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    started: list[RunningServer] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    front: str = ""
    """The us server the test talks to ("": the first one started here)."""
    reader: EtcdStore | None = None
    """The test's own connection to the primary etcd, to read rollout records."""

    async def close(self) -> None:
        """Stops whatever still runs: channels, servers, the replicator, the reader."""
        for channel in self.channels:
            await channel.close()
        for server in list(self.started):
            await server.stop()
        await self.stop_replicator()
        if self.reader is not None:
            await self.reader.close()

    # -- servers ---------------------------------------------------------------------------

    async def start_us(self, listen: str, **settings: Any) -> RunningServer:
        """A primary-region server (it runs a coordinator) on ``listen``."""
        server = await start_server(self.primary_etcd, self.prefix, listen=listen,
                                    topology=self.topology, region="us",
                                    **{**FAST, **self.settings, **settings})
        self.started.append(server)
        self.us.append(server)
        return server

    async def start_eu(self, **settings: Any) -> RunningServer:
        """The eu server, reading the eu replica."""
        server = await start_server(self.eu_etcd, self.prefix, listen=self.eu_listen,
                                    topology=self.topology, region="eu",
                                    **{**FAST, **self.settings, **settings})
        self.started.append(server)
        self.eu = server
        # Ready once the region holds its first copy (before, its store refuses everything).
        stub = self.models(server)

        async def answers() -> bool:
            try:
                await stub.ListModels(svc.ListModelsRequest())
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
            return True
        await until(answers, "eu's first copy")
        return server

    async def start_replicator(self) -> Replicator:
        """The eu replicator, in this process."""
        config = AgentConfig(primary=(self.primary_etcd,), region_etcd=(self.eu_etcd,),
                             region="eu", prefix=self.prefix, replica_id="eu-r1", lease_ttl=2,
                             probe_interval=0.2, idle_flush=0.05, status_interval=0.5)
        self.replicator = await Replicator(config).__aenter__()
        return self.replicator

    async def stop_replicator(self) -> None:
        """Stops the eu replicator: eu applies nothing more."""
        replicator, self.replicator = self.replicator, None
        if replicator is not None:
            replicator.shutdown()
            await replicator.__aexit__(None, None, None)

    # -- stubs -----------------------------------------------------------------------------

    def channel(self, target: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(target)
        self.channels.append(channel)
        return channel

    def models(self, server: RunningServer | str | None = None) -> ActorStub:
        """ModelService on a server (default: :attr:`front`), as alice."""
        return ActorStub(self.channel(self._target(server)), "alice")

    def _target(self, server: RunningServer | str | None) -> str:
        if server is None:
            return self.front or self.us[0].target
        return server if isinstance(server, str) else server.target

    # -- the registry ----------------------------------------------------------------------

    async def governed_model(self, versions: int = 2, **policy: Any) -> None:
        """The test model, its ``staging`` stage governed by ``policy``."""
        settings: dict[str, Any] = {"prepare_deadline": duration_pb2.Duration(seconds=60),
                                    "activation_margin": duration_pb2.Duration(nanos=100_000_000)}
        settings.update(policy)
        stub = self.models()
        await stub.CreateModel(svc.CreateModelRequest(model_id=MODEL, model=res.RegisteredModel(
            rollout_policies={"staging": res.RolloutPolicy(**settings)})))
        for i in range(versions):
            await stub.CreateModelVersion(svc.CreateModelVersionRequest(
                parent=f"models/{MODEL}", model_version=version_message(f"v{i}")))

    async def promote(self, version: int = 1) -> str:
        """Starts the rollout of ``version`` to staging; its name."""
        resp = await self.models().PromoteVersion(svc.PromoteVersionRequest(
            name=STAGE, version=version, reason="test"))
        assert resp.rollout.name, "the stage is governed: a rollout, not a move"
        assert resp.rollout.state == res.ROLLOUT_STATE_PREPARING
        return str(resp.rollout.name)

    async def rollout(self, name: str) -> res.Rollout:
        """The rollout record as the primary's etcd has it (the domain's ``get``)."""
        if self.reader is None:
            self.reader = EtcdStore([self.primary_etcd], self.prefix)
        return (await Rollouts(self.reader).get(rs.GetRolloutRequest(name=name))).rollout

    async def settled(self, name: str) -> res.Rollout:
        """Waits until the rollout committed or aborted; the record then."""
        async def done() -> res.Rollout | None:
            r = await self.rollout(name)
            return r if r.state != res.ROLLOUT_STATE_PREPARING else None
        return await until(done, f"{name} committed or aborted")

    async def pointer(self) -> res.StagePointer:
        """The staging pointer as the primary has it."""
        return (await self.models().GetStage(svc.GetStageRequest(name=STAGE))).stage

    async def report(self, server: RunningServer | str, node_id: str, region: str,
                     **served: Any) -> None:
        """A node of ``region`` reports through ``server`` what it does with staging."""
        stub = fleet_service_pb2_grpc.FleetServiceStub(self.channel(self._target(server)))
        node = fs.Node(node_id=node_id, region=region,
                       stages=[fs.ServedStage(stage=STAGE, **served)])
        await stub.ReportNode(fs.ReportNodeRequest(node=node, ttl_seconds=30), timeout=10)

    async def leader_key(self) -> str | None:
        """Who holds the coordinator's leader key in the primary etcd."""
        host, _, port = self.primary_etcd.rpartition(":")
        async with aetcd.Client(host, int(port), timeout=10) as client:
            value = await client.get((self.prefix + LEADER_KEY).encode())
        return None if value is None else bytes(value.value).decode()

    def leaders(self) -> list[RunningServer]:
        """The running servers (of any region) whose coordinator leads now."""
        return [s for s in self.started if s.app.coordinator is not None
                and s.app.coordinator.leading]

    async def stop(self, server: RunningServer) -> None:
        """Stops one server (gracefully: a leader resigns)."""
        await server.stop()
        if server in self.started:
            self.started.remove(server)


def committed(server: RunningServer) -> float:
    """Rollouts the server's coordinator committed."""
    value = server.app.metrics.registry.get_sample_value("modelreg_rollouts_committed_total")
    return value or 0.0


def aborted(server: RunningServer, cause: str) -> float:
    """Rollouts the server's coordinator aborted for ``cause``."""
    value = server.app.metrics.registry.get_sample_value(
        "modelreg_rollouts_aborted_total", {"cause": cause})
    return value or 0.0


@contextlib.asynccontextmanager
async def regions(
    primary: EmbeddedEtcd, eu_etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, *,
    us_servers: int = 1, start: bool = True, extra_us: tuple[str, ...] = (),
    dead_eu: tuple[str, ...] = (), **settings: Any,
) -> AsyncIterator[Regions]:
    """The two regions (the replicator, ``us_servers`` us servers and the eu one, unless not
    ``start``); everything stopped at the end. ``extra_us`` are more us addresses in the
    topology, for servers a test starts itself; ``dead_eu`` eu addresses listed before eu's
    server, with nothing serving there.
    """
    us_listens = [address() for _ in range(us_servers)]
    eu_listen = address()
    path = write_topology(tmp_path / "topology.toml", "us", {
        "us": ([primary.endpoint], [*us_listens, *extra_us]),
        "eu": ([eu_etcd.endpoint], [*dead_eu, eu_listen])})
    env = Regions(primary.endpoint, eu_etcd.endpoint, prefix, path, us_listens, eu_listen,
                  settings=settings)
    try:
        if start:
            await env.start_replicator()
            for listen in us_listens:
                await env.start_us(listen)
            await env.start_eu()
        yield env
    finally:
        await env.close()
        async with aetcd.Client(eu_etcd.host, eu_etcd.client_port, timeout=10) as client:
            await client.delete_prefix(prefix.encode())
