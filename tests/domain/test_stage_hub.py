"""StageHub logic with a scripted feed (domain unit tests; the real feed is tested on etcd)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import Batch, Change, CompactedError, Progress, Put
from modelreg.server.domain.stage_hub import Selector, StageHub
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
        self.reads = 0
        self.last = self.head = 0

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
        """The scripted store's last stage change is at ``self.last``, read at ``self.head``."""
        del start, end
        self.reads += 1
        await asyncio.sleep(0.01)
        return self.last, self.head


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

    async def test_snapshots_wait_for_committed_changes_and_share_reads(self):
        """Snapshots opened after a change was committed wait until the hub has applied it,
        and a hundred openings at once share a couple of reads of the store's latest change.
        """
        store = MemoryStore()
        release = asyncio.Event()

        class LateFeed(ScriptedFeed):
            async def watch(self, start, end, from_revision):
                await release.wait()  # the change reaches the hub only when released
                yield Batch(5, (Change(KEY, pointer(2)),))
                await asyncio.Event().wait()

        feed = LateFeed()
        feed.last, feed.head = 5, 7  # etcd committed the change at 5 and is at 7
        hub = StageHub(store, feed)
        task = await run_hub(hub)
        try:
            subs = [hub.subscribe(Selector()) for _ in range(100)]
            openings = [asyncio.ensure_future(hub.opening(sub, 0)) for sub in subs]
            await asyncio.sleep(0.1)
            assert not any(o.done() for o in openings)  # the hub has not seen revision 5
            release.set()
            async with asyncio.timeout(5):
                results = await asyncio.gather(*openings)
            for (snapshot,) in results:
                assert snapshot.revision == 7
                assert [p.version for p in snapshot.snapshot] == [2]
            assert feed.reads <= 2
            for sub in subs:
                assert sub.queue.empty()  # the snapshot covers the change: no duplicate
        finally:
            await stop(task)

    async def test_no_bookmark_while_a_change_waits_in_the_queue(self):
        """A stream whose read timed out just as a change arrived gets no bookmark until it
        has taken that change: the bookmark would claim a revision whose change is unsent.
        """
        store = MemoryStore()
        feed = ScriptedFeed([Batch(2, (Change(KEY, pointer(1)),))])
        hub = StageHub(store, feed)
        sub = hub.subscribe(Selector())
        task = await run_hub(hub)
        try:
            async with asyncio.timeout(5):
                while hub.revision != 2:
                    await asyncio.sleep(0.01)
            assert hub.bookmark(sub) is None  # the change at 2 is still queued
            change = await sub.get()
            assert change.revision == 2
            bookmark = hub.bookmark(sub)
            assert bookmark is not None and bookmark.revision == 2
        finally:
            await stop(task)
