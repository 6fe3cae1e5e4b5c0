"""The watcher SDK: keep the model a stage pointer names loaded, and hot-swap it when it moves.

A watcher follows one stage pointer (``models/{model}/stages/{stage}``) on a ``WatchStages``
stream. For each version the pointer names it reads the version (``GetModelVersion``), fetches
the artifact (:mod:`modelreg.client.artifacts`: ``file://``, ``http(s)://``, pluggable),
verifies its size and sha256, calls ``loader(path)`` in a worker thread and only then replaces
``watcher.current``, a :class:`LoadedModel`, with one reference assignment: a reader sees the
old model or the new one, never a half-loaded or unverified one. The replaced model stays warm
as ``watcher.previous``, so a rollback to it swaps back at once.

* A digest mismatch, fetch or loader error never touches ``current``: it is logged (logger
  ``modelreg.watcher``), passed to ``on_error``, reported to ``FleetService`` as the node's
  ``failed_version`` and retried with capped exponential backoff until it succeeds or the
  pointer moves on (a newer version cancels an attempt in progress).
* The stream is reopened after any error (UNAVAILABLE, RESOURCE_EXHAUSTED for a client that
  fell behind, a server restart, ``idle_timeout`` without a bookmark) with jittered backoff,
  resuming from the last revision seen + 1, so no change is missed; a ``reset`` snapshot
  (history compacted) is simply the pointer's current value.
* The node reports what it serves (``ReportNode``) every ``ttl_seconds / 3`` and right after
  each swap or failure; ``watcher.stats`` counts swaps, failures, reconnects and the revision.
* An emptied or deleted pointer leaves the current model serving.
* Two-phase rollouts (a stage governed by a rollout policy): while a rollout prepares a
  version (the pointer's ``pending_version``), the watcher loads it beside the serving model
  without serving it (``watcher.prepared``) and reports it prepared, or failed with the error;
  when the rollout commits, the pointer moves with an ``activation_time`` and every node swaps
  when the servers' clock reaches it (each node estimates its clock's offset from the
  ``server_time`` on every watch message: ``stats.clock_offset``). An aborted rollout drops
  the prepared model. An emergency rollback to the warm ``previous`` model swaps on receipt,
  with no fetch. ``stats.recent_swaps`` records when each swap happened, on both clocks.

asyncio::

    from modelreg.client.watcher import AsyncModelWatcher

    async with AsyncModelWatcher("fraud-detector", "production", load_model,
                                 target="modelreg:50051", region="eu-west") as watcher:
        await watcher.wait_for_version(timeout=60)       # the first model
        ...
        prediction = watcher.current.model.predict(x)    # per request: one attribute read

Threads (Flask, Django, gunicorn sync workers: start it in each worker, after the fork)::

    from modelreg.client.watcher import ThreadedModelWatcher

    # target: $MODELREG_TARGET, else 127.0.0.1:50051
    watcher = ThreadedModelWatcher("fraud-detector", "production", load_model)
    watcher.start()
    watcher.wait_for_version(timeout=60)

    def predict(x):
        return watcher.current.model.predict(x)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar

from modelreg.client._async_watcher import AsyncModelWatcher
from modelreg.client._channel import ClientState
from modelreg.client._watch_stats import SwapRecord, WatcherStats
from modelreg.client._watch_support import (
    Backoff,
    ErrorCallback,
    LoadedModel,
    SwapCallback,
    check_health,
    default_node_id,
)

__all__ = [
    "AsyncModelWatcher",
    "Backoff",
    "ErrorCallback",
    "LoadedModel",
    "SwapCallback",
    "SwapRecord",
    "ThreadedModelWatcher",
    "WatcherStats",
    "default_node_id",
]

T = TypeVar("T")
_L = TypeVar("_L")
_S = TypeVar("_S")
_P = ParamSpec("_P")

_Init = Callable[Concatenate[_S, str, str, Callable[[Path], _L], _P], None]
_AnyInit = Callable[Concatenate[_S, str, str, Callable[[Path], _L], ...], None]


def _options_of(
    source: Callable[Concatenate[str, str, Callable[[Path], Any], _P], object],
) -> Callable[[_AnyInit[_S, _L]], _Init[_S, _L, _P]]:
    """Give ``__init__(self, model, stage, loader, **options)`` the options of ``source``.

    For type checkers and ``help()`` alike: the options are listed once, by ``source``.
    """

    def decorate(init: _AnyInit[_S, _L]) -> _Init[_S, _L, _P]:
        own = list(inspect.signature(init).parameters.values())[:4]  # self, model, stage, loader
        theirs = list(inspect.signature(source).parameters.values())[3:]
        init.__signature__ = inspect.Signature([*own, *theirs])  # type: ignore[attr-defined]
        return init

    return decorate


class ThreadedModelWatcher(Generic[T]):
    """An :class:`AsyncModelWatcher` on its own event loop in a daemon thread.

    For synchronous servers: :attr:`current` can be read from any thread (one attribute read);
    ``loader``, ``on_swap`` and ``on_error`` run in the watcher's threads. Takes the same
    arguments as :class:`AsyncModelWatcher` (its constructor is their one definition).

    Example::

        with ThreadedModelWatcher("fraud-detector", "production", load_model) as watcher:
            watcher.wait_for_version(timeout=60)
            serve(lambda x: watcher.current.model.predict(x))

    """

    @_options_of(AsyncModelWatcher)
    def __init__(self, model: str, stage: str, loader: Callable[[Path], T], **options: Any) -> None:
        # Built here, so bad arguments raise in the caller's thread; no loop is needed yet.
        self._watcher: AsyncModelWatcher[T] = AsyncModelWatcher(model, stage, loader, **options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def current(self) -> LoadedModel[T] | None:
        """The model serving now; ``None`` until the first version is loaded."""
        return self._watcher.current

    @property
    def previous(self) -> LoadedModel[T] | None:
        """The model served before ``current``, kept loaded for an instant rollback."""
        return self._watcher.previous

    @property
    def prepared(self) -> LoadedModel[T] | None:
        """A model loaded but not serving, if any.

        A rollout's target, or a version waiting for its activation time.
        """
        return self._watcher.prepared

    @property
    def stats(self) -> WatcherStats:
        """Counters: swaps, failures, reconnects, revision, versions, clock offset, swaps..."""
        return self._watcher.stats

    @property
    def node_id(self) -> str:
        """This node's id in fleet reports."""
        return self._watcher.node_id

    @property
    def state(self) -> ClientState:
        """Lifecycle: unopened, opened (started) or closed (stopped)."""
        return self._watcher.state

    @property
    def health(self) -> dict[str, float]:
        """The health figures reported now (see :meth:`set_health`)."""
        return self._watcher.health

    def set_health(self, figures: Mapping[str, float]) -> None:
        """Publish this node's health figures (see :meth:`AsyncModelWatcher.set_health`).

        Safe from any thread: checked here (bad figures raise in the caller's thread), then
        handed to the watcher's loop, which reports them at once.
        """
        checked = check_health(figures)
        loop = self._loop
        if loop is None or loop.is_closed():
            self._watcher.set_health(checked)  # not started yet (or stopped): nothing runs
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(self._watcher.set_health, checked)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the watcher thread; returns once it is watching (not once a model is loaded)."""
        if self._thread is not None:
            raise RuntimeError("the watcher has already been started")
        self._thread = threading.Thread(
            target=self._thread_main,
            name=f"modelreg-watcher-{self._watcher.stage_id}",
            daemon=True,
        )
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop watching and join the thread (``timeout`` seconds at most); idempotent.

        A loader still running in a worker thread is not interrupted, and the thread's exit
        waits for it.
        """
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait_for_version(
        self, version: int | None = None, timeout: float | None = None
    ) -> LoadedModel[T]:
        """Block until ``current`` is ``version`` (any version if ``None``) and return it.

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
            RuntimeError: Not started, stopped while waiting, or called from a watcher callback.

        """
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the watcher is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("wait_for_version would block the watcher's own event loop")
        future = asyncio.run_coroutine_threadsafe(
            self._watcher.wait_for_version(version, timeout), loop
        )
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RuntimeError("the watcher was stopped") from None

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:
            if self._start_error is None:
                raise  # a crash after start: let the thread report it

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self._watcher.start()
        except BaseException as err:
            self._start_error = err
            raise
        finally:
            self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self._watcher.stop()
