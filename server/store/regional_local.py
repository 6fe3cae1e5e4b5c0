"""``LocalStore`` of a regional server: the keys its region's etcd holds and no other does.

Break-glass pins and their audit events (``pins/``, ``localaudit/``; region-local families of
:data:`modelreg.replication.layout.LOCAL_FAMILIES`) live at ``R + K`` in the regional etcd,
beside the replica, and are written by the region's servers with the primary unreachable or
not. So that every write is guarded, as on the primary, a commit compares the values it read
(a region-local key has no primary revision to compare, and the regional revisions never leave
the store). Each commit also requires the region's replica to exist and reads its state in the
same Txn, so the caller learns the primary revision the region had applied at that moment.

Positions handed out (``LocalChange.position``, ``LocalRead.position``) are revisions of the
regional etcd: the watch of the range resumes from them inside this server, and they never
reach a client.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
from aetcd import rpc

from modelreg.replication.etcd import send
from modelreg.replication.layout import State
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import CompactedError, LocalChange, LocalRead, Put
from modelreg.server.store.regional_keys import Source, source
from modelreg.server.store.regional_replica import Replica, unavailable
from modelreg.server.store.watch_liveness import Liveness


class RegionLocal:
    """The region-local keys of one region's etcd (see the module docstring)."""

    def __init__(self, replica: Replica, *, progress_interval: float = 1.0) -> None:
        self._replica = replica
        self.region = replica.region
        self._interval = progress_interval

    def _key(self, key: str) -> bytes:
        return self._replica.prefix + key.encode()

    @staticmethod
    def _local(keys: list[str]) -> None:
        """Refuses to touch anything but region-local keys (the replica is the replicator's)."""
        if any(source(k) is not Source.REGION for k in keys):
            raise ValueError(f"not all region-local keys: {keys!r}")

    def _strip(self, key: bytes) -> str:
        return key[len(self._replica.prefix):].decode()

    async def read_local(self, start: str, end: str) -> LocalRead:
        """Every key of ``[start, end)`` at one cut of the region (its applied revision too)."""
        self._local([start])
        cut = await self._replica.cut()
        resp = await self._replica.range(cut.at, self._key(start), self._key(end))
        entries = [LocalChange(self._strip(bytes(kv.key)), bytes(kv.value), int(kv.mod_revision))
                   for kv in resp.kvs]
        return LocalRead(entries, cut.at, cut.applied)

    async def commit_local(
        self, expect: Mapping[str, bytes | None], writes: Sequence[Put]
    ) -> int | None:
        """One Txn: the replica's state exists and every ``expect`` holds, then ``writes``."""
        self._local([*expect, *(w.key for w in writes)])
        compare = [rpc.Compare(key=self._replica.state_key, target=rpc.Compare.VERSION,
                               result=rpc.Compare.GREATER, version=0)]
        for key, value in expect.items():
            if value is None:
                compare.append(rpc.Compare(key=self._key(key), target=rpc.Compare.VERSION,
                                           result=rpc.Compare.EQUAL, version=0))
            else:
                compare.append(rpc.Compare(key=self._key(key), target=rpc.Compare.VALUE,
                                           result=rpc.Compare.EQUAL, value=value))
        success = [rpc.RequestOp(request_put=rpc.PutRequest(key=self._key(w.key), value=w.value))
                   for w in writes]
        success.append(rpc.RequestOp(request_range=rpc.RangeRequest(key=self._replica.state_key)))
        request = rpc.TxnRequest(
            compare=compare, success=success,
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self._replica.state_key))])
        with unavailable(self._replica.etcd):
            resp = await self._replica.etcd.txn(request)
        if not resp.succeeded:
            if not resp.responses[0].response_range.kvs:
                await self._replica.cut()  # raises: the region holds no replica yet
            return None
        state = State.decode(bytes(resp.responses[-1].response_range.kvs[0].value))
        return state.applied

    async def watch_local(
        self, start: str, end: str, from_position: int
    ) -> AsyncIterator[list[LocalChange]]:
        """The range's changes after ``from_position``, one list per regional Txn.

        Ends with ``UnavailableError`` when the regional etcd fails the watch, or stays silent
        for three probe intervals (at least ``MIN_SILENCE``) while the range holds a change
        the watch has not delivered: a hung watch never hides a pin.
        """
        etcd = self._replica.etcd
        with unavailable(etcd):
            call = await etcd.watch_call()
        handled = from_position

        async def owed() -> bool:
            read = await self.read_local(start, end)
            return max((e.position for e in read.entries), default=0) > handled

        liveness = Liveness(call, self._interval, owed)

        create = rpc.WatchCreateRequest(key=self._key(start), range_end=self._key(end),
                                        start_revision=from_position + 1)
        try:
            await send(call, rpc.WatchRequest(create_request=create))
            liveness.start()
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise UnavailableError(f"regional etcd at {etcd.endpoint} ended the watch")
                liveness.answered()
                if resp.compact_revision:
                    raise CompactedError(int(resp.compact_revision))
                if resp.canceled:
                    raise UnavailableError(f"regional etcd at {etcd.endpoint} cancelled the "
                                           f"watch: {resp.cancel_reason}")
                for position, group in itertools.groupby(resp.events,
                                                         key=lambda e: e.kv.mod_revision):
                    handled = int(position)
                    yield [LocalChange(self._strip(bytes(e.kv.key)),
                                       None if e.type == rpc.Event.DELETE else bytes(e.kv.value),
                                       int(position)) for e in group]
        except grpc.aio.AioRpcError as err:
            failed = etcd.endpoint
            await etcd.unavailable(err)
            raise UnavailableError(f"regional etcd at {failed} watch failed ({err.code().name})",
                                   metadata={"endpoint": failed}) from err
        except asyncio.CancelledError:
            if liveness.stalled_error():
                raise UnavailableError(
                    f"regional etcd at {etcd.endpoint} stopped answering the watch") from None
            raise
        finally:
            await liveness.stop()
            call.cancel()

