"""``ChangeFeed`` on etcd's Watch API: one bidirectional stream per ``watch`` call.

aetcd's own watcher has no resume and ignores server-side cancellations other than compaction,
so this module speaks the Watch RPC through aetcd's generated stub directly:

* a watch starts at a revision; etcd replays history from there, then streams live changes;
* events are grouped by ``mod_revision``, so one transaction arrives as one ``Batch``;
* a progress request every ``progress_interval`` makes etcd confirm the revision the watch has
  reached (``Progress``), and doubles as a liveness probe: no answer within three intervals
  ends the watch with ``UnavailableError`` instead of hanging silently;
* compaction of the start revision raises ``CompactedError``; any other cancellation or stream
  error raises ``UnavailableError``. The caller resumes from its last revision + 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aetcd import rpc

from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import Batch, Change, CompactedError, Progress
from modelreg.server.store.etcd import EtcdStore


class EtcdChangeFeed:
    """Watches key ranges of one ``EtcdStore`` (same prefix, same connection)."""

    def __init__(self, store: EtcdStore, *, progress_interval: float = 1.0) -> None:
        self._store = store
        self._interval = progress_interval

    def _key(self, key: str) -> bytes:
        return (self._store.prefix + key).encode()

    def _batches(self, events: Any) -> list[Batch]:
        skip = len(self._store.prefix.encode())
        batches = []
        for revision, group in itertools.groupby(events, key=lambda e: e.kv.mod_revision):
            changes = tuple(
                Change(e.kv.key[skip:].decode(), None if e.type == rpc.Event.DELETE else e.kv.value)
                for e in group
            )
            batches.append(Batch(revision, changes))
        return batches

    async def watch(
        self, start: str, end: str, from_revision: int
    ) -> AsyncIterator[Batch | Progress]:
        """Changes of ``[start, end)`` from ``from_revision`` on; see the module docstring."""
        client = await self._store.client()
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        loop = asyncio.get_running_loop()
        last_answer = loop.time()
        stalled = False

        async def keep_alive() -> None:
            nonlocal stalled
            while True:
                await asyncio.sleep(self._interval)
                if loop.time() - last_answer > 3 * self._interval:
                    stalled = True
                    call.cancel()
                    return
                await call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

        create = rpc.WatchCreateRequest(
            key=self._key(start), range_end=self._key(end), start_revision=from_revision
        )
        prober: asyncio.Task[None] | None = None
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            prober = asyncio.create_task(keep_alive())
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise UnavailableError(f"etcd at {self._store.endpoint} ended the watch")
                last_answer = loop.time()
                if resp.compact_revision:
                    raise CompactedError(resp.compact_revision)
                if resp.canceled:
                    raise UnavailableError(
                        f"etcd at {self._store.endpoint} cancelled the watch: {resp.cancel_reason}"
                    )
                if resp.events:
                    for batch in self._batches(resp.events):
                        yield batch
                elif not resp.created:
                    yield Progress(resp.header.revision)
        except grpc.aio.AioRpcError as err:
            raise UnavailableError(
                f"etcd at {self._store.endpoint} watch failed ({err.code().name})",
                metadata={"endpoint": self._store.endpoint},
            ) from err
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if stalled and task is not None and not task.cancelling():
                raise UnavailableError(
                    f"etcd at {self._store.endpoint} stopped answering the watch"
                ) from None
            raise
        finally:
            if prober is not None:
                prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await prober
            call.cancel()
