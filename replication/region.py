"""The regional etcd as the replicator writes it: guarded commits in the layout module's keys.

Every write is a Txn guarded on two values: the state key holds exactly the bytes this replica
last read or wrote (so a primary revision is applied exactly once, and a commit from a replica
that fell behind fails), and the leader key names this replica (so a replica whose lease lapsed
stops writing at once). Either guard alone would keep the data right: the state guard is what
makes a stale leader's commit fail even if it still believed it held the key.

A new generation is built beside the current one under its own marker key, in as many Txns as
it needs, each guarded also on the marker holding this build's token; one last Txn switches the
state to it and deletes the marker. Garbage collection deletes every generation but the
current one, markers included, so a build interrupted by a crash (or still running in a replica
that lost its leadership) can never be switched to afterwards: its next Txn fails.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterable, Sequence
from typing import Any

import grpc
from aetcd import rpc

from modelreg.replication import layout
from modelreg.replication.errors import LostRace, NotLeader, TooLarge
from modelreg.replication.etcd import Etcd
from modelreg.replication.layout import Envelope, Kind, State
from modelreg.replication.plan import Limits, Revision, chunks


def _value_is(key: bytes, value: bytes) -> Any:
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, value=value)


def _absent(key: bytes) -> Any:
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, version=0)


def _put(key: bytes, value: bytes) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))


def _delete(key: bytes, end: bytes = b"") -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=end))


class Region:
    """One region's replicated keyspace, written by one replica."""

    def __init__(self, etcd: Etcd, prefix: bytes, replica_id: str, limits: Limits) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.replica = replica_id.encode()
        self.limits = limits
        self._state_key = layout.state_key(prefix)
        self._leader_key = layout.leader_key(prefix)
        self.state: State | None = None
        """The state as this replica last read or wrote it (None: the region is empty)."""
        self._stored: bytes | None = None
        self.commits = 0
        """State changes this replica committed (applies and switches)."""

    async def load(self) -> State | None:
        """Reads the state (after a lost race, or on taking over)."""
        kv, _ = await self.etcd.get(self._state_key)
        self._stored = bytes(kv.value) if kv is not None else None
        self.state = State.decode(self._stored) if self._stored is not None else None
        return self.state

    def _guards(self) -> list[Any]:
        state = (_absent(self._state_key) if self._stored is None
                 else _value_is(self._state_key, self._stored))
        return [state, _value_is(self._leader_key, self.replica)]

    async def _commit(self, compares: list[Any], ops: list[Any]) -> None:
        """One guarded Txn.

        After any error but ``LostRace`` and ``NotLeader`` the caller must ``load()`` again: a
        Txn that timed out may have committed, and the next guard tells.
        """
        request = rpc.TxnRequest(
            compare=compares, success=ops,
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self._leader_key))])
        try:
            resp = await self.etcd.txn(request)
        except grpc.aio.AioRpcError as err:
            details = err.details() or ""
            if "too large" in details or "larger than max" in details:
                raise TooLarge(f"a regional Txn of {len(ops)} operations is over the regional "
                               "etcd's --max-request-bytes") from err
            raise
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            if not kvs or bytes(kvs[0].value) != self.replica:
                raise NotLeader("the leader key no longer names this replica")
            raise LostRace("the regional state changed under this replica")

    def _put_state(self, state: State) -> Any:
        return _put(self._state_key, state.encode())

    def _adopt(self, state: State) -> State:
        self.state, self._stored = state, state.encode()
        self.commits += 1
        return state

    async def apply(self, revisions: Sequence[Revision]) -> State:
        """Applies consecutive primary revisions in one Txn (planned by ``next_commit``)."""
        assert self.state is not None, "a region is first filled by build()"
        generation = self.state.generation
        ops = []
        for revision in revisions:
            for change in revision.changes:
                key = layout.regional_key(self.prefix, generation, change.key)
                ops.append(_delete(key) if change.envelope is None
                           else _put(key, change.envelope.encode()))
        new = State(generation, revisions[-1].revision, Kind.APPLIED, generation)
        await self._commit(self._guards(), [*ops, self._put_state(new)])
        return self._adopt(new)

    async def collect_garbage(self) -> None:
        """Deletes every generation but the current one (all of them in an empty region)."""
        root = layout.generations_root(self.prefix)
        ranges = ([(root, layout.prefix_end(root))] if self.state is None
                  else layout.other_generations(self.prefix, self.state.generation))
        await self._commit(self._guards(), [_delete(start, end) for start, end in ranges])

    async def build(
        self, revision: int, kind: Kind, pages: AsyncIterable[list[tuple[bytes, Envelope]]]
    ) -> State:
        """Fills a new generation from a snapshot and switches readers to it in one Txn.

        ``pages`` is a primary snapshot at ``revision``. The old generation is deleted after.
        """
        await self.collect_garbage()
        previous = self.state.generation if self.state is not None else 0
        generation = previous + 1
        marker = layout.generation_key(self.prefix, generation)
        token = self.replica + b"/" + secrets.token_hex(8).encode()
        await self._commit([*self._guards(), _absent(marker)], [_put(marker, token)])
        guards = [*self._guards(), _value_is(marker, token)]
        async for page in pages:
            items = ((layout.regional_key(self.prefix, generation, key), env.encode())
                     for key, env in page)
            for group in chunks(items, self.limits):
                await self._commit(guards, [_put(k, v) for k, v in group])
        new = State(generation, revision, kind, previous)
        await self._commit(guards, [self._put_state(new), _delete(marker)])
        self._adopt(new)
        await self.collect_garbage()
        return new

    async def write_status(self, status: layout.Status) -> None:
        """Renews the status record (guarded on leadership only)."""
        await self._commit([_value_is(self._leader_key, self.replica)],
                           [_put(layout.status_key(self.prefix), status.encode())])
