"""``ChangeFeed`` of a regional server: the replicator's commits, told in primary revisions.

The replicator records each of its commits in the regional etcd's state key
(:mod:`modelreg.replication.layout`, "Watching"). One etcd watch of the replicator's subtree, per
``watch`` call, turns them back into the primary's changes, as ``EtcdChangeFeed`` would have
seen them on the primary:

* the watch starts just past the last replicator commit that left the region below
  ``from_revision`` (:meth:`~modelreg.server.store.regional_replica.Replica.locate`); events are
  grouped by regional revision and every revision that does not write the state key is skipped
  (generation builds, garbage collection, leader and status records);
* ``APPLIED``: the commit's data events in the current generation are primary changes; puts
  are regrouped by their envelope's ``mod_revision`` (one ``Batch`` per primary revision, in
  order) and deletions belong to the commit's applied revision;
* ``SWITCHED`` (one primary revision too large for one regional Txn): one ``Batch`` from the
  difference of the two generations at the switch;
* ``RESYNCED`` (a snapshot after the primary compacted, or the first copy): the changes in
  between are unknown one by one, so the watch raises ``CompactedError``, exactly as
  ``EtcdChangeFeed`` does for a compacted start: the caller reloads a snapshot (the stage hub
  sends its streams one flagged ``reset``). So does a ``from_revision`` that the regional etcd
  no longer has the history for. The error names the first primary revision the region can
  still replay from;
* ``Progress(applied)`` follows every commit handled (the layout's proof that every change up
  to ``applied`` was delivered); etcd's progress notifications only show the watch is alive;
* liveness as in ``EtcdChangeFeed``: after three silent probe intervals (at least
  ``MIN_SILENCE``), if the region holds a replicator commit the watch has not delivered, it
  ends with ``UnavailableError`` instead of hanging; a region whose replicator is down is
  quiet, not stalled.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aetcd import rpc

from modelreg.replication import layout
from modelreg.replication.etcd import send
from modelreg.replication.layout import Kind, State
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import Batch, Change, CompactedError, Progress
from modelreg.server.store.regional import RegionalStore
from modelreg.server.store.regional_replica import Replica, unavailable
from modelreg.server.store.watch_liveness import Liveness


def applied_batches(replica: Replica, events: list[Any], state: State, start: bytes,
                    end: bytes) -> list[Batch]:
    """The primary changes of ``[start, end)`` in an ``APPLIED`` commit, one batch a revision.

    Within a revision the changes keep the commit's order, which is the primary's.
    """
    head = replica.data(state.generation)
    by_revision: dict[int, list[Change]] = {}
    for event in events:
        key = bytes(event.kv.key)
        if not key.startswith(head) or not start <= key[len(head):] < end:
            continue
        if event.type == rpc.Event.DELETE:
            revision, value = state.applied, None
        else:
            envelope = replica.envelope(event.kv)
            revision, value = envelope.mod_revision, envelope.value
        by_revision.setdefault(revision, []).append(Change(key[len(head):].decode(), value))
    return [Batch(r, tuple(changes)) for r, changes in sorted(by_revision.items())]


class RegionalChangeFeed:
    """Watches key ranges of one ``RegionalStore``'s replica, in primary revisions."""

    def __init__(self, store: RegionalStore, *, progress_interval: float = 1.0) -> None:
        self._store = store
        self._replica = store.replica
        self._interval = progress_interval

    async def latest(self, start: str, end: str) -> tuple[int, int]:
        """The last change of ``[start, end)`` and the applied revision it was read at."""
        return await self._store.last_change(start, end)

    async def _commit(self, regional: int, events: list[Any], state: State, start: bytes,
                      end: bytes) -> list[Batch]:
        """The batches of one replicator commit; ``CompactedError`` for a resync."""
        if state.kind is Kind.APPLIED:
            return applied_batches(self._replica, events, state, start, end)
        if state.kind is Kind.SWITCHED:
            batch = await self._replica.switch_changes(regional, state, start, end)
            return [batch] if batch is not None else []
        raise CompactedError(state.applied + 1)

    async def watch(
        self, start: str, end: str, from_revision: int
    ) -> AsyncIterator[Batch | Progress]:
        """Changes of ``[start, end)`` from ``from_revision`` on; see the module docstring."""
        replica = self._replica
        first = await replica.locate(from_revision)
        with unavailable(replica.etcd):
            call = await replica.etcd.watch_call()
        handled = first - 1  # regional revisions looked at

        async def owed() -> bool:
            return await replica.state_revision() > handled

        liveness = Liveness(call, self._interval, owed)

        root = layout.replica_root(replica.prefix)
        create = rpc.WatchCreateRequest(key=root, range_end=layout.prefix_end(root),
                                        start_revision=first)
        lo, hi = start.encode(), end.encode()
        delivered = from_revision - 1  # every change at or below it has been yielded
        last_batch = 0
        announced = 0
        try:
            await send(call, rpc.WatchRequest(create_request=create))
            liveness.start()
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise UnavailableError(f"regional etcd at {replica.etcd.endpoint} ended the "
                                           "watch")
                liveness.answered()
                if resp.compact_revision:
                    raise CompactedError(await replica.servable_from(
                        resp.compact_revision, fallback=from_revision + 1))
                if resp.canceled:
                    raise UnavailableError(f"regional etcd at {replica.etcd.endpoint} cancelled "
                                           f"the watch: {resp.cancel_reason}")
                for regional, group in itertools.groupby(resp.events,
                                                         key=lambda e: e.kv.mod_revision):
                    events = list(group)
                    handled = regional
                    states = [e for e in events if e.type == rpc.Event.PUT
                              and bytes(e.kv.key) == replica.state_key]
                    if not states:
                        continue  # a build, garbage collection, the leader or status records
                    state = State.decode(bytes(states[-1].kv.value))
                    if state.applied <= delivered:
                        continue
                    for batch in await self._commit(regional, events, state, lo, hi):
                        if batch.revision > delivered:
                            yield batch
                            last_batch = batch.revision
                    delivered = state.applied
                    if delivered > max(announced, last_batch):
                        announced = delivered
                        yield Progress(announced)
        except grpc.aio.AioRpcError as err:
            failed = replica.etcd.endpoint
            await replica.etcd.unavailable(err)  # the next call tries the next member
            raise UnavailableError(f"regional etcd at {failed} watch failed ({err.code().name})",
                                   metadata={"endpoint": failed}) from err
        except asyncio.CancelledError:
            if liveness.stalled_error():
                raise UnavailableError(
                    f"regional etcd at {replica.etcd.endpoint} stopped answering the watch"
                ) from None
            raise
        finally:
            await liveness.stop()
            call.cancel()
