"""Building blocks of the regional store's tests: a registry over any store (the domain tests'
shorthands), a stage hub over a regional store, and a stream of the hub that records what it
delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from modelreg.server.domain.ports import ModelStore
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.stage_hub import Selector, StageHub
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.store.regional import RegionalStore
from modelreg.server.store.regional_feed import RegionalChangeFeed
from modelreg.v1 import watch_service_pb2 as ws
from tests.domain.env import Env


class StoreEnv(Env):
    """The domain tests' shorthands (create, promote, get...) over a real store."""

    def __init__(self, store: ModelStore) -> None:
        super().__init__()
        self.store = store  # type: ignore[assignment]
        self.reg = Registry.over(store, self.clock)


def regional(primary: EmbeddedEtcd, region: EmbeddedEtcd, prefix: str,
             **kw: float) -> RegionalStore:
    """A regional server's store of the test pair."""
    return RegionalStore([primary.endpoint], [region.endpoint], prefix, region_name="eu", **kw)


@dataclass
class Stream:
    """One subscription of a hub, as a WatchStages stream would take it: the opening snapshot,
    then every message, recorded.
    """

    hub: StageHub
    messages: list[ws.WatchStagesResponse] = field(default_factory=list)

    def changes(self) -> list[tuple[int, str, int]]:
        """(revision, stage name, version) of every change delivered, in order."""
        return [(m.revision, c.stage.name, c.stage.version) for m in self.messages
                if m.type == ws.WATCH_MESSAGE_TYPE_CHANGES for c in m.changes]

    def resets(self) -> list[ws.WatchStagesResponse]:
        """The snapshots flagged ``reset`` delivered after the opening one."""
        return [m for m in self.messages[1:] if m.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT]

    def last_revision(self) -> int:
        """The revision of the last message."""
        return self.messages[-1].revision if self.messages else 0


@contextlib.asynccontextmanager
async def hub_over(store: RegionalStore) -> AsyncIterator[tuple[StageHub, Stream]]:
    """A stage hub over the store's replica (progress from the replicator's commits) and one
    stream of every pointer, recorded in the background until the block ends.
    """
    hub = StageHub(store, RegionalChangeFeed(store, progress_interval=0.05))
    runner = asyncio.create_task(hub.run())
    stream = Stream(hub)
    sub = hub.subscribe(Selector())

    opened = asyncio.Event()

    async def record() -> None:
        await hub.ready.wait()
        stream.messages.extend(await hub.opening(sub, 0))
        opened.set()
        while True:
            stream.messages.append(await sub.get())

    recorder = asyncio.create_task(record())
    waiter = asyncio.ensure_future(opened.wait())
    try:
        async with asyncio.timeout(60):
            # The opening snapshot first: a change the test makes after this block is entered
            # then comes as a change, never folded into the snapshot.
            await asyncio.wait([recorder, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if recorder.done():
            recorder.result()  # the opening failed: say why
        yield hub, stream
    finally:
        for task in (waiter, recorder, runner):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # a recorder that failed (its stream overflowed) fails the test
