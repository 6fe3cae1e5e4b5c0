"""The processes and links of a local multi-region cluster (``modelreg up --regions``).

:class:`Cluster` starts, watches and stops them; :mod:`modelreg.server.regions_up` is the
command around it.

**Servers and replicators are child processes**, not tasks of this process: each owns
process-wide state (signal handlers, logging, a Prometheus registry, the collector's
settings), production runs them as separate processes, and a test or a person can SIGKILL one
region's server or replicator for real. A child that exits is started again (same command, same
ports), as is an etcd. The proxies are tasks of this process: they hold no state worth a
process, and cutting or healing them must be immediate.

**Nothing outlives the launcher.** :meth:`Cluster.stop` stops servers, then replicators, then
the proxies, then the etcds. After a crash (even SIGKILL) the kernel kills every child (the etcd
parent-death trampoline, :func:`~modelreg.server.etcd_lifetime.die_with_parent`), and the next
launcher on the same data dir stops any leftover named by the pid files
(:mod:`modelreg.server.child_process`, :mod:`modelreg.server.etcd_lifetime`). The data dir is
locked while the launcher runs: a second one on it is refused, naming the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelreg.server import etcd_lifetime, regions_plan
from modelreg.server.child_process import ChildProcess, stop_leftover
from modelreg.server.config import default_data_dir
from modelreg.server.embedded_etcd import EmbeddedEtcd, EtcdStartError
from modelreg.server.etcd_ports import free_ports, port_in_use, who_listens
from modelreg.server.latency_proxy import LatencyProxy
from modelreg.server.regions_plan import Endpoints

__all__ = ["Cluster", "Options", "ServerCommand", "StartError", "say"]

HOST = "127.0.0.1"
ServerCommand = Callable[..., list[str]]
"""Builds a server's command line; :func:`regions_plan.server_command` unless a test says."""


class StartError(Exception):
    """Something on this machine keeps the cluster from starting; the message says what."""


@dataclass(frozen=True)
class Options:
    """The launcher's settings (its flags)."""

    regions: tuple[str, ...]
    """Region names, the primary first."""
    latency: float = 0.0
    """One-way delay in seconds on every inter-region link."""
    data_dir: Path = field(default_factory=lambda: default_data_dir() / "regions")
    """Holds one directory per region: etcd data, logs, pid files, topology file."""
    base_port: int = 50051
    """The first region's server port; the next regions' follow. 0: free ports."""
    prefix: str = "/modelreg/"
    """The deployment's key prefix in every etcd."""
    grace: float = 5.0
    """Seconds each child gets to stop before it is killed (the servers drain as long)."""
    log_level: str = "info"
    """The children's log level."""
    start_timeout: float = 60.0
    """Seconds a server may take to say SERVING."""


@dataclass
class _Region:
    name: str
    dir: Path
    etcd: EmbeddedEtcd
    listen: str
    metrics: str
    replicator_metrics: str
    links: dict[tuple[str, str], LatencyProxy] = field(default_factory=dict)
    """(other region, "etcd" | "server") -> this region's proxy to it."""
    server: ChildProcess | None = None
    replicator: ChildProcess | None = None

    @property
    def children(self) -> list[ChildProcess]:
        return [c for c in (self.server, self.replicator) if c is not None]


class Cluster:
    """The regions' processes and links; :meth:`start` brings up all, :meth:`stop` ends all.

    The steps of :meth:`start` are public so that a test can bring up part of a cluster;
    :meth:`stop` stops whatever was started.
    """

    def __init__(
        self, options: Options, *, server_command: ServerCommand = regions_plan.server_command
    ) -> None:
        self.options = options
        self.primary = options.regions[0]
        self._server_command = server_command
        self._lock: int | None = None
        self.regions: dict[str, _Region] = {}
        self._last_start: dict[str, float] = {}
        self.data_dir = options.data_dir
        """The cluster's directory."""

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Every step in order; a failure or a cancellation stops what was started."""
        try:
            await self.start_etcds()
            await self.start_links()
            self.write_topologies()
            await self.start_replicators()
            await self.start_servers()
        except BaseException:
            await self.stop()
            raise
        self.write_description()

    def _take_data_dir(self) -> None:
        """Locks the data dir and stops what a dead launcher left there."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._lock = etcd_lifetime.take_data_dir(self.data_dir)
        except (RuntimeError, OSError) as err:
            raise StartError(str(err)) from None
        for pid_file in sorted(self.data_dir.glob("*/*.pid")):
            if pid_file.name != etcd_lifetime.PID_FILE:  # the etcds clear their own
                stop_leftover(pid_file)

    def _check_base_ports(self) -> None:
        base, count = self.options.base_port, len(self.options.regions)
        for port in range(base, base + count) if base else ():
            if port_in_use(HOST, port):
                who = ", ".join(map(etcd_lifetime.describe, who_listens(port))) or "a process"
                raise StartError(f"port {port} on {HOST} is in use by {who}; end it or choose "
                                 "another --base-port (0 picks free ports)")

    async def start_etcds(self) -> None:
        """Lock the data dir, check the server ports, start every region's etcd."""
        if self._lock is None:
            self._take_data_dir()
        self._check_base_ports()
        names = self.options.regions
        # Chosen while the etcds hold theirs, in one call so that they differ from each other;
        # only a process outside the cluster can take one before its child binds it.
        for name in names:
            etcd = EmbeddedEtcd(self.data_dir / name, name=name)
            self.regions[name] = _Region(name, self.data_dir / name, etcd, "", "", "")
            await etcd.start_async()
        picked = iter(free_ports(HOST, len(names) * (2 if self.options.base_port else 3)))
        for i, region in enumerate(self.regions.values()):
            port = self.options.base_port + i if self.options.base_port else next(picked)
            region.listen = f"{HOST}:{port}"
            region.metrics = f"{HOST}:{next(picked)}"
            region.replicator_metrics = f"{HOST}:{next(picked)}"

    async def start_links(self) -> None:
        """One proxy per ordered pair of regions and per service (etcd, server)."""
        for name, region in self.regions.items():
            for other_name, other in self.regions.items():
                if other_name == name:
                    continue
                for service, target in (("etcd", other.etcd.endpoint), ("server", other.listen)):
                    proxy = LatencyProxy(target, self.options.latency,
                                         name=f"{name}->{other_name} {service}")
                    region.links[other_name, service] = proxy
                    await proxy.start()

    def view(self, seen_from: str) -> dict[str, Endpoints]:
        """Every region's endpoints as ``seen_from`` reaches them (others through its links)."""
        here = self.regions[seen_from]
        return {
            name: Endpoints((region.etcd.endpoint,), (region.listen,)) if name == seen_from
            else Endpoints((here.links[name, "etcd"].address,),
                           (here.links[name, "server"].address,))
            for name, region in self.regions.items()
        }

    def write_topologies(self) -> None:
        """Each region's topology file, in its directory."""
        for name, region in self.regions.items():
            text = regions_plan.topology_toml(self.primary, self.view(name), seen_from=name)
            (region.dir / "topology.toml").write_text(text)

    def _child(self, region: _Region, role: str, argv: list[str]) -> ChildProcess:
        return ChildProcess(f"{region.name} {role}", argv, log_path=region.dir / f"{role}.log",
                            pid_file=region.dir / f"{role}.pid")

    async def start_replicators(self) -> None:
        """A replicator in every region but the primary, reaching it through its link."""
        for name, region in self.regions.items():
            if name == self.primary:
                continue
            argv = regions_plan.replicator_command(
                name, primary_etcd=region.links[self.primary, "etcd"].address,
                region_etcd=region.etcd.endpoint, metrics=region.replicator_metrics,
                prefix=self.options.prefix, log_level=self.options.log_level)
            region.replicator = self._child(region, "replicator", argv)
            self._spawn(region.replicator)
        await asyncio.gather(*(self._wait_listening(r.replicator, r.replicator_metrics)
                               for r in self.regions.values() if r.replicator is not None))

    async def _wait_listening(self, child: ChildProcess, address: str) -> None:
        """Until ``child`` listens on ``address``; StartError if it exits or never does.

        A replicator binds its metrics endpoint once its settings are checked: past that, a
        failure is the supervisor's to handle.
        """
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + self.options.start_timeout
        while True:
            if child.poll() is not None:
                raise self._exited(child)
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                if time.monotonic() > deadline:
                    raise StartError(f"{child.name} not listening on {address} after "
                                     f"{self.options.start_timeout:g} s; its log "
                                     f"({child.log_path}) ends:\n{child.log_tail()}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return

    async def start_servers(self) -> None:
        """The primary's server, then (once it serves, so they find it up) the others."""
        self.spawn_server(self.primary)
        await self.wait_serving(self.primary)
        others = [name for name in self.regions if name != self.primary]
        for name in others:
            self.spawn_server(name)
        await asyncio.gather(*(self.wait_serving(name) for name in others))

    def spawn_server(self, name: str) -> None:
        """Start region ``name``'s server process (:meth:`wait_serving` waits for it)."""
        region = self.regions[name]
        argv = self._server_command(
            name, listen=region.listen, metrics=region.metrics,
            topology=region.dir / "topology.toml", prefix=self.options.prefix,
            grace=self.options.grace, log_level=self.options.log_level)
        region.server = self._child(region, "server", argv)
        self._spawn(region.server)

    async def wait_serving(self, name: str) -> None:
        """Until region ``name``'s server says SERVING; StartError if it exits or never does."""
        server = self.regions[name].server
        assert server is not None
        deadline = time.monotonic() + self.options.start_timeout
        async with grpc.aio.insecure_channel(self.regions[name].listen) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if server.poll() is not None:
                    raise self._exited(server)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise StartError(f"{server.name} not SERVING after "
                                     f"{self.options.start_timeout:g} s; its log "
                                     f"({server.log_path}) ends:\n{server.log_tail()}")
                await asyncio.sleep(0.1)

    def _spawn(self, child: ChildProcess) -> None:
        self._last_start[child.name] = time.monotonic()
        child.start()

    @staticmethod
    def _exited(child: ChildProcess) -> StartError:
        return StartError(f"{child.name} exited with status {child.poll()} while starting; "
                          f"its log ({child.log_path}) ends:\n{child.log_tail()}")

    # -- run --------------------------------------------------------------------------------

    async def supervise(self, every: float = 0.25) -> None:
        """Forever: start again any child or etcd that exited (at most once a second each)."""
        while True:
            await asyncio.sleep(every)
            changed = False
            for region in self.regions.values():
                exited = region.etcd.reap()
                if exited is not None:
                    say(f"{region.name} etcd (pid {exited[0]}) exited with status "
                         f"{exited[1]}; starting it again")
                    try:
                        await region.etcd.start_async()
                    except EtcdStartError as err:
                        say(f"{region.name} etcd cannot start again: {err}")
                for child in region.children:
                    status = child.poll()
                    recently = time.monotonic() - self._last_start.get(child.name, 0) < 1
                    if status is None or recently:
                        continue
                    self._spawn(child)
                    changed = True
                    say(f"{child.name} exited with status {status}; started again "
                         f"(pid {child.pid})")
            if changed:
                self.write_description()

    def cut(self) -> None:
        """Cut every link between regions (connections reset)."""
        for proxy in (p for r in self.regions.values() for p in r.links.values()):
            proxy.cut()

    def heal(self) -> None:
        """Heal every link."""
        for proxy in (p for r in self.regions.values() for p in r.links.values()):
            proxy.heal()

    # -- stop -------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Servers, replicators, links, etcds, in that order; then the data dir is free."""
        grace = self.options.grace
        regions = list(self.regions.values())
        await asyncio.gather(*(r.server.stop(grace) for r in regions if r.server is not None))
        await asyncio.gather(*(r.replicator.stop(grace) for r in regions
                               if r.replicator is not None))
        for region in regions:
            for proxy in region.links.values():
                await proxy.close()
        for region in regions:
            await asyncio.to_thread(region.etcd.stop, grace)
        if self._lock is not None:  # else the dir, and its cluster.json, are another's
            with contextlib.suppress(OSError):
                (self.data_dir / "cluster.json").unlink()
            etcd_lifetime.release_data_dir(self._lock)
            self._lock = None

    # -- describe ---------------------------------------------------------------------------

    def description(self) -> dict[str, Any]:
        """What ``cluster.json`` holds: every endpoint and pid, for scripts and tests."""
        regions: dict[str, Any] = {}
        for name, r in self.regions.items():
            regions[name] = {
                "role": "primary" if name == self.primary else "regional",
                "server": r.listen, "metrics": r.metrics, "etcd": r.etcd.endpoint,
                "etcd_pid": r.etcd.pid, "server_pid": r.server.pid if r.server else None,
                "replicator_pid": r.replicator.pid if r.replicator else None,
                "replicator_metrics": r.replicator_metrics if r.replicator else None,
                "topology": str(r.dir / "topology.toml"),
                "links": {f"{other}/{service}": proxy.address
                          for (other, service), proxy in r.links.items()},
            }
        return {"primary": self.primary, "latency": self.options.latency,
                "launcher_pid": os.getpid(), "data_dir": str(self.data_dir), "regions": regions}

    def write_description(self) -> None:
        """Writes ``DATA_DIR/cluster.json`` (replaced whole, so a reader never sees half)."""
        tmp = self.data_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(self.description(), indent=2))
        tmp.replace(self.data_dir / "cluster.json")

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The endpoint table's rows: per region its server, etcd, replicator and links."""
        rows: list[tuple[str, str, str, str]] = []
        latency = f"+{self.options.latency * 1000:g} ms each way"
        for name, r in self.regions.items():
            server = f"pid {r.server.pid}, " if r.server and r.server.pid else ""
            if name == self.primary:
                role, via = "server (primary)", ""
            else:
                role = "server"
                via = f"; to the primary via {r.links[self.primary, 'server'].address}"
            rows.append((name, role, r.listen,
                         f"{server}etcd {r.etcd.endpoint}, metrics {r.metrics}{via}"))
            rows.append((name, "etcd", r.etcd.endpoint, f"pid {r.etcd.pid}, data {r.dir}"))
            if r.replicator is not None:
                rows.append((name, "replicator", "-",
                             f"pid {r.replicator.pid}, from {self.primary} etcd via "
                             f"{r.links[self.primary, 'etcd'].address}, metrics "
                             f"{r.replicator_metrics}"))
            for other in self.regions:
                if other != name:
                    links = [r.links[other, service] for service in ("server", "etcd")]
                    rows.append((name, f"links to {other}", "-", ", ".join(
                        f"{service} {p.address} -> {p.target}"
                        for service, p in zip(("server", "etcd"), links, strict=True))
                        + f"; {latency}"))
        return rows


def say(line: str) -> None:
    """One line for the person running the launcher, on stderr."""
    print(f"modelreg up: {line}", file=sys.stderr, flush=True)
