"""Server wiring: the ModelService, health, reflection, and one interceptor for every RPC.

The interceptor is where cross-cutting work happens once: domain errors become rich statuses
(``errors.to_status``), every call is logged as one structlog JSON line carrying method,
request id, model, stage, code and revision, and counted in Prometheus metrics.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Histogram

from modelreg.server.api import errors
from modelreg.server.api.servicer import SERVICE, ModelServicer
from modelreg.server.api.watch_servicer import FleetServicer, WatchServicer
from modelreg.server.domain.errors import ModelregError, UnavailableError
from modelreg.server.domain.fleet import Fleet
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.watch import StageHub
from modelreg.v1 import (
    fleet_service_pb2,
    fleet_service_pb2_grpc,
    model_service_pb2,
    model_service_pb2_grpc,
    watch_service_pb2,
    watch_service_pb2_grpc,
)

log = structlog.get_logger("modelreg.rpc")

API_PREFIX = "/modelreg.v1."
"""Unary methods of every modelreg service go through the interceptor."""

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
class Metrics:
    """Per-server Prometheus metrics (own registry: no module globals, many servers per test)."""

    registry: CollectorRegistry
    rpcs: Counter
    latency: Histogram
    etcd_errors: Counter

    @classmethod
    def create(cls) -> Metrics:
        """Fresh metrics in a fresh registry."""
        reg = CollectorRegistry()
        return cls(
            reg,
            Counter("modelreg_rpcs", "RPCs handled, by method and status code",
                    ["method", "code"], registry=reg),
            Histogram("modelreg_rpc_duration_seconds", "RPC latency, by method", ["method"],
                      registry=reg,
                      buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5)),
            Counter("modelreg_etcd_errors", "etcd calls that failed as unavailable",
                    registry=reg),
        )


def _context_fields(request: Message) -> dict[str, Any]:
    """Request id, model and stage named by a request, for the log line."""
    fields: dict[str, Any] = {}
    if getattr(request, "request_id", ""):
        fields["request_id"] = request.request_id  # type: ignore[attr-defined]
    for attr in ("name", "parent", "model"):
        value = getattr(request, attr, None)
        if isinstance(value, Message):
            value = getattr(value, "name", "")
        if isinstance(value, str) and value.startswith("models/"):
            parts = value.split("/")
            fields["model"] = parts[1]
            if len(parts) >= 4 and parts[2] == "stages":
                fields["stage"] = parts[3]
            break
    return fields


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to statuses, logs and measures every unary call."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wraps unary-unary handlers of the model service (once per method); passes the rest."""
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not method.startswith(API_PREFIX):
            return handler
        self._wrapped[method] = self._wrap(handler, method.rsplit("/", 1)[-1])
        return self._wrapped[method]

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], short: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        inner = handler.unary_unary
        assert inner is not None
        metrics = self._metrics

        async def wrapped(request: Message, context: Any) -> Any:
            started = time.perf_counter()
            fields = _context_fields(request)
            code = grpc.StatusCode.OK
            response = None
            try:
                response = await inner(request, context)
                return response
            except ModelregError as err:
                code = errors.status_code(err)
                fields.update(reason=err.reason, error=err.message)
                if isinstance(err, UnavailableError):
                    metrics.etcd_errors.inc()
                await context.abort_with_status(errors.to_status(err))
            except Exception as err:
                if isinstance(err, grpc.aio.AbortError):
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_failed", method=short, **fields)
                raise
            finally:
                elapsed = time.perf_counter() - started
                metrics.rpcs.labels(short, code.name).inc()
                metrics.latency.labels(short).observe(elapsed)
                if response is not None and getattr(response, "revision", None):
                    fields["revision"] = response.revision
                level = log.info if code == grpc.StatusCode.OK else log.warning
                level("rpc", method=short, code=code.name,
                      duration_ms=round(elapsed * 1000, 3), **fields)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass
class ServerParts:
    """A built, not yet started server and the handles main needs to run it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    metrics: Metrics


def build_server(
    registry: Registry,
    listen: str,
    *,
    hub: StageHub,
    fleet: Fleet,
    bookmark_interval: float = 10.0,
    metrics: Metrics | None = None,
) -> ServerParts:
    """A grpc.aio server: every modelreg service, health (NOT_SERVING until set), reflection."""
    metrics = metrics or Metrics.create()
    server = grpc.aio.server(interceptors=[RpcInterceptor(metrics)], options=SERVER_OPTIONS,
                             maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry), server)
    watch_service_pb2_grpc.add_WatchServiceServicer_to_server(
        WatchServicer(hub, bookmark_interval=bookmark_interval), server)
    fleet_service_pb2_grpc.add_FleetServiceServicer_to_server(FleetServicer(fleet), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
        watch_service_pb2.DESCRIPTOR.services_by_name["WatchService"].full_name,
        fleet_service_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return ServerParts(server, port, health_servicer, metrics)


async def set_serving(parts: ServerParts, serving: bool) -> None:
    """Marks the server and ModelService SERVING or NOT_SERVING in the health service."""
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE):
        await parts.health.set(name, status)
