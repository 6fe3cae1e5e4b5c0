"""A server's Prometheus metrics and their endpoint, where every GET answers in text format.

The endpoint is an asyncio server in the app's event loop, not prometheus_client's thread
server: it is bound and closed with the rest of the app (a busy port fails the start at once,
as the gRPC port does), and closing it needs no poll interval. It speaks just enough HTTP/1.1
for scrapers and ``curl``: one request per connection, any path, ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


@dataclass(frozen=True)
class Metrics:
    """Per-server Prometheus metrics (own registry: no module globals, many servers per test)."""

    registry: CollectorRegistry
    rpcs: Counter
    latency: Histogram
    etcd_errors: Counter
    etcd_restarts: Counter
    """Restarts of the embedded etcd after it exited (``modelreg up``)."""
    rollouts_committed: Counter
    """Rollouts this server's coordinator committed."""
    rollouts_aborted: Counter
    """Rollouts this server's coordinator aborted, by cause (deadline, failures, lifecycle)."""
    coordinator_leader: Gauge
    """1 while this server's rollout coordinator is the elected one, else 0."""
    guard_fired: Counter
    """Times this server's coordinator's rollout guard fired, by outcome (rolled_back, or
    refused: the stage had no version to roll back to)."""

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
            Counter("modelreg_etcd_restarts", "Restarts of the embedded etcd after it exited",
                    registry=reg),
            Counter("modelreg_rollouts_committed", "Rollouts this server's coordinator committed",
                    registry=reg),
            Counter("modelreg_rollouts_aborted",
                    "Rollouts this server's coordinator aborted, by cause", ["cause"],
                    registry=reg),
            Gauge("modelreg_rollout_coordinator_is_leader",
                  "1 while this server's rollout coordinator is the elected one", registry=reg),
            Counter("modelreg_rollout_guard_fired",
                    "Times this server's coordinator's rollout guard fired, by outcome",
                    ["outcome"], registry=reg),
        )


MAX_REQUEST_HEAD = 16 * 1024
"""Bytes of request line and headers read before answering; the body (if any) is ignored."""
READ_TIMEOUT = 10.0
"""Seconds a client gets to send its request head."""


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class MetricsEndpoint:
    """Serves ``registry`` on the address :meth:`bind` took, while :meth:`serve` runs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port bound (useful when started on port 0)."""
        assert self._server is not None, "bind() first"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def bind(self, host: str, port: int) -> None:
        """Binds the address; ``OSError`` if it cannot be bound. Nothing is answered yet."""
        self._server = await asyncio.start_server(
            self._handle, host.strip("[]"), port, limit=MAX_REQUEST_HEAD, start_serving=False)

    async def serve(self) -> None:
        """Answers scrapes until cancelled, then closes the listening socket."""
        assert self._server is not None, "bind() first"
        try:
            await self._server.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        """Closes the listening socket (a bound endpoint that never served, too)."""
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ", 1)[0]
            if method in (b"GET", b"HEAD"):
                body = generate_latest(self._registry)
                reply = _response("200 OK", body, CONTENT_TYPE_LATEST)
                if method == b"HEAD":
                    reply = reply[: len(reply) - len(body)]
            else:
                reply = _response("405 Method Not Allowed", b"GET only\n", "text/plain")
            writer.write(reply)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that sent no complete request head, or left: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
