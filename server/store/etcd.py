"""``ModelStore`` on etcd, through aetcd's connection and generated stubs.

One ``Txn`` per commit: a MOD compare per guard, the writes on success, and a range read of
every key the caller wants refreshed on failure, so a lost race costs no extra round trip.
A read cache (LRU, bounded) remembers what this process last read or wrote; ``read(...,
fresh=False)`` answers from it. It is only ever an optimisation: callers guard every key they
read, so a stale cache entry can fail a commit, never let a wrong one through. Entries carry
the revision they were learned at and an older answer never replaces a newer one.

aetcd's ``transaction()`` drops the response header (the commit revision) and ignores
``range_end`` and ``limit`` on reads, so this module builds etcd's request messages itself
and calls ``client.kvstub``; aetcd still owns the channel, authentication and reconnects.

Reads are plain ``Range`` requests, never read-only ``Txn`` requests. etcd 3.5.0-3.5.4 hands the
caller's gRPC context to the apply step of a read-only Txn and panics when it is cancelled
there ("unexpected error during txn", etcd issue 14110): a client's 2 ms deadline, propagated
through this server, took the whole store down. ``Range`` checks the same context and merely
fails the request. A caller's cancellation still reaches etcd (so etcd stops the work it no
longer needs), just never on the Txn path. Every Txn this module sends has writes; those are
applied by etcd's raft loop without the caller's context.

**Failing fast while etcd hangs.** A refused connection fails at once (gRPC knows the channel is
down), but an etcd that is frozen or cut off behind a silent network holds every call for the
whole ``timeout``: each request, and each of a handler's sequential reads, would cost seconds.
So the first call that times out opens a breaker: until a probe (a count-only Range, retried in
the background) gets an answer, every call fails at once with ``STORE_UNAVAILABLE`` saying since
when etcd has been silent. A regional server forwarding a mutation to this one passes that fast
answer on, so a region learns in milliseconds that the primary cannot commit (static stability).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
import structlog
from aetcd import rpc

from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import (
    CommitResult,
    DeleteRange,
    Entry,
    Guard,
    Page,
    Put,
    RangeUnchanged,
    Snapshot,
    Unchanged,
    Write,
)

log = structlog.get_logger(__name__)

CHANNEL_OPTIONS = {
    # etcd restarts should be noticed within a second, not after grpc's default 120 s backoff.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # The ack a keepalive ping waits for (grpc core's own 60 s otherwise, whatever
    # keepalive_timeout_ms says): an etcd behind a silent network is dropped in seconds.
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}
LEASE_ROTATION = 3600.0
"""Seconds one lease serves expiring keys before a new one is granted."""
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
PROBE_TIMEOUT = 1.0
"""Seconds one probe of a silent etcd waits (at most the store's own timeout)."""
PROBE_PAUSE = 0.1
"""Seconds between probes of a silent etcd."""


@dataclass(frozen=True)
class _Cached:
    entry: Entry | None
    learned_at: int


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {text!r} must be HOST:PORT")
    return host, int(port)


class EtcdStore:
    """The production ``ModelStore``: every key under ``prefix`` in one etcd cluster."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str,
        *,
        timeout: float = 5.0,
        cache_size: int = 100_000,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [_endpoint(e) for e in endpoints]
        self.prefix = prefix
        self._prefix_bytes = prefix.encode()
        self._timeout = timeout
        self._auth = (username, password)
        self._current = 0
        self._client: aetcd.Client | None = None
        self._lock = asyncio.Lock()
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._leases: dict[int, tuple[int, float]] = {}
        self._ephemeral: dict[str, tuple[int, int]] = {}
        """Lease id and TTL of each key written by ``put_ephemeral``."""
        self._silent: tuple[str, float] | None = None
        """While the breaker is open: the endpoint that timed out and since when (monotonic)."""
        self._probe: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        """The etcd endpoint in use."""
        host, port = self.endpoints[self._current]
        return f"{host}:{port}"

    async def client(self) -> Any:
        """The connected aetcd client (for the watch feed, which needs the raw channel)."""
        return await self._kv()

    async def _kv(self) -> Any:
        async with self._lock:
            if self._client is None:
                host, port = self.endpoints[self._current]
                self._client = aetcd.Client(
                    host, port, username=self._auth[0], password=self._auth[1],
                    timeout=None, options=CHANNEL_OPTIONS,
                )
                await self._client.connect()
            return self._client

    async def close(self) -> None:
        """Closes the connection; the store reconnects if used again."""
        if self._probe is not None and self._probe is not asyncio.current_task():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
            self._silent = None
        async with self._lock:
            if self._client is not None:
                await self._client.close()
                self._client = None
                self._leases.clear()

    async def _call(self, method: str, request: Any) -> Any:
        if self._silent is not None:
            endpoint, since = self._silent
            silent_for = time.monotonic() - since
            raise UnavailableError(
                f"etcd at {endpoint} has not answered for {silent_for:.1f} s (a call timed out "
                f"after {self._timeout:g} s); failing fast until a probe gets an answer",
                metadata={"endpoint": endpoint},
            )
        client = await self._kv()
        used, failed = self._current, self.endpoint
        try:
            return await getattr(client.kvstub, method)(
                request, timeout=self._timeout, metadata=client.metadata
            )
        except grpc.aio.AioRpcError as err:
            if err.code() not in _UNAVAILABLE:
                raise
            # Fail over: the next call tries the next member. Once per member failure: the
            # concurrent Ranges of one read fail together and must not rotate twice.
            if len(self.endpoints) > 1 and self._current == used:
                self._current = (used + 1) % len(self.endpoints)  # before the await: no race
                await self.close()
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._open_breaker(failed)
            log.warning("etcd_unavailable", endpoint=failed, code=err.code().name)
            raise UnavailableError(
                f"etcd at {failed} is unavailable ({err.code().name}: {err.details()})",
                metadata={"endpoint": failed},
            ) from err

    def _open_breaker(self, endpoint: str) -> None:
        if self._silent is not None:
            return
        self._silent = (endpoint, time.monotonic())
        log.warning("etcd_silent", endpoint=endpoint, timeout=self._timeout,
                    action="failing fast until a probe gets an answer")
        self._probe = asyncio.create_task(self._probe_until_answered())

    async def _probe_until_answered(self) -> None:
        """Closes the breaker once a count-only Range of the current member gets an answer."""
        request = rpc.RangeRequest(key=self._prefix_bytes, count_only=True, limit=1)
        while self._silent is not None:
            try:
                client = await self._kv()
                await client.kvstub.Range(request, timeout=min(PROBE_TIMEOUT, self._timeout),
                                          metadata=client.metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and len(self.endpoints) > 1:
                    self._current = (self._current + 1) % len(self.endpoints)
                    await self.close()
                await asyncio.sleep(PROBE_PAUSE)
                continue
            since = self._silent[1]
            log.info("etcd_answering", endpoint=self.endpoint,
                     silent_for=round(time.monotonic() - since, 3))
            self._silent = None

    # -- encoding ---------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode()

    def _entry(self, kv: Any) -> Entry:
        return Entry(kv.key[len(self._prefix_bytes):].decode(), kv.value, kv.mod_revision)

    def _compare(self, guard: Guard) -> Any:
        if isinstance(guard, Unchanged):
            return rpc.Compare(
                key=self._key(guard.key), target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                mod_revision=guard.mod_revision,
            )
        assert isinstance(guard, RangeUnchanged)
        return rpc.Compare(
            key=self._key(guard.start), range_end=self._key(guard.end), target=rpc.Compare.MOD,
            result=rpc.Compare.LESS, mod_revision=guard.revision + 1,
        )

    async def _lease(self, ttl: int) -> int:
        """A lease that outlives ``ttl`` by at most an hour: one grant per hour, not per key."""
        now = time.monotonic()
        held = self._leases.get(ttl)
        if held is not None and now - held[1] < LEASE_ROTATION:
            return held[0]
        client = await self._kv()
        try:
            lease = await asyncio.wait_for(client.lease(ttl + int(LEASE_ROTATION)), self._timeout)
        except (aetcd.ClientError, TimeoutError) as err:
            raise UnavailableError(f"etcd at {self.endpoint} could not grant a lease: {err}",
                                   metadata={"endpoint": self.endpoint}) from err
        self._leases[ttl] = (lease.id, now)
        return int(lease.id)

    def _op(self, write: Write, lease: int = 0) -> Any:
        if isinstance(write, Put):
            return rpc.RequestOp(request_put=rpc.PutRequest(
                key=self._key(write.key), value=write.value, lease=lease))
        assert isinstance(write, DeleteRange)
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=self._key(write.start), range_end=self._key(write.end)))

    def _get_op(self, key: str) -> Any:
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(key)))

    # -- cache ------------------------------------------------------------------------------

    def _learn(self, key: str, entry: Entry | None, revision: int) -> None:
        cached = self._cache.get(key)
        if cached is not None and cached.learned_at > revision:
            return
        self._cache[key] = _Cached(entry, revision)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _snapshot(self, keys: Sequence[str], responses: Any, revision: int) -> Snapshot:
        entries: dict[str, Entry | None] = {}
        for key, resp in zip(keys, responses, strict=True):
            kvs = resp.response_range.kvs
            entries[key] = self._entry(kvs[0]) if kvs else None
            self._learn(key, entries[key], revision)
        return Snapshot(entries, revision, fresh=True)

    # -- ModelStore -------------------------------------------------------------------------

    async def read(self, keys: Sequence[str], *, fresh: bool) -> Snapshot:
        """Reads keys in one round trip, or from the cache when allowed and complete."""
        if not fresh and all(k in self._cache for k in keys):
            for k in keys:
                self._cache.move_to_end(k)
            return Snapshot({k: self._cache[k].entry for k in keys}, 0, fresh=False)
        if not keys:
            # A liveness probe: one count-only Range still gives the current revision.
            resp = await self._call("Range", rpc.RangeRequest(key=self._prefix_bytes,
                                                              count_only=True))
            return Snapshot({}, resp.header.revision, fresh=True)
        ranges = await asyncio.gather(*(self._range(k) for k in keys))
        revision = max(r.header.revision for r in ranges)
        # Concurrent Ranges may land on different revisions when a write slips between them;
        # re-read the laggards at the newest one so the snapshot is one revision, as promised.
        behind = [i for i, r in enumerate(ranges) if r.header.revision != revision]
        for i, resp in zip(behind, await asyncio.gather(
                *(self._range(keys[i], revision) for i in behind)), strict=True):
            ranges[i] = resp
        entries: dict[str, Entry | None] = {}
        for key, resp in zip(keys, ranges, strict=True):
            entries[key] = self._entry(resp.kvs[0]) if resp.kvs else None
            self._learn(key, entries[key], revision)
        return Snapshot(entries, revision, fresh=True)

    async def _range(self, key: str, revision: int = 0) -> Any:
        return await self._call("Range", rpc.RangeRequest(key=self._key(key), revision=revision))

    async def wait_for(self, revision: int, *, timeout: float) -> int:  # noqa: ASYNC109
        """The current etcd revision once it reaches ``revision``, or after ``timeout`` seconds.

        etcd is the committing cluster: it is past every revision it handed out, so this
        returns after one count-only Range unless ``revision`` is one it has not reached
        (another writer's next commit, or a revision of a replaced cluster); that it polls
        for, every 10 ms backing off to 200 ms, until ``timeout``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.01
        while True:
            current = (await self.read([], fresh=True)).revision
            left = deadline - loop.time()
            if current >= revision or left <= 0:
                return current
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.2)

    async def scan(self, start: str, end: str, *, limit: int, reverse: bool = False) -> Page:
        """Reads part of a range in key order (or reverse), fresh."""
        request = rpc.RangeRequest(
            key=self._key(start), range_end=self._key(end), limit=limit,
            sort_target=rpc.RangeRequest.KEY,
            sort_order=rpc.RangeRequest.DESCEND if reverse else rpc.RangeRequest.ASCEND,
        )
        resp = await self._call("Range", request)
        return Page([self._entry(kv) for kv in resp.kvs], resp.header.revision, resp.more)

    async def server_version(self) -> str:
        """The etcd release of the member in use (Maintenance.Status), "" if it is unreachable."""
        client = await self._kv()
        try:
            status = await client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=self._timeout, metadata=client.metadata)
        except grpc.aio.AioRpcError:
            return ""
        return str(status.version)

    async def last_change(self, start: str, end: str) -> tuple[int, int]:
        """The highest ``mod_revision`` in ``[start, end)`` (0 if empty) and the revision read.

        One sorted, keys-only Range: the evidence a watch needs to prove it has delivered
        every change of the range up to the read revision (see ``EtcdChangeFeed``).
        """
        request = rpc.RangeRequest(
            key=self._key(start), range_end=self._key(end), limit=1, keys_only=True,
            sort_target=rpc.RangeRequest.MOD, sort_order=rpc.RangeRequest.DESCEND,
        )
        resp = await self._call("Range", request)
        return (resp.kvs[0].mod_revision if resp.kvs else 0), resp.header.revision

    async def commit(
        self, guards: Sequence[Guard], writes: Sequence[Write], *, refresh: Sequence[str] = ()
    ) -> CommitResult:
        """One guarded Txn; on failure, the refreshed keys come back from the same Txn."""
        if not writes:
            # Without writes the Txn would be read-only: the path of etcd issue 14110.
            raise ValueError("a commit needs at least one write")
        for attempt in (1, 2):
            leases = {w.ttl: await self._lease(w.ttl) for w in writes
                      if isinstance(w, Put) and w.ttl}
            txn = rpc.TxnRequest(
                compare=[self._compare(g) for g in guards],
                success=[self._op(w, leases.get(w.ttl, 0) if isinstance(w, Put) else 0)
                         for w in writes],
                failure=[self._get_op(k) for k in refresh],
            )
            try:
                resp = await self._call("Txn", txn)
                break
            except grpc.aio.AioRpcError as err:
                # A lease can vanish under us (etcd restored from a backup): grant a new one.
                if attempt == 2 or err.code() != grpc.StatusCode.NOT_FOUND or not leases:
                    raise
                self._leases.clear()
        revision = resp.header.revision
        if not resp.succeeded:
            return CommitResult(False, revision, self._snapshot(refresh, resp.responses, revision))
        for write in writes:
            if isinstance(write, Put):
                self._learn(write.key, Entry(write.key, write.value, revision), revision)
            else:
                for key in [k for k in self._cache if write.start <= k < write.end]:
                    self._learn(key, None, revision)
        return CommitResult(True, revision)

    async def put_ephemeral(self, key: str, value: bytes, ttl: int) -> int:
        """Puts ``key`` on its own lease, kept alive by each call; gone ``ttl`` s after the last.

        The lease of each key is remembered in this process: a call refreshes it (one
        keep-alive) and rewrites the value; a lease that expired or was granted by another
        server process is replaced by a new one, which the key moves to.
        """
        client = await self._kv()
        held = self._ephemeral.get(key)
        try:
            alive = False
            if held is not None and held[1] == ttl:
                async for reply in client.leasestub.LeaseKeepAlive(
                    iter([rpc.LeaseKeepAliveRequest(ID=held[0])]),
                    timeout=self._timeout, metadata=client.metadata,
                ):
                    alive = reply.TTL > 0
                    break
            if not alive:
                granted = await client.leasestub.LeaseGrant(
                    rpc.LeaseGrantRequest(TTL=ttl), timeout=self._timeout,
                    metadata=client.metadata)
                held = (granted.ID, ttl)
                self._ephemeral[key] = held
        except grpc.aio.AioRpcError as err:
            if err.code() not in _UNAVAILABLE:
                raise
            raise UnavailableError(f"etcd at {self.endpoint} is unavailable ({err.code().name})",
                                   metadata={"endpoint": self.endpoint}) from err
        assert held is not None
        resp = await self._call("Put", rpc.PutRequest(key=self._key(key), value=value,
                                                      lease=held[0]))
        return int(resp.header.revision)

    async def delete_ephemeral(self, key: str) -> tuple[int, bool]:
        """Deletes ``key`` now, and revokes its lease if this process granted it.

        The key is deleted whoever holds its lease (its reports may have gone to another server
        process); the lease, when it is ours, is revoked too so it does not linger empty.
        """
        resp = await self._call("DeleteRange", rpc.DeleteRangeRequest(key=self._key(key)))
        held = self._ephemeral.pop(key, None)
        if held is not None:
            client = await self._kv()
            with contextlib.suppress(grpc.aio.AioRpcError):  # expired already: nothing to tidy
                await client.leasestub.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=held[0]), timeout=self._timeout,
                    metadata=client.metadata)
        return int(resp.header.revision), resp.deleted > 0
