"""The regional etcd as a regional server reads it: the replicator's layout, one cut at a time.

Everything here follows :mod:`modelreg.replication.layout`, the replicator's contract with its
readers. A **cut** is the pair (state, regional revision ``r``) read with one Range of the state
key; every data Range of the same answer is then pinned at ``r`` (``revision=r``), so a reader
never mixes two generations nor half of a replicator commit. (Two Ranges rather than a
read-only Txn: etcd 3.5.0-3.5.4 can panic on a cancelled read-only Txn, etcd issue 14110.)

Besides reads this module holds what needs the regional revision space, which must never leave
it: where a watch of the replicator's commits has to start for a given primary revision
(:meth:`Replica.locate`), the changes of a generation switch (:meth:`Replica.switch_changes`),
the region-local keys written with their leases (serving node reports), and the wait for an
applied revision (:meth:`Replica.wait_for`), which follows the state key with one shared watch
while anybody waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from aetcd import rpc

from modelreg.replication import layout
from modelreg.replication.errors import Compacted, EtcdUnavailable
from modelreg.replication.etcd import Etcd
from modelreg.replication.layout import Envelope, State
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import Batch, Change, CompactedError

log = structlog.get_logger(__name__)

FOLLOW_BACKOFF = (0.05, 1.0)
"""First and longest pause of the shared state watch after the regional etcd failed it."""


@dataclass(frozen=True)
class Cut:
    """A consistent view of the region: its state, and the regional revision it was read at."""

    state: State
    at: int
    """The regional revision: pin every data Range of the same answer to it."""

    @property
    def applied(self) -> int:
        """The primary revision the cut reflects: the revision a read reports."""
        return self.state.applied


@contextlib.contextmanager
def unavailable(etcd: Etcd) -> Iterator[None]:
    """Maps the regional etcd not answering to the domain's ``UnavailableError``."""
    try:
        yield
    except EtcdUnavailable as err:
        raise UnavailableError(f"regional {err}", metadata={"endpoint": etcd.endpoint}) from err


class Replica:
    """Reads of one region's replicated keyspace (prefix ``R``), as the layout prescribes."""

    def __init__(self, etcd: Etcd, prefix: bytes, region: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.region = region
        self.state_key = layout.state_key(prefix)
        self._applied = 0
        """The highest applied revision seen (by a cut or the shared watch)."""
        self._moved = asyncio.Event()
        self._waiters = 0
        self._follower: asyncio.Task[None] | None = None
        self._trouble = ""
        """Why the shared watch last failed, for the error of a wait that timed out."""
        self._leases: dict[bytes, tuple[int, int]] = {}
        """Lease id and TTL of each region-local key this process wrote."""

    def _name(self) -> str:
        return f"region {self.region!r}" if self.region else "the region"

    # -- cuts and ranges ---------------------------------------------------------------------

    def _saw(self, applied: int) -> None:
        if applied > self._applied:
            self._applied = applied
            self._moved.set()
            self._moved = asyncio.Event()

    async def cut(self) -> Cut:
        """The current state and its regional revision; ``UnavailableError`` if there is none.

        No state means the replicator has not finished the region's first copy.
        """
        with unavailable(self.etcd):
            resp = await self.etcd.range(rpc.RangeRequest(key=self.state_key))
        if not resp.kvs:
            raise UnavailableError(
                f"{self._name()} holds no replica yet: its replicator has not finished the first "
                f"copy of the primary (no {self.state_key.decode(errors='replace')!r})",
                metadata={"region": self.region})
        state = State.decode(bytes(resp.kvs[0].value))
        self._saw(state.applied)
        return Cut(state, int(resp.header.revision))

    async def state_at(self, revision: int) -> State | None:
        """The state as of a regional revision (None before the first copy).

        Raises ``Compacted`` if the regional etcd compacted that revision.
        """
        with unavailable(self.etcd):
            resp = await self.etcd.range(rpc.RangeRequest(key=self.state_key, revision=revision))
        return State.decode(bytes(resp.kvs[0].value)) if resp.kvs else None

    def data(self, generation: int) -> bytes:
        """The prefix of a generation's copies of the primary keys."""
        return layout.data_prefix(self.prefix, generation)

    async def range(self, at: int, start: bytes, end: bytes, *, limit: int = 0,
                    reverse: bool = False, by_value: bool = False,
                    count_only: bool = False) -> Any:
        """One Range of absolute regional keys pinned at regional revision ``at``.

        ``by_value`` sorts by value, descending: on envelopes that is by primary
        ``mod_revision``, since an envelope starts with a constant format byte and then the
        ``mod_revision`` as a big-endian integer (non-negative, so byte order is numeric order).
        Should the envelope become a protobuf message, this must go (the contract test of
        ``latest`` would fail first).
        Raises ``Compacted`` if ``at`` was compacted meanwhile.
        """
        if by_value:
            target, order = rpc.RangeRequest.VALUE, rpc.RangeRequest.DESCEND
        else:
            target = rpc.RangeRequest.KEY
            order = rpc.RangeRequest.DESCEND if reverse else rpc.RangeRequest.ASCEND
        request = rpc.RangeRequest(key=start, range_end=end, revision=at, limit=limit,
                                   sort_target=target, sort_order=order, count_only=count_only)
        with unavailable(self.etcd):
            return await self.etcd.range(request)

    @staticmethod
    def envelope(kv: Any) -> Envelope:
        """The replicated value of a regional key-value."""
        return Envelope.decode(bytes(kv.value))

    # -- following the replicator -----------------------------------------------------------

    async def locate(self, from_revision: int) -> int:
        """The regional revision to watch the replicator's commits from, for ``from_revision``.

        It is just past the last commit that left the region below ``from_revision``, so the
        first commit the watch sees is the first to apply a primary revision at or above it.
        Applied revisions only grow with regional revisions, so the commit is found by galloping
        down from the current state, then bisecting (a few Ranges, even far back). If the
        regional etcd compacted that commit, the answer is a compacted revision: the watch
        created there reports the compaction (see ``servable_from``).
        """
        cut = await self.cut()
        if cut.applied < from_revision:
            return cut.at + 1

        async def below(revision: int) -> tuple[bool, bool]:
            """Whether the region was below ``from_revision`` there, and if it is compacted."""
            try:
                state = await self.state_at(revision)
            except Compacted:
                return True, True
            return state is None or state.applied < from_revision, False

        high, low, low_compacted = cut.at, 0, False  # applied(high) >= from_revision > low's
        step = 1
        while high - step > 0:  # gallop: the revision asked for is usually recent
            is_below, compacted = await below(high - step)
            if is_below:
                low, low_compacted = high - step, compacted
                break
            high -= step
            step *= 2
        while high - low > 1:
            middle = (low + high) // 2
            is_below, compacted = await below(middle)
            if is_below:
                low, low_compacted = middle, compacted
            else:
                high = middle
        return low if low_compacted else low + 1

    async def servable_from(self, compact_revision: int, fallback: int) -> int:
        """The lowest primary revision a watch can still replay after a regional compaction.

        Commits after the compaction revision are whole, so it is the revision after the one
        applied there.
        """
        try:
            state = await self.state_at(compact_revision)
        except Compacted:
            return fallback
        return (state.applied if state is not None else 0) + 1

    async def switch_changes(self, at: int, state: State, start: bytes, end: bytes) -> Batch | None:
        """The changes a ``SWITCHED`` commit made to ``[start, end)`` (relative keys).

        The new generation is the previous one plus exactly the changes of ``state.applied``:
        its keys written at that primary revision, and the keys it no longer has. Both
        generations are read at the switch's own regional revision (the previous one is
        deleted only by a later Txn). In key order: the primary's own order is not recorded.
        """
        try:
            new_data, old_data = self.data(state.generation), self.data(state.previous_generation)
            new = await self.range(at, new_data + start, new_data + end)
            old = await self.range(at, old_data + start, old_data + end)
        except Compacted:
            raise CompactedError(state.applied + 1) from None
        now = {bytes(kv.key[len(new_data):]): self.envelope(kv) for kv in new.kvs}
        gone = {bytes(kv.key[len(old_data):]) for kv in old.kvs} - set(now)
        changes = [Change(key.decode(), None if key in gone else now[key].value)
                   for key in sorted(gone | {k for k, e in now.items()
                                             if e.mod_revision == state.applied})]
        return Batch(state.applied, tuple(changes)) if changes else None

    async def state_revision(self) -> int:
        """The regional revision of the last replicator commit (0 if none): for liveness."""
        with unavailable(self.etcd):
            resp = await self.etcd.range(rpc.RangeRequest(key=self.state_key, keys_only=True))
        return int(resp.kvs[0].mod_revision) if resp.kvs else 0

    # -- waiting for an applied revision ----------------------------------------------------

    async def wait_for(self, revision: int, timeout: float) -> int:  # noqa: ASYNC109 - see store
        """The applied revision, once it is at or above ``revision``.

        Raises ``UnavailableError`` naming the region's applied revision after ``timeout``
        seconds (or if the regional etcd cannot be reached by then).
        """
        with contextlib.suppress(UnavailableError):
            cut = await self.cut()
            if cut.applied >= revision:
                return cut.applied
        self._waiters += 1
        if self._follower is None or self._follower.done():
            self._follower = asyncio.create_task(self._follow(), name="regional-applied")
        try:
            async with asyncio.timeout(timeout):
                while self._applied < revision:
                    await self._moved.wait()
        except TimeoutError:
            applied, trouble = self._applied, self._trouble
            raise UnavailableError(
                f"{self._name()} has applied the primary up to revision {applied}, not yet "
                f"{revision} (waited {timeout:g} s); retry later or read elsewhere"
                + (f" (the regional etcd: {trouble})" if trouble else ""),
                metadata={"region": self.region, "applied_revision": str(applied),
                          "revision": str(revision)}) from None
        finally:
            self._waiters -= 1
            if not self._waiters and self._follower is not None:
                self._follower.cancel()
                self._follower = None
        return self._applied

    async def _follow(self) -> None:
        """While anybody waits: one watch of the state key, renewed after any failure."""
        pause = FOLLOW_BACKOFF[0]
        while True:
            try:
                resp = await self.etcd.range(rpc.RangeRequest(key=self.state_key))
                if resp.kvs:
                    self._saw(State.decode(bytes(resp.kvs[0].value)).applied)
                call = await self.etcd.watch_call()
                try:
                    await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                        key=self.state_key, start_revision=resp.header.revision + 1)))
                    while True:
                        answer = await call.read()
                        if answer is grpc.aio.EOF or answer.canceled or answer.compact_revision:
                            break
                        for event in answer.events:
                            if event.type == rpc.Event.PUT:
                                self._saw(State.decode(bytes(event.kv.value)).applied)
                        pause, self._trouble = FOLLOW_BACKOFF[0], ""
                finally:
                    call.cancel()
            except (EtcdUnavailable, grpc.aio.AioRpcError, ValueError) as err:
                self._trouble = str(err)
                log.warning("regional_state_watch_failed", error=str(err), retry_in=pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, FOLLOW_BACKOFF[1])

    async def close(self) -> None:
        """Stops the shared watch and closes the connection."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        await self.etcd.close()

    # -- region-local keys ------------------------------------------------------------------

    def _state_exists(self) -> Any:
        return rpc.Compare(key=self.state_key, target=rpc.Compare.VERSION,
                           result=rpc.Compare.GREATER, version=0)

    async def _local_txn(self, op: Any) -> tuple[Any, int]:
        """``op`` on a region-local key, with the applied revision it happened at (one Txn).

        Refused (``UnavailableError``) before the region's first copy, like every read.
        """
        request = rpc.TxnRequest(
            compare=[self._state_exists()],
            success=[op, rpc.RequestOp(request_range=rpc.RangeRequest(key=self.state_key))])
        while True:
            with unavailable(self.etcd):
                resp = await self.etcd.txn(request)
            if resp.succeeded:
                break
            # No state at the Txn: raises the no-replica-yet error, unless the first copy
            # finished since, in which case the Txn is tried again (the state, once there,
            # stays).
            await self.cut()
        state = State.decode(bytes(resp.responses[1].response_range.kvs[0].value))
        self._saw(state.applied)
        return resp.responses[0], state.applied

    async def put_local(self, key: bytes, value: bytes, ttl: int) -> int:
        """Puts ``R + key`` on its own lease, kept alive by each call (as ``EtcdStore`` does).

        Returns the applied primary revision at the write: region-local keys have no primary
        revision of their own, and no regional revision ever leaves this module.
        """
        held = self._leases.get(key)
        with unavailable(self.etcd):
            if held is not None and (held[1] != ttl or await self.etcd.keepalive(held[0]) <= 0):
                held = None
        for attempt in (1, 2):
            if held is None:
                with unavailable(self.etcd):
                    held = (await self.etcd.grant(ttl), ttl)
                self._leases[key] = held
            put = rpc.RequestOp(request_put=rpc.PutRequest(key=self.prefix + key, value=value,
                                                           lease=held[0]))
            try:
                return (await self._local_txn(put))[1]
            except grpc.aio.AioRpcError as err:
                # The lease expired between the keep-alive and the put: take a new one, once.
                if attempt == 2 or err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                held = None
        raise AssertionError("unreachable")

    async def delete_local(self, key: bytes) -> tuple[int, bool]:
        """Deletes ``R + key`` now, and revokes its lease if this process granted it."""
        delete = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self.prefix + key))
        resp, applied = await self._local_txn(delete)
        held = self._leases.pop(key, None)
        if held is not None:
            with contextlib.suppress(EtcdUnavailable, grpc.aio.AioRpcError):
                await self.etcd.revoke(held[0])
        return applied, resp.response_delete_range.deleted > 0
