"""Where the rollout coordinator learns whether a region is ready or healthy: own fleet, or gRPC.

A region's readiness is summarised by the region itself, from its own serving nodes' reports
(``FleetService.GetRegionReadiness``): node traffic stays in the region, only the summary
crosses. The coordinator's own region is asked in-process (the fleet domain's ``readiness``);
every other region over gRPC, at the servers the topology lists for it, with

* ``x-modelreg-min-revision`` = the rollout's start revision, so a region answers only once it
  has replicated the rollout (before that its nodes cannot have heard of it); a region that has
  not answers ``REVISION_NOT_YET_APPLIED``, which counts as *not ready*;
* a short deadline, and fail-over between the region's servers: a server gRPC knows is down is
  skipped at once, one connecting gets the connect timeout.

Nothing here raises: a region that cannot be asked is *not ready*, and ``error`` says why
(unreachable and what was tried, not yet replicated, what it answered instead). That is the
safety rule of the coordinator: it commits only on positive answers from every region.

The rollout guard asks the same way for a region's health on a committed version
(``FleetService.GetRegionHealth``, with the commit's revision as the minimum): a region that
cannot be asked does not breach, with ``error`` saying why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from modelreg.server.api.consistency import MIN_REVISION_HEADER
from modelreg.server.api.forward import Link, channel_options, error_info
from modelreg.server.api.identity import ACTOR_HEADER
from modelreg.server.domain.errors import ModelregError
from modelreg.server.domain.transaction import now_timestamp
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1.errors_pb2 import ErrorReason

if TYPE_CHECKING:
    from modelreg.v1.fleet_service_pb2_grpc import FleetServiceAsyncStub

COORDINATOR_ACTOR = "modelreg-coordinator"
"""The principal the coordinator names in its calls to other regions and in its audit events."""

LocalReadiness = Callable[[fs.GetRegionReadinessRequest],
                          Awaitable[fs.GetRegionReadinessResponse]]
"""The fleet domain's ``readiness``: this server's own region, from its own store."""
LocalHealth = Callable[[fs.GetRegionHealthRequest], Awaitable[fs.GetRegionHealthResponse]]
"""The fleet domain's ``health``: this server's own region, from its own store."""

_NOT_APPLIED = ErrorReason.Name(ErrorReason.REVISION_NOT_YET_APPLIED)
MAX_ERROR = 512
"""Characters of a region's error kept in the rollout record."""


class _Link(Link):
    """One channel to one server of a region, with its FleetService stub."""

    def __init__(self, address: str, options: list[tuple[str, Any]]) -> None:
        super().__init__(address, options)
        self.stub = fleet_service_pb2_grpc.FleetServiceStub(self.channel)


Metadata = tuple[tuple[str, str], ...]
Ask = Callable[["FleetServiceAsyncStub", float, Metadata], Awaitable[Message]]
"""One call to one server of a region: ``ask(stub, seconds, metadata)``."""


class RegionReadiness:
    """Asks each region of a rollout whether it is ready (or healthy).

    This server's region in-process, the others by gRPC.
    """

    def __init__(
        self,
        *,
        own_region: str,
        local: LocalReadiness,
        regions: Mapping[str, Sequence[str]],
        timeout: float,
        connect_timeout: float,
        local_health: LocalHealth | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """Readiness of ``own_region`` from ``local``, of the others from their servers.

        Args:
            own_region: This server's region.
            local: The fleet domain's ``readiness``, for ``own_region``.
            regions: Every other region's server addresses (the topology's ``servers``).
            timeout: Longest one question to a region may take, in seconds.
            connect_timeout: Longest a server that is connecting is waited for.
            local_health: The fleet domain's ``health``, for ``own_region`` (the guard's).
            clock: Unix nanoseconds, for ``check_time``.

        """
        self.own_region = own_region
        self._local = local
        self._local_health = local_health
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._clock = clock
        options = channel_options(connect_timeout)
        self._links = {name: [_Link(a, options) for a in servers]
                       for name, servers in regions.items() if name != own_region}

    def connect(self) -> None:
        """Starts connecting every channel, so the first question finds them ready."""
        for links in self._links.values():
            for link in links:
                link.state()

    async def close(self) -> None:
        """Closes every channel."""
        await asyncio.gather(*(link.channel.close()
                               for links in self._links.values() for link in links))

    def _elsewhere(self, region: str) -> str:
        return (f"region {region} is not in this server's topology "
                f"({', '.join(sorted([self.own_region, *self._links]))})")

    async def readiness(
        self, region: str, request: fs.GetRegionReadinessRequest, *, min_revision: int
    ) -> res.RegionReadiness:
        """``region``'s readiness for ``request``; not ready, with ``error``, if it cannot say."""
        answer = res.RegionReadiness()
        if region == self.own_region:
            got = await self._ask_local(region, self._local, request)
        elif region in self._links:
            async def ask(stub: FleetServiceAsyncStub, within: float,
                          metadata: Metadata) -> Message:
                response: fs.GetRegionReadinessResponse = await stub.GetRegionReadiness(
                    request, timeout=within, metadata=metadata)
                return response
            got = await self._ask_remote(region, self._links[region], ask, min_revision,
                                         what="the rollout")
        else:
            got = self._elsewhere(region)
        if isinstance(got, str):
            answer.error = got
        else:
            assert isinstance(got, fs.GetRegionReadinessResponse)
            answer.CopyFrom(got.readiness)
        answer.region = region
        answer.check_time.CopyFrom(now_timestamp(self._clock()))
        if answer.error:
            answer.ready = False
            answer.error = answer.error[:MAX_ERROR]
        return answer

    async def health(
        self, region: str, request: fs.GetRegionHealthRequest, *, min_revision: int
    ) -> res.RegionHealth:
        """``region``'s health for ``request``; not breached, with ``error``, if it cannot say."""
        answer = res.RegionHealth()
        if region == self.own_region and self._local_health is not None:
            got = await self._ask_local(region, self._local_health, request)
        elif region in self._links:
            async def ask(stub: FleetServiceAsyncStub, within: float,
                          metadata: Metadata) -> Message:
                response: fs.GetRegionHealthResponse = await stub.GetRegionHealth(
                    request, timeout=within, metadata=metadata)
                return response
            got = await self._ask_remote(region, self._links[region], ask, min_revision,
                                         what="the commit")
        elif region == self.own_region:
            got = f"region {region}: this coordinator cannot read its own region's health"
        else:
            got = self._elsewhere(region)
        if isinstance(got, str):
            answer.error = got
        else:
            assert isinstance(got, fs.GetRegionHealthResponse)
            answer.CopyFrom(got.health)
        answer.region = region
        answer.check_time.CopyFrom(now_timestamp(self._clock()))
        if answer.error:
            answer.breached = False
            answer.error = answer.error[:MAX_ERROR]
        return answer

    async def _ask_local(self, region: str, local: Callable[[Any], Awaitable[Message]],
                         request: Message) -> Message | str:
        try:
            async with asyncio.timeout(self._timeout):
                return await local(request)
        except ModelregError as err:
            return f"region {region}: {err.message}"
        except TimeoutError:
            return f"region {region}: no answer from its store in {self._timeout:g} s"

    async def _ask_remote(
        self,
        region: str,
        links: list[_Link],
        ask: Ask,
        min_revision: int,
        *,
        what: str,
    ) -> Message | str:
        """The answer of the first server of ``region`` that gives one; else why none did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        metadata: Metadata = ((MIN_REVISION_HEADER, str(min_revision)),
                              (ACTOR_HEADER, COORDINATOR_ACTOR))
        tried: list[str] = []
        for link in list(links):
            left = deadline - loop.time()
            if left <= 0:
                tried.append(f"no answer in {self._timeout:g} s")
                break
            if not await link.ready(min(self._connect_timeout, left)):
                tried.append(f"{link.address}: {link.state().name.lower()}")
                continue
            try:
                response = await ask(link.stub, max(0.001, deadline - loop.time()), metadata)
            except grpc.aio.AioRpcError as err:
                reason, info = error_info(err)
                if reason == _NOT_APPLIED:
                    return (f"region {region} has not yet replicated {what} (it applied "
                            f"revision {info.get('applied_revision', '?')}, {what} "
                            f"{'started' if what == 'the rollout' else 'was'} at "
                            f"{min_revision})")
                if reason and err.code() != grpc.StatusCode.UNAVAILABLE:
                    # A refusal (the server is too old, the request wrong...): every server
                    # of the region would give the same one.
                    return (f"region {region} answered {err.code().name} ({reason}): "
                            f"{err.details()}")
                # The connection failed, or this server cannot reach its store: try another.
                tried.append(f"{link.address}: {err.code().name.lower()} ({err.details()})")
                continue
            # Prefer the server that answered: one warm connection per region.
            links.remove(link)
            links.insert(0, link)
            return response
        return f"region {region} is unreachable: {'; '.join(tried) or 'no servers'}"
