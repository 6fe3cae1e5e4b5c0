"""One server process, built from its ``ServerConfig`` and nothing else.

``App.from_config(config)`` builds nothing that runs; ``async with`` starts it, what can fail
fastest first: the metrics and gRPC addresses are bound, the embedded etcd started (when
``config.etcd`` names no cluster), the store connected; then the stage hub, the health loop,
the metrics endpoint and the etcd supervisor run in one ``asyncio.TaskGroup`` and the gRPC
server starts. Leaving the block stops everything in reverse: health says NOT_SERVING, RPCs get
``config.grace`` seconds, the tasks are cancelled and awaited (so the supervisor cannot restart
the etcd being stopped), the store is closed, etcd stopped. A start that fails half way undoes
what it did, and a task that fails cancels the block and ends it with its error: no path
leaves a part running.

``modelreg serve``/``up`` and the tests build servers only this way, so what is tested is what
runs. The app holds the store through the domain's ports (``ModelStore``, ``ChangeFeed``);
:func:`_open_etcd` is the one place that knows they are etcd.

With a topology (``--topology``, ``--region``) the server is one region's: its store is that
region's etcd (unless ``--etcd`` names others), and outside the primary region it forwards
every mutation to the primary's servers and reads its replication lag from its region's etcd
(:func:`_open_region`). In the primary region, or without a topology, it runs as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from types import TracebackType

import structlog

from modelreg.server import etcd_lifetime, etcd_ports, etcd_versions
from modelreg.server.api.forward import Forwarder
from modelreg.server.api.grpc import (
    CannotListenError,
    Locality,
    ServerParts,
    add_services,
    build_server,
    set_serving,
)
from modelreg.server.api.identity import AllowAll, HeaderAuthenticator
from modelreg.server.api.metrics import Metrics, MetricsEndpoint
from modelreg.server.config import ServerConfig
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.fleet import Fleet
from modelreg.server.domain.identity import Authenticator, Authorizer
from modelreg.server.domain.pins import Pins
from modelreg.server.domain.ports import ChangeFeed, LagSource, ModelStore
from modelreg.server.domain.regions import RegionInfo, Regions
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.stage_hub import StageHub
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.etcd_supervisor import EtcdSupervisor
from modelreg.server.pin_reporter import PinReporter
from modelreg.server.rollout_coordinator import Coordinator, open_coordinator, runs_coordinator
from modelreg.server.store.etcd import EtcdStore
from modelreg.server.store.etcd_watch import EtcdChangeFeed
from modelreg.server.store.regional import RegionalStore
from modelreg.server.store.regional_feed import RegionalChangeFeed
from modelreg.server.store.replica_status import ReplicaStatusLag
from modelreg.server.topology import Topology

log = structlog.get_logger("modelreg.server")


class StartError(Exception):
    """This process cannot serve as configured; one line naming what and the setting's flag."""


def _bind_problem(setting: str, address: str) -> StartError | None:
    """Why ``address`` (set by ``setting``) cannot be bound, asked of the kernel, in one line.

    Asked before gRPC binds, because grpc says only "Failed to bind" (and logs its own
    multi-line complaint): this finds the reason and, for a port in use, the process holding it.
    """
    host, _, port = address.rpartition(":")
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as err:
        return StartError(f"cannot listen on {address} ({ServerConfig.flag(setting)}): {err}")
    first: StartError | None = None
    for family, kind, proto, _, where in found:
        with socket.socket(family, kind, proto) as probe:
            # As grpc and asyncio bind: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as err:
                why = (err.strerror or str(err)).lower()
                holders = etcd_ports.who_listens(int(port)) if err.errno == errno.EADDRINUSE else []
                if holders:
                    why += " by " + ", ".join(map(etcd_lifetime.describe, holders))
                first = first or StartError(
                    f"cannot listen on {address} ({ServerConfig.flag(setting)}): {why}")
                continue
        return None  # grpc serves on every address it can bind, as long as there is one
    return first


def _cannot_listen(setting: str, address: str) -> StartError:
    return _bind_problem(setting, address) or StartError(
        f"cannot listen on {address} ({ServerConfig.flag(setting)})")


class App:
    """A modelreg server: gRPC services over one etcd cluster and key prefix.

    The attributes below the constructor's are set while the app runs (inside ``async with``).
    """

    store: ModelStore
    """The registry's store (etcd, through the domain's port)."""
    hub: StageHub
    registry: Registry
    """Every domain operation over ``store`` (the rollout coordinator drives ``rollouts``)."""
    fleet: Fleet
    """The fleet view of this server's region (its ``readiness`` is the coordinator's)."""
    port: int
    """The gRPC port bound (``config.listen`` may say 0)."""
    metrics_port: int | None
    """The metrics port bound, or None when the endpoint is disabled."""
    endpoints: tuple[str, ...]
    """The etcd endpoints in use: ``config.etcd``, or the embedded etcd's."""
    etcd: EmbeddedEtcd | None = None
    """The embedded etcd, when the config names no cluster."""
    topology: Topology | None = None
    """The deployment's regions, when the config names a topology file."""
    forwarder: Forwarder | None = None
    """Outside the primary region: the channels mutations are forwarded over."""
    coordinator: Coordinator | None = None
    """The rollout coordinator, when this server runs one (``config.coordinator``)."""
    pins: Pins
    """Break glass in this server's region (and, in the primary, the regions' reports)."""
    reporter: PinReporter | None = None
    """Outside the primary region: reports the region's break-glass events to the primary."""

    def __init__(
        self, config: ServerConfig, *, authenticator: Authenticator, authorizer: Authorizer
    ) -> None:
        self.config = config
        self.metrics = Metrics.create()
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._stack: AsyncExitStack | None = None
        self._health_wake = asyncio.Event()

    @classmethod
    def from_config(
        cls,
        config: ServerConfig,
        *,
        authenticator: Authenticator | None = None,
        authorizer: Authorizer | None = None,
    ) -> App:
        """The server ``config`` describes, not started; identity defaults to today's header.

        ``authenticator`` and ``authorizer`` replace the identity seam's defaults (the
        ``x-modelreg-actor`` header, everyone allowed), e.g. in tests.
        """
        return cls(config, authenticator=authenticator or HeaderAuthenticator(),
                   authorizer=authorizer or AllowAll())

    @property
    def address(self) -> str:
        """``HOST:PORT`` the gRPC server listens on, with the port actually bound."""
        return f"{self.config.listen.rpartition(':')[0]}:{self.port}"

    async def __aenter__(self) -> App:
        stack = AsyncExitStack()
        try:
            await self._start(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None, "not running"
        return await stack.__aexit__(exc_type, exc, tb)

    async def _start(self, stack: AsyncExitStack) -> None:
        config = self.config
        endpoint = await self._bind_metrics(stack)
        problem = _bind_problem("listen", config.listen)
        if problem is not None:
            raise problem
        try:
            parts = build_server(config.listen, metrics=self.metrics,
                                 authenticator=self._authenticator, authorizer=self._authorizer)
        except CannotListenError:
            raise _cannot_listen("listen", config.listen) from None
        self.port = parts.port
        stack.push_async_callback(parts.server.stop, None)  # also frees a port never served
        self.topology = topology = config.load_topology()
        regional = (topology is not None and config.region != topology.primary
                    and config.region_reads == "replica")
        own = topology.region(config.region).etcd if topology is not None else ()
        self.endpoints = config.etcd or own or (await self._start_etcd(stack),)
        # The store seam. Outside the primary region the store reads the region's replica
        # (replication/layout.py) at the primary's revisions and commits to the primary; with
        # --region-reads direct it reads its etcd as is (a region without an etcd of its own,
        # served from the primary's across the link).
        store: ModelStore
        feed: ChangeFeed
        if regional:
            assert topology is not None
            rstore = await stack.enter_async_context(
                _open_regional(config, topology, self.endpoints))
            store, feed = rstore, RegionalChangeFeed(rstore, progress_interval=_progress(config))
        else:
            estore = await stack.enter_async_context(_open_etcd(self.endpoints, config))
            store, feed = estore, _feed(estore, config)
        self.store = store
        # Break glass: the region's own keys (pins and their audit), outside the primary only.
        local = rstore.local if regional else None
        self.hub = StageHub(store, feed, queue_size=config.watch_queue, pins=local)
        lag, self.forwarder = await stack.enter_async_context(_open_region(config, topology))
        listed = _regions(config, topology)
        regions = Regions(config.region_name, listed, store, lag=lag, link=self.forwarder)
        locality = Locality(config.region_name, store, self.forwarder, config.min_revision_wait)
        self.pins = Pins(store, local, regions, changed=lambda: self._pins_changed())
        self.registry = Registry.over(store, regions=[r.name for r in listed], local=local,
                                      local_events=self.pins.local_events if local else None)
        self.fleet = Fleet(store, region=config.region_name, local=local)
        add_services(parts, self.registry, hub=self.hub, fleet=self.fleet,
                     regions=regions, pins=self.pins, locality=locality,
                     bookmark_interval=config.bookmark_interval)
        if local is not None and self.forwarder is not None:
            self.reporter = PinReporter(self.pins, self.forwarder, store,
                                        region=config.region_name)
        coordinator = None
        if runs_coordinator(config, topology):
            hub = self.hub
            coordinator = await stack.enter_async_context(open_coordinator(
                config, topology, self.registry.rollouts, self.fleet.readiness, self.metrics,
                hint=lambda: hub.ready.is_set() and bool(hub.pending_rollouts()),
                guard=self.registry.guard, local_health=self.fleet.health,
                own_etcd=self.endpoints,
                candidate=f"{socket.gethostname()}/{self.address}"))
        self.coordinator = coordinator

        tasks = await stack.enter_async_context(asyncio.TaskGroup())
        children: list[asyncio.Task[None]] = []
        # Cancelled before the group ends; etcd is stopped only after it has ended, so the
        # supervisor cannot restart an etcd being stopped.
        stack.callback(lambda: [task.cancel() for task in children])
        if self.etcd is not None:
            supervisor = EtcdSupervisor(self.etcd, on_change=self._etcd_changed,
                                        on_restart=self.metrics.etcd_restarts.inc)
            children.append(tasks.create_task(supervisor.run(), name="etcd-supervisor"))
        children.append(tasks.create_task(self.hub.run(), name="stage-hub"))
        if endpoint is not None:
            children.append(tasks.create_task(endpoint.serve(), name="metrics-endpoint"))
        if coordinator is not None:
            children.append(tasks.create_task(coordinator.run(), name="rollout-coordinator"))
        if self.reporter is not None:
            children.append(tasks.create_task(self.reporter.run(), name="break-glass-reporter"))
        alive = (lambda: supervisor.up) if self.etcd is not None else (lambda: True)
        health = tasks.create_task(self._follow_health(parts, alive), name="health")
        children.append(health)

        await parts.server.start()
        stack.push_async_callback(self._drain, parts, health)
        log.info("serving", listen=self.address, etcd=",".join(self.endpoints),
                 prefix=config.prefix, metrics=self.metrics_port, region=config.region_name,
                 primary=topology.primary if topology is not None else config.region_name)

    async def _bind_metrics(self, stack: AsyncExitStack) -> MetricsEndpoint | None:
        self.metrics_port = None
        if not self.config.metrics_listen:
            return None
        host, _, port = self.config.metrics_listen.rpartition(":")
        endpoint = MetricsEndpoint(self.metrics.registry)
        try:
            await endpoint.bind(host, int(port))
        except OSError:
            raise _cannot_listen("metrics_listen", self.config.metrics_listen) from None
        stack.callback(endpoint.close)
        self.metrics_port = endpoint.port
        return endpoint

    async def _start_etcd(self, stack: AsyncExitStack) -> str:
        """Starts the embedded etcd (forking on this, the main, thread: see ``start_async``)."""
        config = self.config
        etcd = EmbeddedEtcd(config.data_dir, host=config.etcd_listen_host,
                            client_port=config.etcd_listen_port)

        async def stop() -> None:
            await asyncio.to_thread(etcd.stop)
            log.info("etcd_stopped")

        log.info("etcd_starting", data_dir=str(config.data_dir))
        await etcd.start_async()
        stack.push_async_callback(stop)
        if etcd.stale_stopped is not None:
            log.warning("etcd_stale_stopped", pid=etcd.stale_stopped, data_dir=str(config.data_dir),
                        why="left running by a modelreg that did not stop it")
        log.info("etcd_started", endpoint=etcd.endpoint, pid=etcd.pid, log=str(etcd.log_path))
        self.etcd = etcd
        return etcd.endpoint

    def _pins_changed(self) -> None:
        if self.reporter is not None:
            self.reporter.kick()

    async def _etcd_changed(self, _: bool) -> None:
        self._health_wake.set()

    async def _follow_health(self, parts: ServerParts, etcd_alive: Callable[[], bool]) -> None:
        """Keeps the health status in step with etcd: SERVING while it answers.

        The supervisor wakes it when the embedded etcd exits or is back, so a crash shows as
        NOT_SERVING without waiting for the next ping.
        """
        serving: bool | None = None
        wake = self._health_wake
        while True:
            wake.clear()
            ok = etcd_alive()
            if ok:
                try:
                    await self.store.read([], fresh=True)
                except UnavailableError:
                    ok = False
            if ok != serving:
                await set_serving(parts, ok)
                log.info("health", serving=ok, etcd=",".join(self.endpoints))
                serving = ok
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.config.health_interval)

    async def _drain(self, parts: ServerParts, health: asyncio.Task[None]) -> None:
        """NOT_SERVING for good, then in-flight RPCs get the grace period."""
        health.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await health
        await set_serving(parts, False)
        log.info("stopping", grace=self.config.grace)
        await parts.server.stop(self.config.grace)


def _progress(config: ServerConfig) -> float:
    # Progress checks keep the hub's revision (and so bookmarks) current and detect a silent
    # watch; twice per bookmark interval, at most once a second.
    return min(1.0, config.bookmark_interval / 2, config.etcd_timeout)


def _feed(store: EtcdStore, config: ServerConfig) -> ChangeFeed:
    return EtcdChangeFeed(store, progress_interval=_progress(config))


@contextlib.asynccontextmanager
async def _open_regional(
    config: ServerConfig, topology: Topology, endpoints: tuple[str, ...]
) -> AsyncIterator[RegionalStore]:
    """The regional store: the replica in ``endpoints`` for reads, the primary's for commits."""
    region, primary = topology.region(config.region), topology.primary_region
    store = RegionalStore(primary.etcd, endpoints, config.prefix,
                          region_prefix=region.prefix, region_name=region.name,
                          timeout=config.etcd_timeout)
    try:
        log.info("regional_store", region=region.name, region_etcd=",".join(endpoints),
                 primary=primary.name, primary_etcd=",".join(primary.etcd))
        yield store
    finally:
        await store.close()


def _regions(config: ServerConfig, topology: Topology | None) -> list[RegionInfo]:
    """The regions ``ListRegions`` lists: the topology's, or this server's one region."""
    if topology is None:
        return [RegionInfo(config.region_name, True, ())]
    return [RegionInfo(r.name, r.name == topology.primary, r.servers) for r in topology.regions]


@contextlib.asynccontextmanager
async def _open_region(
    config: ServerConfig, topology: Topology | None
) -> AsyncIterator[tuple[LagSource | None, Forwarder | None]]:
    """Outside the primary region: the replication lag's source and the forwarder; then closed.

    In the primary region (or without a topology) there is neither: this server commits every
    mutation itself and is never behind. The lag comes from the replicator's status record in
    the region's etcd (``Region.prefix``, else ``--prefix``).
    """
    if topology is None or config.region == topology.primary:
        yield None, None
        return
    region, primary = topology.region(config.region), topology.primary_region
    forwarder = Forwarder(region=region.name, primary=primary.name, servers=primary.servers,
                          timeout=config.forward_timeout,
                          connect_timeout=config.forward_connect_timeout)
    status_store = EtcdStore(region.etcd, region.prefix or config.prefix,
                             timeout=config.etcd_timeout)
    try:
        forwarder.connect()
        yield ReplicaStatusLag(status_store), forwarder
    finally:
        await forwarder.close()
        await status_store.close()


@contextlib.asynccontextmanager
async def _open_etcd(endpoints: tuple[str, ...], config: ServerConfig) -> AsyncIterator[EtcdStore]:
    """The etcd store (connected lazily), its release logged and warned about, then closed."""
    store = EtcdStore(endpoints, config.prefix, timeout=config.etcd_timeout)
    try:
        try:
            version = await store.server_version()
        except UnavailableError:
            version = "unknown (etcd does not answer yet)"
        log.info("etcd_connected", etcd=",".join(endpoints), etcd_version=version)
        bugs = etcd_versions.known_bugs(version)
        if bugs:
            log.warning("etcd_version_has_known_bugs", etcd_version=version, bugs=bugs,
                        advice=etcd_versions.ADVICE)
        yield store
    finally:
        await store.close()
