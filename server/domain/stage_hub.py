"""The stage hub: one etcd watch per server, fanned out to any number of watch streams.

The Kubernetes watch-cache idea, for stage pointers. The hub loads every pointer once, then
follows one ``ChangeFeed`` on the ``stages/`` range and keeps:

* the current pointers and the revision they are current at (moved on by progress marks, so
  idle streams get truthful bookmarks);
* the last ``buffer_size`` batches, so a stream that resumes from a recent revision replays
  them without touching etcd; older resumptions read etcd's history, and if etcd compacted it,
  get a snapshot flagged ``reset``: never a silent gap;
* per stream, a bounded queue. Publishing never waits: a stream whose queue is full is marked
  overflowed, its queue emptied, and it ends with RESOURCE_EXHAUSTED, so a client that stops
  reading costs at most ``queue_size`` messages of memory.

If the feed fails the hub resumes from its revision + 1 with backoff; if that revision was
compacted it reloads the pointers and sends every stream a reset snapshot.

In a region outside the primary the hub also follows the region's break-glass pins
(:mod:`~modelreg.server.domain.hub_pins`): a pinned stage is served at the pinned version
(``pin_view.overlay``) in snapshots and changes, and setting or clearing a pin sends the
streams that select the stage a CHANGES message flagged ``local_change`` at the hub's revision
(a region-local change, applied by the watcher even if it has reached that revision). A stream
that resumes while a pin touches its selection opens with a ``reset`` snapshot: a replay of the
primary's changes cannot tell it about the pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

import structlog

from modelreg.server.domain import keys, pin_view, records
from modelreg.server.domain.errors import OutOfRangeError, UnavailableError
from modelreg.server.domain.hub_pins import HubPins
from modelreg.server.domain.ports import (
    Batch,
    ChangeFeed,
    CompactedError,
    Entry,
    LocalStore,
    ModelStore,
    Progress,
)
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1.errors_pb2 import ErrorReason

log = structlog.get_logger("modelreg.watch")

STAGES_START = "stages/"
STAGES_END = keys.prefix_end(STAGES_START)
Message: TypeAlias = ws.WatchStagesResponse
CATCH_UP_TIMEOUT = 10.0
"""Seconds a stream's opening waits for the hub to apply a change etcd already committed."""


@dataclass(frozen=True)
class Selector:
    """Which pointers a stream wants: empty sets select everything."""

    models: frozenset[str] = frozenset()
    model_prefix: str = ""
    stages: frozenset[str] = frozenset()

    def matches(self, key: str) -> bool:
        """Whether the pointer stored under ``key`` (``stages/{model}/{stage}``) is selected."""
        _, model, stage = key.split("/", 2)
        return (
            (not self.models or model in self.models)
            and model.startswith(self.model_prefix)
            and (not self.stages or stage in self.stages)
        )


class OverflowError_(Exception):
    """The stream's client did not keep up; it must resume from its last revision + 1."""


@dataclass(eq=False)
class Subscription:
    """One stream's view of the hub: its selection and its bounded queue."""

    selector: Selector
    queue: asyncio.Queue[Message]
    after: int
    """Only batches past this revision are queued (earlier ones come from the opening)."""
    overflowed: bool = field(default=False)

    async def get(self) -> Message:
        """The next message for the stream; raises ``OverflowError_`` if it fell behind."""
        if self.overflowed:
            raise OverflowError_()
        message = await self.queue.get()
        if self.overflowed:
            raise OverflowError_()
        return message


def _name(key: str) -> str:
    """``models/{model}/stages/{stage}`` for the key ``stages/{model}/{stage}``."""
    _, model, stage = key.split("/", 2)
    return f"models/{model}/stages/{stage}"


def _pointer(key: str, value: bytes, revision: int) -> res.StagePointer:
    return records.decode(Entry(key, value, revision), res.StagePointer)


class StageHub:
    """Current stage pointers, recent history, and the streams that follow them."""

    def __init__(
        self,
        store: ModelStore,
        feed: ChangeFeed,
        *,
        buffer_size: int = 10_000,
        queue_size: int = 256,
        pins: LocalStore | None = None,
    ) -> None:
        self._store = store
        self._feed = feed
        self._pins = HubPins(pins) if pins is not None else None
        self._buffer: deque[Batch] = deque(maxlen=buffer_size)
        self._covered_from = 1
        """The buffer holds every stage change with a revision at or after this one."""
        self._queue_size = queue_size
        self._pointers: dict[str, res.StagePointer] = {}
        self._subs: set[Subscription] = set()
        self.revision = 0
        self._moved = asyncio.Event()
        """Set (and replaced) whenever ``revision`` moves on."""
        self._reading: asyncio.Future[tuple[int, int]] | None = None
        self._next_read: asyncio.Future[tuple[int, int]] | None = None
        self.ready = asyncio.Event()
        self.resets = 0
        """How many times the hub had to reload because etcd compacted what it needed."""

    # -- following etcd -----------------------------------------------------------------

    async def _load(self) -> None:
        page = await self._store.scan(STAGES_START, STAGES_END, limit=0)
        self._pointers = {e.key: _pointer(e.key, e.value, e.mod_revision) for e in page.entries}
        self._advance(page.revision)
        self._buffer.clear()
        self._covered_from = self.revision + 1

    async def run(self) -> None:
        """Follows etcd (and the region's pins) until cancelled, reconnecting with backoff."""
        if self._pins is None:
            await self._follow()
            return
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._pins.run(lambda: self.revision, self._pin_changed))
            tasks.create_task(self._follow())

    async def _follow(self) -> None:
        delay = 0.1
        loaded = False
        while True:
            try:
                if not loaded:
                    await self._load()
                    if self.ready.is_set():
                        self.resets += 1
                        self._reset_all()
                    loaded = True
                    if self._pins is not None:
                        await self._pins.loaded.wait()
                    self.ready.set()
                    log.info("stage_hub_loaded", revision=self.revision,
                             pointers=len(self._pointers))
                async for item in self._feed.watch(STAGES_START, STAGES_END, self.revision + 1):
                    if isinstance(item, Progress):
                        self._advance(item.revision)
                    else:
                        self._apply(item)
                    delay = 0.1
            except CompactedError as err:
                log.warning("stage_hub_compacted", revision=self.revision,
                            compact_revision=err.compact_revision)
                loaded = False
            except UnavailableError as err:
                log.warning("stage_hub_unavailable", error=err.message, retry_in=delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 5.0)

    def _served(self, key: str) -> res.StagePointer | None:
        """The pointer under ``key`` as this region serves it (pinned or not)."""
        pointer = self._pointers.get(key)
        pin = self._pins.active.get(key) if self._pins is not None else None
        return pin_view.overlay(pointer, pin) if pointer is not None and pin else pointer

    def _apply(self, batch: Batch) -> None:
        changes: list[tuple[str, ws.StageChange]] = []
        for change in batch.changes:
            old = self._served(change.key)
            if change.value is None:
                self._pointers.pop(change.key, None)
                changes.append((change.key, ws.StageChange(
                    stage=res.StagePointer(name=_name(change.key)),
                    from_version=old.version if old else 0, deleted=True)))
            else:
                self._pointers[change.key] = _pointer(change.key, change.value, batch.revision)
                pointer = self._served(change.key)
                changes.append((change.key, ws.StageChange(
                    stage=pointer, from_version=old.version if old else 0)))
        self._advance(batch.revision)
        if len(self._buffer) == self._buffer.maxlen:
            self._covered_from = self._buffer[0].revision + 1
        self._buffer.append(batch)
        self._publish(batch.revision, changes)

    def _publish(self, revision: int, changes: list[tuple[str, ws.StageChange]]) -> None:
        # Streams with the same selection share one message: with thousands of streams on a
        # few selections this runs the selector once per selection, not once per stream.
        messages: dict[Selector, Message | None] = {}
        for sub in self._subs:
            if sub.overflowed or revision <= sub.after:
                continue
            if sub.selector not in messages:
                picked = [c for key, c in changes if sub.selector.matches(key)]
                messages[sub.selector] = Message(
                    type=ws.WATCH_MESSAGE_TYPE_CHANGES, revision=revision, changes=picked
                ) if picked else None
            message = messages[sub.selector]
            if message is not None:
                self._offer(sub, message)

    def _pin_changed(self, key: str, before: res.LocalPin | None, after: res.LocalPin | None,
                     _: int) -> None:
        """A pin was set, moved or cleared: every stream selecting the stage is told now."""
        pointer = self._pointers.get(key)
        if pointer is None:
            return  # no pointer to serve pinned; a snapshot shows it once there is one
        old = pin_view.overlay(pointer, before) if before is not None else pointer
        change = ws.StageChange(stage=self._served(key), from_version=old.version)
        for sub in self._subs:
            if not sub.overflowed and sub.selector.matches(key):
                self._offer(sub, Message(type=ws.WATCH_MESSAGE_TYPE_CHANGES, local_change=True,
                                         revision=max(self.revision, sub.after),
                                         changes=[change]))

    def _offer(self, sub: Subscription, message: Message) -> None:
        try:
            sub.queue.put_nowait(message)
        except asyncio.QueueFull:
            sub.overflowed = True
            while not sub.queue.empty():  # free the memory now, not when the stream ends
                sub.queue.get_nowait()
            sub.queue.put_nowait(message)  # wake a waiting get(); it raises OverflowError_

    def _reset_all(self) -> None:
        for sub in self._subs:
            self._skip_through(sub, self.revision)
            self._offer(sub, self.snapshot(sub.selector, reset=True))

    # -- streams ------------------------------------------------------------------------

    def snapshot(self, selector: Selector, *, reset: bool = False) -> Message:
        """Every selected pointer at the hub's revision."""
        pointers = [p for k in sorted(self._pointers)
                    if selector.matches(k) and (p := self._served(k)) is not None]
        return Message(type=ws.WATCH_MESSAGE_TYPE_SNAPSHOT, revision=self.revision,
                        reset=reset, snapshot=pointers)

    def subscribe(self, selector: Selector) -> Subscription:
        """Registers a stream: changes past the current revision are queued from now on."""
        sub = Subscription(selector, asyncio.Queue(maxsize=self._queue_size), self.revision)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forgets a stream."""
        self._subs.discard(sub)

    async def opening(self, sub: Subscription, start_revision: int) -> list[Message]:
        """What a stream sends before live changes: a snapshot, or the changes it missed.

        ``start_revision`` 0 means a snapshot. Otherwise every selected change with revision
        in ``[start_revision, sub.after]``: from the buffer if it reaches back that far, else
        from etcd's history, else (compacted) a snapshot flagged ``reset``.

        A ``start_revision`` past the hub's revision but not past the store's (this server lags
        behind a revision its client saw elsewhere) opens with nothing: changes below it are
        never queued, and bookmarks wait until the hub has caught up. One past the store's
        revision cannot be honoured and is refused with ``OutOfRangeError``.
        """
        if start_revision <= 0:
            await self.catch_up()
            self._skip_through(sub, self.revision)  # the snapshot covers what was queued
            return [self.snapshot(sub.selector)]
        if self._pins is not None:
            await self._pins.catch_up()  # a pin written before the request is known here
        if self._pins is not None and self._pins.touched(sub.selector.matches,
                                                         start_revision - 1):
            if start_revision - 1 > self.revision:  # a snapshot the client is not ahead of
                await self._not_future(start_revision)
                await self._reach(start_revision - 1)
            self._skip_through(sub, self.revision)
            return [self.snapshot(sub.selector, reset=True)]
        if start_revision > sub.after:
            if start_revision > sub.after + 1:
                await self._not_future(start_revision)
                self._skip_through(sub, start_revision - 1)
            return []
        if start_revision >= self._covered_from:
            batches: Iterable[Batch] = [b for b in self._buffer
                                        if start_revision <= b.revision <= sub.after]
        else:
            try:
                batches = await self._history(start_revision, sub.after)
            except CompactedError:
                # The snapshot is taken now, after the awaits: drop what it already covers.
                self._skip_through(sub, self.revision)
                return [self.snapshot(sub.selector, reset=True)]
        return [m for b in batches if (m := self._message(sub.selector, b)) is not None]

    async def _not_future(self, start_revision: int) -> None:
        """Refuses a ``start_revision`` more than one past the store's current revision."""
        _, current = await self._feed.latest(STAGES_START, STAGES_END)
        if start_revision > current + 1:
            raise OutOfRangeError(
                "start_revision",
                f"is past the store's current revision {current}; resume from at "
                f"most {current + 1} (a revision this deployment handed out, plus 1)",
                reason=ErrorReason.REVISION_IN_FUTURE, revision=str(current))

    async def catch_up(self) -> None:
        """Waits until the hub reflects every stage change committed before this call.

        A snapshot then reads its writer's own promotion (read-your-writes, as a fresh etcd
        read would), at the cost of one small read: the last stage change ``L`` and the
        revision ``H`` it was read at. Once the hub has applied ``L`` nothing else changed up
        to ``H``, so the hub's revision may move on to ``H``.
        """
        last, current = await self._latest_from_now()
        await self._reach(last)
        self._advance(current)
        if self._pins is not None:
            await self._pins.catch_up()

    async def _reach(self, revision: int) -> None:
        """Waits until the hub has applied ``revision`` (at most ``CATCH_UP_TIMEOUT``)."""
        try:
            async with asyncio.timeout(CATCH_UP_TIMEOUT):
                while self.revision < revision:
                    await self._moved.wait()
        except TimeoutError:
            raise UnavailableError(
                f"the watch cache is behind etcd (at {self.revision}, etcd at {revision})"
            ) from None

    async def _latest_from_now(self) -> tuple[int, int]:
        """``feed.latest`` of the stages, read after this call began.

        Shared by every caller waiting for the next read: a storm of new streams costs a few
        reads, not one per stream.
        """
        if self._next_read is None:
            self._next_read = asyncio.ensure_future(self._read_after(self._reading))
        return await asyncio.shield(self._next_read)

    async def _read_after(self, previous: asyncio.Future[tuple[int, int]] | None
                          ) -> tuple[int, int]:
        if previous is not None:
            await asyncio.wait([previous])
        self._reading, self._next_read = self._next_read, None  # later callers: next read
        return await self._feed.latest(STAGES_START, STAGES_END)

    def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._moved.set()
            self._moved = asyncio.Event()

    def _skip_through(self, sub: Subscription, revision: int) -> None:
        """Drops queued changes at or before ``revision`` and queues none from now on."""
        sub.after = revision
        kept = []
        while not sub.queue.empty():
            message = sub.queue.get_nowait()
            if message.revision > revision:
                kept.append(message)
        for message in kept:
            sub.queue.put_nowait(message)

    async def _history(self, start_revision: int, until: int) -> list[Batch]:
        found: list[Batch] = []
        watch = self._feed.watch(STAGES_START, STAGES_END, start_revision)
        try:
            async for item in watch:
                if isinstance(item, Batch):
                    if item.revision > until:
                        break
                    found.append(item)
                    if item.revision == until:
                        break
                elif item.revision >= until:
                    break
        finally:
            with contextlib.suppress(Exception):
                await watch.aclose()  # type: ignore[attr-defined]
        return found

    def _message(self, selector: Selector, batch: Batch) -> Message | None:
        changes = []
        for change in batch.changes:
            if not selector.matches(change.key):
                continue
            if change.value is None:
                changes.append(ws.StageChange(stage=res.StagePointer(name=_name(change.key)),
                                              deleted=True))
            else:
                pointer = _pointer(change.key, change.value, batch.revision)
                changes.append(ws.StageChange(stage=pointer, from_version=pointer.previous_version))
        if not changes:
            return None
        return Message(type=ws.WATCH_MESSAGE_TYPE_CHANGES, revision=batch.revision,
                        changes=changes)

    def bookmark(self, sub: Subscription) -> Message | None:
        """A bookmark at the hub's revision, if ``sub`` has taken every change up to it.

        ``None`` while the hub is still below where the stream asked to start, or while a
        change waits in the queue: a read that timed out just as a change arrived leaves it
        there (asyncio's timeout cancels the get after the put woke it), and a bookmark sent
        then would precede the change at its own revision.
        """
        if self.revision < sub.after or not sub.queue.empty():
            return None
        return Message(type=ws.WATCH_MESSAGE_TYPE_BOOKMARK, revision=self.revision)

    @property
    def streams(self) -> int:
        """Streams currently subscribed."""
        return len(self._subs)

    @property
    def overflowed_streams(self) -> int:
        """Streams cut off for falling behind whose handlers have not ended yet.

        A handler ends at its client's next read; until then it holds no queued messages.
        """
        return sum(1 for s in self._subs if s.overflowed)

    @property
    def queued_messages(self) -> int:
        """Messages waiting in every stream's queue: bounded by streams x queue size."""
        return sum(s.queue.qsize() for s in self._subs)

    def pending_rollouts(self) -> list[str]:
        """The rollouts the cached pointers name as pending (the coordinator's cheap look).

        As of the hub's revision, which may lag behind etcd by a watch event: a hint of
        whether a fresh read is worth making, never a fact to act on.
        """
        return [p.pending_rollout for p in self._pointers.values() if p.pending_rollout]
