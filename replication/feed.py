"""The primary's changes, one :class:`~modelreg.replication.plan.Revision` at a time.

One etcd watch on the whole primary prefix, through etcd's Watch RPC (aetcd's own watcher has
no resume, ignores server-side cancellations other than compaction, and serialises watch
creation), started at a revision. etcd never splits a revision's events across responses (its
watch API guarantees it without ``fragment``), so each response's events group into whole
revisions. Region-local keys (:data:`~modelreg.replication.layout.LOCAL_FAMILIES`) are dropped
here, but their revisions are still yielded, empty, so the applied revision can pass them.

Liveness, without trusting etcd's progress notifications (before etcd 3.4.25 / 3.5.8 a
requested notification can overtake events not yet sent, etcd issue 15220, so one is never
taken as proof of delivery): after ``probe_interval`` of silence the feed asks for progress and
reads the primary's current revision. If that is no newer than the last response's header,
nothing is owed and the primary is alive (:class:`Contact`). If something newer exists and the
watch stays silent for three intervals (at least ``MIN_SILENCE``), or the primary does not
answer, the watch ends with :class:`EtcdUnavailable`; the caller resumes from its last applied
revision + 1. A compacted start revision raises :class:`Compacted`. The stream is written through
:func:`~modelreg.replication.etcd.send`, so a connection reset between a probe's silent wait and
its progress request ends the watch like any other stream failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc

from modelreg.replication.errors import Compacted, EtcdUnavailable
from modelreg.replication.etcd import Etcd, send
from modelreg.replication.layout import Envelope, is_replicated, prefix_end
from modelreg.replication.plan import KeyChange, Revision

MIN_SILENCE = 2.0
"""Seconds a watch that owes changes may stay silent, whatever the probe interval: etcd replays
history to a new watch from a loop that runs every 100 ms, later under load."""


@dataclass(frozen=True)
class Contact:
    """The primary answered, at this current revision (for lag; says nothing about delivery)."""

    revision: int


class PrimaryFeed:
    """Watches one prefix of the primary."""

    def __init__(self, etcd: Etcd, prefix: bytes, *, probe_interval: float = 1.0) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._interval = probe_interval

    def revisions(self, events: Iterable[Any], received: float) -> list[Revision]:
        """Events grouped by revision, keys made relative, local keys dropped.

        A key changed twice in one revision (nested Txns) keeps its last change.
        """
        skip = len(self._prefix)
        out = []
        for revision, group in itertools.groupby(events, key=lambda e: e.kv.mod_revision):
            changes: dict[bytes, KeyChange] = {}
            for event in group:
                key = bytes(event.kv.key[skip:])
                if not is_replicated(key):
                    continue
                kv = event.kv
                envelope = None if event.type == rpc.Event.DELETE else Envelope(
                    bytes(kv.value), kv.mod_revision, kv.create_revision, kv.version)
                changes.pop(key, None)
                changes[key] = KeyChange(key, envelope)
            out.append(Revision(revision, tuple(changes.values()), received))
        return out

    async def _current(self) -> int | None:
        with contextlib.suppress(EtcdUnavailable):
            return await self._etcd.revision()
        return None

    async def watch(self, from_revision: int) -> AsyncIterator[Revision | Contact]:
        """Every revision of the prefix from ``from_revision`` on, in order, and contacts."""
        call = await self._etcd.watch_call()
        loop = asyncio.get_running_loop()
        create = rpc.WatchCreateRequest(
            key=self._prefix, range_end=prefix_end(self._prefix), start_revision=from_revision
        )
        head = 0  # the header revision of the last response
        heard = loop.time()  # the last sign of life of the watch or the primary
        owed_since: float | None = None  # since when the primary is ahead of a silent watch
        reading: asyncio.Future[Any] | None = None
        try:
            await send(call, rpc.WatchRequest(create_request=create))
            while True:
                if reading is None:
                    reading = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({reading}, timeout=self._interval)
                if not done:
                    await send(
                        call, rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                    current = await self._current()
                    now = loop.time()
                    if current is not None and current <= head:
                        heard, owed_since = now, None
                        yield Contact(current)
                    elif current is not None and owed_since is None:
                        owed_since = now
                    silent = now - (heard if current is None else (owed_since or now))
                    if silent > max(3 * self._interval, MIN_SILENCE):
                        raise EtcdUnavailable(
                            f"etcd at {self._etcd.endpoint} stopped answering the watch"
                            if current is not None else
                            f"etcd at {self._etcd.endpoint} does not answer")
                    continue
                resp, reading = reading.result(), None
                if resp is grpc.aio.EOF:
                    raise EtcdUnavailable(f"etcd at {self._etcd.endpoint} ended the watch")
                heard, owed_since = loop.time(), None
                head = max(head, resp.header.revision)
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise EtcdUnavailable(
                        f"etcd at {self._etcd.endpoint} cancelled the watch: {resp.cancel_reason}")
                for revision in self.revisions(resp.events, heard):
                    yield revision
                yield Contact(head)
        except grpc.aio.AioRpcError as err:
            raise await self._etcd.unavailable(err) from err
        finally:
            if reading is not None:
                # Never awaited again: retrieve its outcome so nothing is logged as lost.
                reading.add_done_callback(lambda f: f.cancelled() or f.exception())
                reading.cancel()
            call.cancel()
