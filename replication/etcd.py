"""One etcd cluster (the primary or a region's) as the replicator uses it.

aetcd owns the channel, authentication and reconnects; requests are etcd's own messages sent
through aetcd's generated stubs, because aetcd's helpers drop what the replicator needs (the
response header's revision, ``range_end`` and ``limit`` in a Txn, watch resumption). A call
that fails as unavailable raises :class:`EtcdUnavailable` and moves the next call to the next
endpoint; a read at a compacted revision raises :class:`Compacted`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aetcd
import grpc
from aetcd import rpc

from modelreg.replication.errors import Compacted, EtcdUnavailable

CHANNEL_OPTIONS = {
    # An etcd restart should be noticed within a second, not after grpc's 120 s backoff.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # How long a ping waits for its ack (60 s by default): in grpc core, since grpc/grpc#34647,
    # this and not keepalive_timeout_ms ends a connection that stopped answering. Without it
    # a black-holed link to the primary was held for over a minute (grpcio 1.85).
    "grpc.http2.ping_timeout_ms": 5_000,
    # A watch response carries whole revisions; one may hold every key of a large Txn.
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def send(call: Any, request: Any) -> None:
    """Writes ``request`` to the stream ``call``; a call that has ended raises its own error.

    For a write to an RPC that ended since it was last read (its connection reset while the
    caller was between a read and a write, such as a watch's progress probe), grpc.aio raises
    ``asyncio.InvalidStateError``, not the RPC's ``AioRpcError``: a caller that handles stream
    failures would crash on it instead of reconnecting. A finished call's read raises that
    error (or returns EOF, which the caller's own read sees next).
    """
    try:
        await call.write(request)
    except asyncio.InvalidStateError:
        if not call.done():
            raise  # written after done_writing(): a bug, not a failure
        await call.read()


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as aetcd takes it."""
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class Etcd:
    """Calls into one etcd cluster, failing over between its endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self._endpoints = [parse_endpoint(e) for e in endpoints]
        self._names = [e.strip() for e in endpoints]
        self.timeout = timeout
        self._auth = (username, password)
        self._current = 0
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        """The endpoint in use."""
        return self._names[self._current]

    async def client(self) -> Any:
        """The connected aetcd client (connects on first use)."""
        async with self._lock:
            if self._client is None:
                host, port = self._endpoints[self._current]
                client = aetcd.Client(host, port, username=self._auth[0], password=self._auth[1],
                                      timeout=None, options=CHANNEL_OPTIONS)
                try:
                    await client.connect()
                except Exception as err:  # aetcd wraps the authentication call's errors
                    self._rotate()
                    raise EtcdUnavailable(f"etcd at {self.endpoint}: {err}") from err
                self._client = client
            return self._client

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self._endpoints)

    async def close(self) -> None:
        """Closes the channel; the next call reconnects."""
        async with self._lock:
            if self._client is not None:
                client, self._client = self._client, None
                await client.close()

    async def _failed(self, used: int) -> None:
        """After an unavailable error: the next call uses the next endpoint.

        Once per failure, however many concurrent calls failed with it.
        """
        if len(self._endpoints) > 1 and self._current == used:
            self._rotate()
            await self.close()

    async def call(self, stub: str, method: str, request: Any) -> Any:
        """One unary call, e.g. ``call("kvstub", "Txn", request)``."""
        client = await self.client()
        used = self._current
        try:
            return await getattr(getattr(client, stub), method)(
                request, timeout=self.timeout, metadata=client.metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() in _UNAVAILABLE:
                await self._failed(used)
                raise EtcdUnavailable(
                    f"etcd at {self._names[used]} did not answer {method} ({err.code().name})"
                ) from err
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many requests" in (
                    err.details() or ""):  # etcd sheds load while raft catches up: back off
                raise EtcdUnavailable(f"etcd at {self._names[used]} is overloaded") from err
            if err.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in (err.details() or ""):
                raise Compacted(getattr(request, "revision", 0)) from err
            raise

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        resp = await self.call("leasestub", "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl))
        return int(resp.ID)

    async def revoke(self, lease: int) -> None:
        """Ends a lease now (its keys go with it)."""
        await self.call("leasestub", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease))

    async def keepalive(self, lease: int) -> int:
        """Renews a lease; the seconds it has left (0 or less: it had expired)."""
        client = await self.client()
        used = self._current
        call = client.leasestub.LeaseKeepAlive(timeout=self.timeout, metadata=client.metadata)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
            resp = await call.read()
        except grpc.aio.AioRpcError as err:
            await self._failed(used)
            raise EtcdUnavailable(
                f"etcd at {self._names[used]} did not renew the lease ({err.code().name})"
            ) from err
        finally:
            call.cancel()
        if resp is grpc.aio.EOF:
            raise EtcdUnavailable(f"etcd at {self._names[used]} ended the lease stream")
        return int(resp.TTL)

    async def txn(self, request: Any) -> Any:
        """A Txn."""
        return await self.call("kvstub", "Txn", request)

    async def range(self, request: Any) -> Any:
        """A Range."""
        return await self.call("kvstub", "Range", request)

    async def get(self, key: bytes) -> tuple[Any | None, int]:
        """The key-value at ``key`` (or None) and the revision it was read at."""
        resp = await self.range(rpc.RangeRequest(key=key))
        return (resp.kvs[0] if resp.kvs else None), resp.header.revision

    async def revision(self) -> int:
        """The cluster's current revision (one cheap Range)."""
        resp = await self.range(rpc.RangeRequest(key=b"\0", count_only=True))
        return int(resp.header.revision)

    async def watch_call(self) -> Any:
        """A new bidirectional Watch stream, one per watch.

        aetcd's own watcher serialises watch creation and cannot resume.
        """
        client = await self.client()
        return rpc.WatchStub(client.channel).Watch(metadata=client.metadata)

    async def unavailable(self, err: grpc.aio.AioRpcError) -> EtcdUnavailable:
        """The error to raise for a failed stream, after failing over."""
        name = self.endpoint
        await self._failed(self._current)
        return EtcdUnavailable(f"etcd at {name}: stream failed ({err.code().name})")
