"""The liveness probe an etcd watch runs beside its reads (the server's feed and the region's).

A watch stream that neither errors nor delivers is indistinguishable from a quiet range, so
every ``interval`` the probe asks etcd for progress (a progress request on the stream). When
nothing at all has come back for three intervals (at least :data:`MIN_SILENCE`), silence alone
still proves nothing: etcd 3.5.22+/3.4.38+ do not answer progress requests while a watch waits
for a revision the store has not reached, 3.5.8-3.5.12 not before a new watch's first event.
So the probe asks the watch's own question, ``owed()``: does etcd hold a change of the range
that the watch has not delivered? Only then is the watch stalled: the probe cancels the call,
and the watch's read ends with :meth:`Liveness.stalled_error` instead of a bare cancellation.

The probe writes through :func:`modelreg.replication.etcd.send`, so a write to a stream that
has already ended (a reset connection) ends the probe quietly: the watch's own read raises
how the stream ended, never the probe's write error in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aetcd import rpc

from modelreg.replication.etcd import send
from modelreg.server.domain.errors import UnavailableError

MIN_SILENCE = 2.0
"""Seconds without any answer before the probe asks whether the watch owes a change."""


class Liveness:
    """The probe of one watch call; ``answered()`` on every message the watch reads."""

    def __init__(self, call: Any, interval: float, owed: Callable[[], Awaitable[bool]]) -> None:
        self._call = call
        self._interval = interval
        self._owed = owed
        self._loop = asyncio.get_running_loop()
        self._last_answer = self._loop.time()
        self._task: asyncio.Task[None] | None = None
        self.stalled = False
        """Set when the probe found the watch owing a change and cancelled its call."""

    def answered(self) -> None:
        """Etcd answered (a watch response, or a read the watch made for its evidence)."""
        self._last_answer = self._loop.time()

    def start(self) -> None:
        """Starts probing, once the watch has been created on the call."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stops probing (in the watch's ``finally``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stalled_error(self) -> bool:
        """Whether a cancellation the watch sees is the probe's (not its consumer's)."""
        task = asyncio.current_task()
        return self.stalled and task is not None and not task.cancelling()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._loop.time() - self._last_answer > max(3 * self._interval, MIN_SILENCE):
                try:
                    owed = await self._owed()
                except UnavailableError:
                    owed = True
                if owed:
                    self.stalled = True
                    self._call.cancel()
                    return
                self.answered()
            try:
                await send(self._call,
                           rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
            except grpc.aio.AioRpcError:
                return  # the stream ended: the watch's own read raises how, not this task
