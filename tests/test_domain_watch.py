"""StageHub logic with a scripted feed (domain unit tests; the real feed is tested on etcd)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import Batch, Change, CompactedError, Progress, Put
from modelreg.server.domain.watch import Selector, StageHub
from modelreg.server.store.memory import MemoryStore
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws

KEY = "stages/fraud/production"


def pointer(version: int) -> bytes:
    return res.StagePointer(name="models/fraud/stages/production", version=version)\
        .SerializeToString()


class ScriptedFeed:
    """Plays a list of scripts, one per watch call; each ends with an exception or waits."""

    def __init__(self, *scripts: list[object]) -> None:
        self.scripts = list(scripts)
        self.starts: list[int] = []

    async def watch(self, start: str, end: str, from_revision: int
                    ) -> AsyncIterator[Batch | Progress]:
        del start, end
        self.starts.append(from_revision)
        script = self.scripts.pop(0) if self.scripts else []
        for item in script:
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]
        await asyncio.Event().wait()

    async def latest(self, start: str, end: str) -> tuple[int, int]:
        del start, end
        return 0, 0


async def run_hub(hub: StageHub) -> asyncio.Task[None]:
    task = asyncio.create_task(hub.run())
    await asyncio.wait_for(hub.ready.wait(), 5)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class TestStageHub:
    async def test_compaction_reloads_and_resets_every_stream(self):
        """When the feed reports compaction, the hub reloads from the store and every stream
        gets a snapshot flagged reset with the current pointers.
        """
        store = MemoryStore()
        await store.commit([], [Put(KEY, pointer(1))])
        feed = ScriptedFeed([CompactedError(5)])
        hub = StageHub(store, feed)
        sub = hub.subscribe(Selector())
        await store.commit([], [Put(KEY, pointer(2))])  # written while the hub was not looking
        task = await run_hub(hub)
        try:
            message = await asyncio.wait_for(sub.get(), 5)
            assert message.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT and message.reset
            assert [p.version for p in message.snapshot] == [2]
            assert hub.resets == 1
            assert feed.starts == [store.revision + 1] * 2  # watched, compacted, reloaded
        finally:
            await stop(task)

    async def test_unavailable_feed_resumes_after_last_revision(self):
        """After a feed failure the hub watches again from its revision + 1, losing nothing."""
        store = MemoryStore()
        feed = ScriptedFeed(
            [Batch(2, (Change(KEY, pointer(1)),)), UnavailableError("etcd went away")],
            [Batch(3, (Change(KEY, pointer(2)),)), Progress(9)],
        )
        hub = StageHub(store, feed)
        sub = hub.subscribe(Selector())
        task = await run_hub(hub)
        try:
            first = await asyncio.wait_for(sub.get(), 5)
            second = await asyncio.wait_for(sub.get(), 5)
            assert [(m.revision, m.changes[0].stage.version) for m in (first, second)] == [
                (2, 1), (3, 2)]
            assert second.changes[0].from_version == 1
            assert feed.starts == [2, 3]
            async with asyncio.timeout(5):
                while hub.revision != 9:
                    await asyncio.sleep(0.01)
            bookmark = hub.bookmark(sub)
            assert bookmark is not None
            assert bookmark.revision == 9
        finally:
            await stop(task)

    async def test_overflow_bounds_the_queue(self):
        """A stream that is not read is marked overflowed and holds at most one message."""
        store = MemoryStore()
        batches = [Batch(r, (Change(KEY, pointer(r)),)) for r in range(2, 40)]
        hub = StageHub(store, ScriptedFeed(batches), queue_size=4)
        sub = hub.subscribe(Selector())
        task = await run_hub(hub)
        try:
            async with asyncio.timeout(5):
                while hub.revision != 39:
                    await asyncio.sleep(0.01)
            assert sub.overflowed and sub.queue.qsize() <= 1
        finally:
            await stop(task)
