"""The break-glass pins of a region, as the stage hub follows them.

A region's servers learn of a pin (or its clearing) through one watch of the region-local
``pins/`` range (:meth:`~modelreg.server.domain.ports.LocalStore.watch_local`), whichever of
them wrote it. Pin records are never deleted, so the last change of the range (its highest
position) tells how far a follower must have got to reflect every pin written before a given
moment: the proof behind a snapshot's read-your-writes, as for stage pointers.

The hub asks two things of it: the pin in force on a stage (:attr:`HubPins.active`) and
whether a pin touched a selection since a revision (:meth:`HubPins.touched`). A pin change is
region-local, outside the primary's revision sequence: each is marked with the region's
applied revision when it was written or, if later, the hub's revision when the hub learned of
it. A stream resuming from a revision at or below such a mark, or while a pin is in force on
its selection, may not know the region's pins, so it opens with a snapshot flagged ``reset``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import structlog

from modelreg.server.domain import keys, pin_view
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import CompactedError, LocalChange, LocalStore
from modelreg.v1 import resources_pb2 as res

log = structlog.get_logger("modelreg.watch")

CATCH_UP_TIMEOUT = 10.0
"""Seconds a snapshot waits for the follower to reach a pin already written."""

Changed = Callable[[str, res.LocalPin | None, res.LocalPin | None, int], None]
"""Called with the stage key, the pin before and after, and the record's ``changed_at``."""


class HubPins:
    """The pins of one region, kept current by one watch (see the module docstring)."""

    def __init__(self, local: LocalStore) -> None:
        self._local = local
        self.active: dict[str, res.LocalPin] = {}
        """The pin in force on each pinned stage, by ``stages/{model}/{stage}``."""
        self.marks: dict[str, int] = {}
        """By stage key: the revision marking the last pin change (see the module docstring)."""
        self.position = 0
        self.loaded = asyncio.Event()
        self._moved = asyncio.Event()
        self._reading: asyncio.Future[int] | None = None
        self._next_read: asyncio.Future[int] | None = None

    def touched(self, matches: Callable[[str], bool], seen: int) -> bool:
        """Whether a selected stage is pinned, or its pin changed at or after ``seen``."""
        return any(matches(k) for k in self.active) or any(
            mark >= seen and matches(k) for k, mark in self.marks.items())

    def _take(self, change: LocalChange, revision: int, changed: Changed | None) -> None:
        stage_key = pin_view.stage_key_of(change.key)
        stored = pin_view.stored_pin(change.value)
        before = self.active.get(stage_key)
        after = pin_view.active(change.value)
        if after is None:
            self.active.pop(stage_key, None)
        else:
            self.active[stage_key] = after
        changed_at = stored.changed_at if stored is not None else 0
        if before != after or stage_key not in self.marks:
            self.marks[stage_key] = max(changed_at, revision)
        if changed is not None and before != after:
            changed(stage_key, before, after, changed_at)

    def _advance(self, position: int) -> None:
        if position > self.position:
            self.position = position
            self._moved.set()
            self._moved = asyncio.Event()

    async def _load(self, revision: int, changed: Changed | None) -> None:
        read = await self._local.read_local(keys.PINS_START, keys.PINS_END)
        present = {e.key for e in read.entries}
        gone = [k for k in self.active if keys.PINS_START + k.removeprefix(keys.STAGES_START)
                not in present]  # never, unless the region's etcd was edited or replaced
        for key in gone:
            pin_key = keys.PINS_START + key.removeprefix(keys.STAGES_START)
            self._take(LocalChange(pin_key, None, read.position), revision, changed)
        for entry in read.entries:
            self._take(entry, revision, changed)
        self._advance(read.position)

    async def run(self, revision: Callable[[], int], changed: Changed) -> None:
        """Loads the pins, then follows them until cancelled (reloading after a failure).

        ``revision`` gives the hub's revision now, ``changed`` is told of every change
        after the first load.
        """
        delay = 0.1
        loaded = False
        while True:
            try:
                if not loaded:
                    await self._load(revision(), changed if self.loaded.is_set() else None)
                    loaded = True
                    self.loaded.set()
                async for batch in self._local.watch_local(keys.PINS_START, keys.PINS_END,
                                                           self.position):
                    for change in batch:
                        self._take(change, revision(), changed)
                    self._advance(batch[-1].position)
                    delay = 0.1
            except CompactedError:
                loaded = False
            except UnavailableError as err:
                log.warning("pins_watch_unavailable", error=err.message, retry_in=delay)
                loaded = False  # reads again: whatever was missed shows as changes
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 5.0)

    async def catch_up(self) -> None:
        """Waits until every pin written before this call is reflected here.

        One read of the range's last change, shared by every caller waiting for the next
        read (as the hub's own catch-up): a storm of reconnecting streams costs a few reads.
        """
        if self._next_read is None:
            self._next_read = asyncio.ensure_future(self._read_after(self._reading))
        last = await asyncio.shield(self._next_read)
        try:
            async with asyncio.timeout(CATCH_UP_TIMEOUT):
                while self.position < last:
                    await self._moved.wait()
        except TimeoutError:
            raise UnavailableError("the watch cache is behind the region's pins") from None

    async def _read_after(self, previous: asyncio.Future[int] | None) -> int:
        if previous is not None:
            await asyncio.wait([previous])
        self._reading, self._next_read = self._next_read, None
        read = await self._local.read_local(keys.PINS_START, keys.PINS_END)
        return max((e.position for e in read.entries), default=0)
