"""Server wiring: the modelreg services, health, reflection, and one interceptor for every RPC.

The interceptor is where cross-cutting work happens once, for unary and streaming RPCs alike:
the caller is authenticated and authorised (the domain's identity ports, one table of RPC →
permission) before the handler runs, and its principal is what the handler sees
(``identity.principal()``); undecodable requests and domain errors become rich statuses
(``errors.to_status``), any other exception becomes INTERNAL with an error id that finds its
traceback in the log, and every call is logged as one structlog JSON line carrying method,
actor, request id, model, stage, revision and the code its caller got (CANCELLED or
DEADLINE_EXCEEDED too), and counted in Prometheus (:mod:`~modelreg.server.api.outcome`).
Health and reflection pass untouched.

Regions are handled here too, after the caller is admitted: outside the primary region a
mutation (``forward.FORWARDED``) goes to the primary's servers instead of its handler
(:mod:`~modelreg.server.api.forward`), and every other call first waits for the minimum
revision its metadata may ask for (:mod:`~modelreg.server.api.consistency`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelreg.server.api import consistency, identity
from modelreg.server.api.fleet_service import FleetServicer
from modelreg.server.api.forward import FORWARDED, Forwarder
from modelreg.server.api.metrics import Metrics
from modelreg.server.api.model_service import SERVICE, ModelServicer
from modelreg.server.api.outcome import LOGGED_CHARS, Outcome
from modelreg.server.api.region_service import RegionServicer
from modelreg.server.api.rollout_service import SERVICE as ROLLOUT_SERVICE
from modelreg.server.api.rollout_service import RolloutServicer
from modelreg.server.api.watch_service import WatchServicer
from modelreg.server.domain.errors import FieldViolation, InvalidArgumentError, clip
from modelreg.server.domain.fleet import Fleet
from modelreg.server.domain.identity import (
    PERMISSIONS,
    Authenticator,
    Authorizer,
    Caller,
    Permission,
    Principal,
)
from modelreg.server.domain.pins import Pins
from modelreg.server.domain.ports import ModelStore
from modelreg.server.domain.regions import Regions
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.stage_hub import StageHub
from modelreg.v1 import (
    fleet_service_pb2,
    fleet_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
    region_service_pb2,
    region_service_pb2_grpc,
    rollout_service_pb2,
    rollout_service_pb2_grpc,
    watch_service_pb2,
    watch_service_pb2_grpc,
)
from modelreg.v1.errors_pb2 import ErrorReason

API_PREFIX = "/modelreg.v1."
"""Every method of every modelreg service goes through the interceptor."""

SERVER_OPTIONS = [
    # Watch streams sit idle for long: keepalive finds dead peers and frees their streams.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Many watch streams share a connection (one per inference server process, typically).
    ("grpc.max_concurrent_streams", 1000),
    ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
]
MAX_CONCURRENT_RPCS = 50_000
"""Streams and calls in flight per server; past it new calls get RESOURCE_EXHAUSTED at once,
so a reconnect storm cannot take unbounded memory (bench: 10,000 streams use ~300 MiB)."""


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it.

    grpc.aio parses a request before any handler or interceptor code runs and answers a parse
    error with UNKNOWN and protobuf's exception text; a deserializer that returns this instead
    of raising lets the wrapped handler answer INVALID_ARGUMENT with a rich status.
    """

    method: str


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception:  # DecodeError for bad UTF-8, truncated or corrupt wire bytes
            return Undecodable(method)

    return parse


def _decoded(request: object) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidArgumentError(
            [FieldViolation("request", f"is not a valid {request.method}Request protobuf "
                            "message (truncated or corrupt bytes, or a string that is not UTF-8)")],
            reason=ErrorReason.UNDECODABLE_REQUEST,
        )
    return request


@dataclass(frozen=True)
class Locality:
    """Where this server stands among the regions: what the interceptor needs to know of it."""

    region: str
    """This server's region (named in errors)."""
    store: ModelStore
    """The store the region's reads come from (minimum revisions wait for it)."""
    forwarder: Forwarder | None = None
    """Outside the primary region: where mutations go. None: this server commits them."""
    min_revision_wait: float = 10.0
    """Longest wait for a call's minimum revision, in seconds."""


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """One path for every modelreg RPC, unary and streaming: admit, decode, map errors, log."""

    def __init__(
        self, metrics: Metrics, authenticator: Authenticator, authorizer: Authorizer
    ) -> None:
        self._metrics = metrics
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self.locality: Locality | None = None
        """Set by :func:`add_services`, before the first call (the store exists only then)."""

    async def _admit(
        self, method: str, permission: Permission, context: Any, outcome: Outcome
    ) -> Principal:
        """Authenticates and authorises the caller; its principal is the handler's from here.

        Each RPC runs in its own asyncio task (grpc.aio), so the principal set here is seen by
        this call's handler only, for as long as it runs, streams included.
        """
        caller = Caller(tuple(context.invocation_metadata() or ()), context.peer())
        principal = await self._authenticator.authenticate(caller)
        outcome.fields["actor"] = clip(principal.name, LOGGED_CHARS)
        if principal.via:
            outcome.fields["forwarded_by"] = clip(principal.via, LOGGED_CHARS)
        await self._authorizer.authorize(principal, method, permission)
        identity.set_principal(principal)
        return principal

    async def _settle(self, context: Any, outcome: Outcome) -> None:
        """Waits until the store has applied the call's minimum revision, if it names one."""
        wanted = consistency.min_revision(tuple(context.invocation_metadata() or ()))
        where = self.locality
        if wanted and where is not None:
            outcome.fields["min_revision"] = wanted
            await consistency.wait_for_revision(
                where.store, wanted, region=where.region, remaining=context.time_remaining(),
                max_wait=where.min_revision_wait)

    def _forwarder(self, method: str) -> Forwarder | None:
        """Where ``method`` goes instead of its handler: the primary, for a mutation here."""
        if self.locality is None or method not in FORWARDED:
            return None
        return self.locality.forwarder

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wraps the handlers of the modelreg services (once per method); passes the rest."""
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(API_PREFIX):
            return handler
        if handler.unary_unary is not None:
            self._wrapped[method] = self._wrap_unary(handler, handler.unary_unary, method)
        elif handler.unary_stream is not None:
            self._wrapped[method] = self._wrap_stream(handler, handler.unary_stream, method)
        else:  # no client-streaming RPCs in the API (buf's advice); fail loudly if one appears
            raise TypeError(f"{method}: client-streaming RPCs are not wired")
        return self._wrapped[method]

    def _wrap_unary(
        self, handler: grpc.RpcMethodHandler[Any, Any], inner: Any, method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        metrics, admit, permission = self._metrics, self._admit, PERMISSIONS[method]
        settle, forwarder = self._settle, self._forwarder(method)
        short = method.rsplit("/", 1)[-1]

        async def wrapped(request: object, context: Any) -> Any:
            outcome = Outcome(metrics, short, request)
            try:
                principal = await admit(method, permission, context, outcome)
                request = _decoded(request)
                if forwarder is not None:
                    outcome.fields["forwarded_to"] = forwarder.primary
                    response = await forwarder.forward(
                        method, request, principal, context.time_remaining())  # type: ignore[arg-type]
                else:
                    await settle(context, outcome)
                    response = await inner(request, context)
                outcome.succeeded(context, response)
                return response
            except BaseException as err:
                status = outcome.failed(err, context)
                if status is None:
                    raise
                await context.abort_with_status(status)
            finally:
                outcome.done()

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer, short),
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(
        self, handler: grpc.RpcMethodHandler[Any, Any], inner: Any, method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        metrics, admit, permission = self._metrics, self._admit, PERMISSIONS[method]
        settle, short = self._settle, method.rsplit("/", 1)[-1]

        async def wrapped(request: object, context: Any) -> AsyncIterator[Any]:
            outcome = Outcome(metrics, short, request)
            try:
                await admit(method, permission, context, outcome)
                await settle(context, outcome)
                async for message in inner(_decoded(request), context):
                    yield message
                outcome.succeeded(context)
            except BaseException as err:
                status = outcome.failed(err, context)
                if status is None:
                    raise
                await context.abort_with_status(status)
            finally:
                outcome.done()

        return grpc.unary_stream_rpc_method_handler(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer, short),
            response_serializer=handler.response_serializer,
        )


class CannotListenError(OSError):
    """The gRPC server could not bind its address (grpc does not say why)."""

    def __init__(self, address: str) -> None:
        super().__init__(f"cannot listen on {address}")
        self.address = address


@dataclass
class ServerParts:
    """A built, not yet started server and the handles the app needs to run it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    metrics: Metrics
    interceptor: RpcInterceptor


SERVICES = (
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    watch_service_pb2.DESCRIPTOR.services_by_name["WatchService"],
    fleet_service_pb2.DESCRIPTOR.services_by_name["FleetService"],
    region_service_pb2.DESCRIPTOR.services_by_name["RegionService"],
    rollout_service_pb2.DESCRIPTOR.services_by_name["RolloutService"],
)
"""The modelreg services this server runs: every one of their RPCs goes through the
interceptor and needs a row in the permission table."""


def unguarded_methods() -> list[str]:
    """Methods of :data:`SERVICES` without a permission (must be none), and rows for no method."""
    methods = {f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods}
    return sorted(methods ^ set(PERMISSIONS))


def build_server(
    listen: str,
    *,
    metrics: Metrics,
    authenticator: Authenticator,
    authorizer: Authorizer,
) -> ServerParts:
    """A grpc.aio server bound to ``listen``, with health (NOT_SERVING) but no service yet.

    Binding comes first so that a taken address fails the start before anything else runs
    (:func:`add_services` completes the server).

    Raises:
        CannotListenError: ``listen`` cannot be bound.
        RuntimeError: An RPC has no permission in the table (a bug: see ``PERMISSIONS``).

    """
    unguarded = unguarded_methods()
    if unguarded:
        raise RuntimeError(f"the permission table does not match the RPCs: {unguarded}")
    interceptor = RpcInterceptor(metrics, authenticator, authorizer)
    server = grpc.aio.server(interceptors=[interceptor], options=SERVER_OPTIONS,
                             maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:  # grpc >= 1.5x: "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise CannotListenError(listen)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return ServerParts(server, port, health_servicer, metrics, interceptor)


def add_services(
    parts: ServerParts,
    registry: Registry,
    *,
    hub: StageHub,
    fleet: Fleet,
    regions: Regions,
    pins: Pins,
    locality: Locality,
    bookmark_interval: float = 10.0,
) -> None:
    """Adds every modelreg service, and reflection over them and health, to a built server.

    ``locality`` tells the interceptor this server's region: whether mutations are forwarded
    to the primary, and which store minimum revisions wait for.
    """
    server = parts.server
    parts.interceptor.locality = locality
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry), server)
    watch_service_pb2_grpc.add_WatchServiceServicer_to_server(
        WatchServicer(hub, bookmark_interval=bookmark_interval), server)
    fleet_service_pb2_grpc.add_FleetServiceServicer_to_server(FleetServicer(fleet), server)
    region_service_pb2_grpc.add_RegionServiceServicer_to_server(
        RegionServicer(regions, pins), server)
    rollout_service_pb2_grpc.add_RolloutServiceServicer_to_server(
        RolloutServicer(registry.rollouts), server)
    names = (*(s.full_name for s in SERVICES),
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)


async def set_serving(parts: ServerParts, serving: bool) -> None:
    """Marks the server, ModelService and RolloutService SERVING or NOT_SERVING in health."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE, ROLLOUT_SERVICE):
        await parts.health.set(name, status)
