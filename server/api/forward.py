"""Forwarding: a server outside the primary region sends every mutation to the primary's servers.

All writes commit in the primary's etcd (one compare-and-swap there is atomic for every
region), so a regional server answers reads, watches and the fleet view from its own store and
hands each mutation of :data:`FORWARDED` to a server of the primary region, over a channel of
its own and the generated stub of the method's service (``ModelService``, ``RolloutService``,
``RegionService``).
The interceptor (:mod:`modelreg.server.api.grpc`) does this for every forwarded method in one
place, after it has authenticated and authorised the caller; no handler knows about regions.

What crosses, and what comes back:

* the request message as the caller sent it (its ``request_id`` included: the primary applies
  a repeated id once, wherever it came from);
* the caller's principal, in ``x-modelreg-forwarded-actor``, with this server's region in
  ``x-modelreg-forwarded-by`` (:mod:`modelreg.server.api.identity` says on what basis the
  primary believes it); never the caller's own headers;
* the caller's deadline, capped at ``forward_timeout``;
* the primary's response unchanged (its ``revision`` and etags are the primary's, as in every
  region), or its error unchanged: code, message and ``google.rpc.Status`` details
  (:class:`PrimaryAnswered`).

**Static stability.** Reaching no primary server must not cost the caller its whole deadline:
a channel gRPC already knows is down (TRANSIENT_FAILURE) is skipped at once, one that is
connecting gets ``forward_connect_timeout``, and when every server is skipped the call fails
UNAVAILABLE (``PRIMARY_UNAVAILABLE``, naming the primary and what was tried) with nothing
sent. gRPC keeps reconnecting in the background (at most a second apart), so mutations work
again within about a second of the primary's return. A server that fails while a call is on
the wire is failed over only when the call carries a request id (then the primary applies it
at most once); otherwise the caller is told it may have been applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelreg.server.api.identity import FORWARDED_ACTOR_HEADER, FORWARDED_BY_HEADER
from modelreg.server.domain.errors import PrimaryUnavailableError
from modelreg.server.domain.identity import Principal
from modelreg.v1 import model_service_pb2_grpc, region_service_pb2_grpc, rollout_service_pb2_grpc

_MODEL = "/modelreg.v1.ModelService/"
FORWARDED: frozenset[str] = frozenset((*(_MODEL + name for name in (
    "CreateModel", "UpdateModel", "DeleteModel", "CreateModelVersion", "UpdateModelVersion",
    "PromoteVersion", "RollbackStage", "ClearStage",
)), "/modelreg.v1.RolloutService/CancelRollout", "/modelreg.v1.RegionService/ReportBreakGlass"))
"""The mutations a server outside the primary region forwards: every ModelService,
RolloutService and RegionService RPC that writes (``tests/server`` checks that each other RPC
of theirs is a Get, List or Watch), except break glass (``PinStage``, ``UnpinStage``), which
a region's own server answers, written in the region's etcd only."""

_STATUS_DETAILS = "grpc-status-details-bin"
_READY = grpc.ChannelConnectivity.READY
_DOWN = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


def channel_options(connect_timeout: float) -> list[tuple[str, Any]]:
    """Options of the channels to the primary: quick to notice it gone, quick to see it back."""
    connect_ms = max(100, int(connect_timeout * 1000))
    return [
        # The connect deadline of one attempt is max(backoff, min_reconnect_backoff): a
        # blackholed primary costs one connect timeout, not gRPC's default 20 s.
        ("grpc.min_reconnect_backoff_ms", connect_ms),
        ("grpc.initial_reconnect_backoff_ms", min(connect_ms, 1000)),
        ("grpc.max_reconnect_backoff_ms", max(connect_ms, 1000)),
        # A primary that froze under an open connection is found by keepalive (the servers
        # accept a ping every 10 s).
        ("grpc.keepalive_time_ms", 15_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        # The ping's ack timeout proper (grpc core waits 60 s otherwise, whatever
        # keepalive_timeout_ms says): a black-holed primary is given up in seconds.
        ("grpc.http2.ping_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # the forwarder decides what is retried, and where
    ]


@dataclass(frozen=True)
class ForwardedStatus(grpc.Status):
    """A status to end the caller's call with, exactly as the primary ended the forwarded one."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class PrimaryAnswered(Exception):
    """The primary refused a forwarded call: its status goes back to the caller unchanged."""

    def __init__(self, err: grpc.aio.AioRpcError) -> None:
        super().__init__(err.details())
        self.code = err.code()
        self.message = err.details() or ""
        trailing = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if k == _STATUS_DETAILS)
        self.status = ForwardedStatus(self.code, self.message, trailing)
        self.reason = error_info(err)[0]


def error_info(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The ``ErrorInfo`` reason and metadata a modelreg server sent ("" for a transport error)."""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    return "", {}


def _on_the_wire_failure(err: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE from the connection, not from the primary (which always sends details)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and rpc_status.from_call(err) is None


class Link:
    """One channel to one server of another region, and whether it is connected.

    The forwarder's channels to the primary, and the rollout coordinator's to every region.
    """

    def __init__(self, address: str, options: list[tuple[str, Any]]) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=options)

    def state(self) -> grpc.ChannelConnectivity:
        """The channel's state; asks an idle channel to connect."""
        return self.channel.get_state(try_to_connect=True)

    async def ready(self, within: float) -> bool:
        """Whether the channel is (or, within ``within`` seconds, becomes) connected.

        False at once when gRPC knows the server down (TRANSIENT_FAILURE): its last attempt
        failed, and it retries in the background.
        """
        state = self.state()
        if state == _READY or state in _DOWN:
            return state == _READY
        try:
            async with asyncio.timeout(within):
                while state != _READY and state not in _DOWN:
                    await self.channel.wait_for_state_change(state)
                    state = self.state()
        except TimeoutError:
            pass
        return state == _READY


class _Link(Link):
    """One channel to one primary server, with the stub of each forwarded service."""

    def __init__(self, address: str, options: list[tuple[str, Any]]) -> None:
        super().__init__(address, options)
        self.stubs: dict[str, Any] = {
            "modelreg.v1.ModelService": model_service_pb2_grpc.ModelServiceStub(self.channel),
            "modelreg.v1.RolloutService":
                rollout_service_pb2_grpc.RolloutServiceStub(self.channel),
            "modelreg.v1.RegionService":
                region_service_pb2_grpc.RegionServiceStub(self.channel),
        }
        """The stub of each service with forwarded methods, by full service name."""


class Forwarder:
    """Sends mutations to the primary region's servers, failing over between them."""

    def __init__(
        self,
        *,
        region: str,
        primary: str,
        servers: Sequence[str],
        timeout: float,
        connect_timeout: float,
    ) -> None:
        if not servers:
            raise ValueError(f"the primary region {primary} lists no servers")
        self.region = region
        self.primary = primary
        self.servers = tuple(servers)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        options = channel_options(connect_timeout)
        self._links = [_Link(a, options) for a in self.servers]
        self._preferred = self._links[0]

    def connect(self) -> None:
        """Starts connecting every channel, so the first mutation finds one ready."""
        for link in self._links:
            link.state()

    async def close(self) -> None:
        """Closes every channel (calls in flight are cancelled)."""
        await asyncio.gather(*(link.channel.close() for link in self._links))

    async def reachable(self) -> bool:
        """Whether a primary server is connected, or connects within the connect timeout."""
        ready = await asyncio.gather(*(link.ready(self._connect_timeout) for link in self._links))
        return any(ready)

    def _ordered(self) -> list[_Link]:
        """The server that answered last first (one warm connection), then the rest in order."""
        return [self._preferred, *(link for link in self._links if link is not self._preferred)]

    async def forward(
        self, method: str, request: Message, principal: Principal, remaining: float | None
    ) -> Message:
        """The primary's response to ``method`` (a full method path of :data:`FORWARDED`).

        Args:
            method: e.g. ``/modelreg.v1.ModelService/PromoteVersion``.
            request: The caller's request, sent unchanged.
            principal: The caller, as this server authenticated it.
            remaining: Seconds left of the caller's deadline (None: it has none).

        Raises:
            PrimaryAnswered: The primary refused it (its status passes through unchanged).
            PrimaryUnavailableError: No primary server could be reached, or a call without
                a request id failed on the wire.

        """
        if principal.via:
            # Its sender thinks this server is the primary; this server thinks otherwise.
            raise PrimaryUnavailableError(self.primary, self.servers, (
                f"region {principal.via} forwarded this mutation to region {self.region}, "
                f"which is not the primary: the servers' topologies disagree"))
        loop = asyncio.get_running_loop()
        budget = self._timeout if remaining is None else min(remaining, self._timeout)
        deadline = loop.time() + budget
        metadata = ((FORWARDED_ACTOR_HEADER, principal.name), (FORWARDED_BY_HEADER, self.region))
        _, service, name = method.split("/")
        tried: list[str] = []
        for link in self._ordered():
            left = deadline - loop.time()
            if left <= 0:
                tried.append("the call's deadline came first")
                break
            if not await link.ready(min(self._connect_timeout, left)):
                tried.append(f"{link.address}: {link.state().name.lower()}")
                continue
            try:
                response: Message = await getattr(link.stubs[service], name)(
                    request, timeout=max(0.0, deadline - loop.time()), metadata=metadata)
            except grpc.aio.AioRpcError as err:
                if not _on_the_wire_failure(err):
                    raise PrimaryAnswered(err) from None
                tried.append(f"{link.address}: {err.details()}")
                if not getattr(request, "request_id", ""):
                    tried.append("the call was sent and may have been applied: re-read "
                                 "before retrying (a request_id makes retries safe)")
                    break
                continue
            self._preferred = link
            return response
        raise PrimaryUnavailableError(self.primary, self.servers, "; ".join(tried))
