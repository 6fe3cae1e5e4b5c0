"""Building blocks of the region tests: a topology file, the primary's servers and a regional one.

The regional server (``eu``) runs with a topology and its region, so it forwards mutations to
the primary's servers (``us``). It reads the primary's etcd directly (``--region-reads
direct``, a region without an etcd of its own), which holds the same keys at the same
revisions as a replica would; the topology's ``eu`` etcd is where its replicator's lag figures
are read from.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from modelreg.server.embedded_etcd import free_port
from modelreg.v1 import region_service_pb2_grpc
from tests.helpers import ActorStub, RunningServer, start_server


def write_topology(
    path: Path, primary: str, regions: Mapping[str, tuple[Sequence[str], Sequence[str]]]
) -> Path:
    """A topology file: ``regions`` maps each name to (etcd endpoints, server addresses)."""
    lines = [f'primary = "{primary}"']
    for name, (etcd, servers) in regions.items():
        lines += ["", f"[regions.{name}]", f"etcd = {list(etcd)!r}".replace("'", '"'),
                  f"servers = {list(servers)!r}".replace("'", '"')]
    path.write_text("\n".join(lines) + "\n")
    return path


def address() -> str:
    """A free loopback address for a server."""
    return f"127.0.0.1:{free_port()}"


@dataclass
class Deployment:
    """Servers of two regions over one etcd: ``us`` (the primary's) and ``eu``."""

    topology: Path
    us: list[RunningServer]
    eu: RunningServer
    primary_addresses: list[str]
    etcd: str
    prefix: str
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    started: list[RunningServer] = field(default_factory=list)
    """Every server started, stopped at the end (stopping twice is harmless)."""

    async def start_primary(self, listen: str) -> RunningServer:
        """Starts (again) a primary server on ``listen``."""
        server = await start_server(self.etcd, self.prefix, listen=listen,
                                    topology=self.topology, region="us")
        self.started.append(server)
        return server

    def model_stub(self, server: RunningServer | str, actor: str = "alice") -> ActorStub:
        """The generated ModelService stub on a server, as ``actor``."""
        channel = grpc.aio.insecure_channel(server if isinstance(server, str) else server.target)
        self.channels.append(channel)
        return ActorStub(channel, actor)

    def region_stub(self, server: RunningServer) -> region_service_pb2_grpc.RegionServiceStub:
        """The generated RegionService stub on a server."""
        channel = grpc.aio.insecure_channel(server.target)
        self.channels.append(channel)
        return region_service_pb2_grpc.RegionServiceStub(channel)


@contextlib.asynccontextmanager
async def deployment(
    etcd: str,
    prefix: str,
    tmp_path: Path,
    *,
    primary_servers: int = 1,
    dead_primary_addresses: Sequence[str] = (),
    eu_etcd: str | None = None,
    eu: Mapping[str, Any] | None = None,
) -> AsyncIterator[Deployment]:
    """Starts the primary's servers and the regional one; stops whatever is still running.

    Args:
        etcd: The primary's etcd (which ``eu`` reads directly too).
        prefix: The deployment's key prefix.
        tmp_path: Where the topology file goes.
        primary_servers: How many servers the primary runs.
        dead_primary_addresses: Addresses listed first among the primary's servers with
            nothing serving on them.
        eu_etcd: The topology's etcd of ``eu`` (its replicator's status record); default
            ``etcd``.
        eu: More ``ServerConfig`` fields of the regional server.

    """
    listens = [address() for _ in range(primary_servers)]
    primary = [*dead_primary_addresses, *listens]
    eu_listen = address()
    path = write_topology(tmp_path / "topology.toml", "us", {
        "us": ([etcd], primary), "eu": ([eu_etcd or etcd], [eu_listen])})
    env = Deployment(path, [], None, primary, etcd, prefix)  # type: ignore[arg-type]
    try:
        for listen in listens:
            env.us.append(await env.start_primary(listen))
        # eu reads the primary's etcd directly (no replica of its own): these tests are about
        # forwarding; the regional store and its replicator have their own (tests/replication,
        # tests/e2e/test_regions_processes.py).
        env.eu = await start_server(etcd, prefix, listen=eu_listen, topology=path,
                                    region="eu", region_reads="direct", **(eu or {}))
        env.started.append(env.eu)
        yield env
    finally:
        for channel in env.channels:
            await channel.close()
        for server in env.started:
            await server.stop()
