"""``AsyncModelWatcher``: follow one stage pointer and hot-swap the model it names."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, Unpack

from grpc import aio

from modelreg.client import _requests as rq
from modelreg.client._channel import ClientState, async_channel
from modelreg.client._config import ChannelOptions, ClientConfig
from modelreg.client._watch_support import (
    Backoff,
    Counters,
    ErrorCallback,
    LoadedModel,
    SwapCallback,
    WatcherStats,
    call_back,
    check_node_id,
    default_node_id,
    deregister,
    expected_failure,
    follow_stream,
    log,
    log_crash,
    prepare_version,
    report_loop,
    report_request,
    wait_event,
)
from modelreg.client.artifacts import Fetcher
from modelreg.client.errors import DeadlineExceededError, UnavailableError
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc as fs_grpc
from modelreg.v1 import model_service_pb2_grpc as ms_grpc
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc as ws_grpc

T = TypeVar("T")


@dataclass
class _Preparing:
    version: int
    task: asyncio.Task[Any]
    cancel: threading.Event


class AsyncModelWatcher(Generic[T]):
    """Follows ``models/{model}/stages/{stage}`` and keeps the model it names loaded.

    Each time the pointer names a new version: ``GetModelVersion``, fetch the artifact, verify
    its size and sha256, run ``loader(path)`` in a thread, then swap :attr:`current` with one
    reference assignment. The model replaced stays warm as :attr:`previous`; a move back to it
    swaps instantly. A failed attempt never touches :attr:`current`: it is logged, passed to
    ``on_error``, reported (``failed_version``) and retried with backoff until it succeeds or
    the pointer moves on. A pointer that is emptied or deleted leaves the model serving.

    Args:
        model: Model id or ``models/{id}``.
        stage: Stage id (``production``) or full stage name.
        loader: ``loader(path) -> model``; blocking, run in a worker thread.
        target: ``host:port`` of a modelreg server; default ``$MODELREG_TARGET``, else
            ``127.0.0.1:50051``.
        node_id: This node's id in fleet reports; default ``{hostname}-{pid}``.
        region: Region of this node (lowercase slug), sent with the watch and the reports.
        labels: Labels reported with the node.
        on_swap: Called after every swap as ``on_swap(new, old)``, on the watcher's loop
            (keep it short).
        on_error: Called after every failed attempt as ``on_error(version, error)``.
        cache_dir: Where verified artifacts are kept (named by sha256, never evicted); default a
            private temporary directory that keeps current and previous only.
        fetchers: Extra artifact fetchers by URI scheme (see :mod:`modelreg.client.artifacts`).
        ttl_seconds: Fleet lease (default 15 s); ``ReportNode`` is called every
            ``ttl_seconds / 3``, and :meth:`stop` removes the node at once (``DeleteNode``).
        report: Whether to report to ``FleetService`` at all.
        reconnect_backoff: Delays between watch stream attempts.
        retry_backoff: Delays between attempts to prepare a version that failed.
        idle_timeout: Reconnect when the stream sends nothing (not even a bookmark) this long.
        call_timeout: Deadline of each unary call, in seconds.
        **channel: Passed on to :meth:`~modelreg.client.ClientConfig.create`, as every tool
            does: ``actor`` (sent as ``x-modelreg-actor``; default ``$MODELREG_ACTOR`` or the
            OS user), ``credentials`` (TLS; plaintext when ``None``), ``options`` (gRPC channel
            options).

    """

    def __init__(
        self,
        model: str,
        stage: str,
        loader: Callable[[Path], T],
        *,
        target: str | None = None,
        node_id: str | None = None,
        region: str = "",
        labels: Mapping[str, str] | None = None,
        on_swap: SwapCallback[T] | None = None,
        on_error: ErrorCallback | None = None,
        cache_dir: str | Path | None = None,
        fetchers: Mapping[str, Fetcher] | None = None,
        ttl_seconds: int = 15,
        report: bool = True,
        reconnect_backoff: Backoff = Backoff(0.1, 5.0),  # noqa: B008 (frozen)
        retry_backoff: Backoff = Backoff(0.5, 30.0),  # noqa: B008 (frozen)
        idle_timeout: float = 60.0,
        call_timeout: float = 10.0,
        **channel: Unpack[ChannelOptions],
    ) -> None:
        # Retries are the watcher's own (reconnect and retry backoffs), not the client's.
        self._config = ClientConfig.create(target, timeout=call_timeout, retries=0, **channel)
        self.model_id = rq.model_id(model)
        self.stage_name = rq.stage_name(model, stage)
        self.stage_id = self.stage_name.rsplit("/", 1)[-1]
        self.node_id = check_node_id(node_id) if node_id is not None else default_node_id()
        self.region = region
        self.labels = dict(labels or {})
        self._loader = loader
        self._on_swap = on_swap
        self._on_error = on_error
        self._own_cache = cache_dir is None
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._fetchers = dict(fetchers or {})
        if not 5 <= ttl_seconds <= 300:
            raise ValueError(f"ttl_seconds must be within 5-300, not {ttl_seconds}")
        self._ttl = ttl_seconds
        self._report = report
        self._reconnect_backoff = reconnect_backoff
        self._retry_backoff = retry_backoff
        self._idle_timeout = idle_timeout
        self._state = ClientState.UNOPENED
        # (current, previous), replaced as one reference so no reader sees half a swap.
        self._slots: tuple[LoadedModel[T] | None, LoadedModel[T] | None] = (None, None)
        self._counters = Counters()
        self._committed: int | None = None  # None until the first snapshot
        self._preparing: _Preparing | None = None
        self._channel: aio.Channel | None = None
        self._main: asyncio.Task[None] | None = None

    @property
    def current(self) -> LoadedModel[T] | None:
        """The model serving now; ``None`` until the first version is loaded."""
        return self._slots[0]

    @property
    def previous(self) -> LoadedModel[T] | None:
        """The model served before ``current``, kept loaded for an instant rollback."""
        return self._slots[1]

    @property
    def stats(self) -> WatcherStats:
        """Counters: swaps, failures, reconnects, revision, committed version..."""
        return self._counters.snapshot()

    @property
    def state(self) -> ClientState:
        """Lifecycle: unopened, opened (started) or closed (stopped)."""
        return self._state

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the channel and start watching, preparing and reporting in the background.

        Returns at once; use :meth:`wait_for_version` to wait for a model.
        """
        if self._state is not ClientState.UNOPENED:
            raise RuntimeError(f"cannot start a watcher that is {self._state.name.lower()}")
        self._state = ClientState.OPENED
        if self._cache_dir is None:
            self._cache_dir = Path(tempfile.mkdtemp(prefix="modelreg-artifacts-"))
        self._channel = async_channel(self._config)
        self._watch_stub = ws_grpc.WatchServiceStub(self._channel)
        self._model_stub = ms_grpc.ModelServiceStub(self._channel)
        self._fleet_stub = fs_grpc.FleetServiceStub(self._channel)
        self._wake = asyncio.Event()
        self._report_now = asyncio.Event()
        self._changed = asyncio.Condition()
        self._main = asyncio.create_task(self._run(), name=f"modelreg-watcher {self.stage_name}")
        self._main.add_done_callback(log_crash)

    async def stop(self) -> None:
        """Stop the tasks, leave the fleet view, close the channel; ``current`` stays readable."""
        started, self._state = self._state is ClientState.OPENED, ClientState.CLOSED
        if not started:
            return
        if self._preparing is not None:
            self._preparing.cancel.set()
        if self._main is not None:
            self._main.cancel()
            await asyncio.wait([self._main])  # raises only if *we* are cancelled
        if self._channel is not None:
            await deregister(self._fleet_stub, self._config, self.node_id, self._counters)
            await self._channel.close()
        async with self._changed:
            self._changed.notify_all()
        if self._own_cache and self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)

    async def wait_for_version(
        self,
        version: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (mirrors the threaded watcher)
    ) -> LoadedModel[T]:
        """Wait until ``current`` is ``version`` (any version if ``None``) and return it.

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
            RuntimeError: The watcher is not started, or was stopped while waiting.

        """
        if self._state is not ClientState.OPENED:
            raise RuntimeError(f"cannot wait on a watcher that is {self._state.name.lower()}")

        def ready() -> bool:
            cur = self.current
            done = cur is not None and (version is None or cur.version == version)
            return done or self._state is ClientState.CLOSED

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(ready)
        cur = self.current
        if cur is None or (version is not None and cur.version != version):
            raise RuntimeError("the watcher was stopped")
        return cur

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_loop(), name="watch")
            tg.create_task(self._apply_loop(), name="apply")
            if self._report:
                tg.create_task(self._report_loop(), name="report")

    async def _watch_loop(self) -> None:
        def request(start_revision: int) -> ws.WatchStagesRequest:
            return ws.WatchStagesRequest(
                models=[self.model_id],
                stages=[self.stage_id],
                region=self.region,
                start_revision=start_revision,
            )

        await follow_stream(
            self._watch_stub, request, self._handle, self._counters, self._config,
            backoff=self._reconnect_backoff, idle_timeout=self._idle_timeout,
        )  # fmt: skip

    def _handle(self, message: ws.WatchStagesResponse) -> None:
        c = self._counters
        if message.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT:
            # Initial or `reset` snapshot: the pointer's value, whatever came before.
            version = next((p.version for p in message.snapshot if p.name == self.stage_name), 0)
            if message.reset:
                log.warning("watch of %s reset at revision %d", self.stage_name, message.revision)
            self._set_committed(version)
        elif message.type == ws.WATCH_MESSAGE_TYPE_CHANGES and message.revision > c.last_revision:
            for change in message.changes:
                if change.stage.name == self.stage_name:
                    self._set_committed(0 if change.deleted else change.stage.version)
        c.last_revision = max(c.last_revision, message.revision)

    def _set_committed(self, version: int) -> None:
        self._committed = version
        self._counters.committed_version = version
        if self._counters.drop_failure_unless(version):
            self._report_now.set()  # the failure no longer applies: say so now
        prep = self._preparing
        if prep is not None and prep.version != version:
            prep.cancel.set()  # stops the artifact transfer at its next write
            prep.task.cancel()
        self._wake.set()

    async def _apply_loop(self) -> None:
        """Reconcile ``current`` with the committed version, one attempt at a time."""
        failed_version, attempt = 0, 0
        while True:
            self._wake.clear()
            target = self._committed
            current, previous = self._slots
            if not target or (current is not None and current.version == target):
                if target == 0 and current is not None:
                    log.warning("%s is empty; still serving v%d", self.stage_name, current.version)
                await self._wake.wait()
                continue
            if previous is not None and previous.version == target:
                await self._swap(previous)
                continue
            if failed_version != target:
                failed_version, attempt = target, 0
            try:
                loaded = await self._prepare_superseding(target)
            except Exception as err:
                await self._failed(target, err)
                await wait_event(self._wake, self._retry_backoff.delay(attempt))
                attempt += 1
                continue
            if loaded is not None and loaded.version == self._committed:
                failed_version, attempt = 0, 0
                await self._swap(loaded)

    async def _prepare_superseding(self, version: int) -> LoadedModel[T] | None:
        """Prepare ``version``; ``None`` if a pointer move superseded it meanwhile."""
        cancel = threading.Event()
        assert self._cache_dir is not None
        name = rq.version_name(self.model_id, version)
        coro = prepare_version(
            self._model_stub, self._config, name, self._cache_dir, self._fetchers, self._loader,
            cancel,
        )  # fmt: skip
        task = asyncio.create_task(coro)
        self._preparing = _Preparing(version, task, cancel)
        try:
            await asyncio.wait([task])
        finally:
            self._preparing = None
            if not task.done():  # we are being cancelled ourselves
                cancel.set()
                task.cancel()
                await asyncio.wait([task])  # returns at once: threads are not waited for
        if task.cancelled():
            log.info("preparing %s v%d superseded", self.stage_name, version)
            return None
        return task.result()

    async def _swap(self, new: LoadedModel[T]) -> None:
        old, dropped = self._slots
        self._slots = (new, old)  # the swap: one reference assignment
        c = self._counters
        c.swaps += 1
        c.swap_time = datetime.now(UTC)
        c.failed_version, c.last_error = 0, ""
        log.info(
            "%s now serves v%d (was %s)",
            self.stage_name, new.version, f"v{old.version}" if old else "nothing",
        )  # fmt: skip
        kept = {new.path, old.path if old else new.path}
        if self._own_cache and dropped is not None and dropped.path not in kept:
            dropped.path.unlink(missing_ok=True)  # keep two artifacts, not every one
        self._report_now.set()
        async with self._changed:
            self._changed.notify_all()
        await call_back("on_swap", self._on_swap, new, old)

    async def _failed(self, version: int, err: Exception) -> None:
        c = self._counters
        c.failures += 1
        transient = isinstance(err, UnavailableError | DeadlineExceededError)
        if not transient:  # the control plane's trouble is not this node's failure
            c.failed_version, c.last_error = version, f"{type(err).__name__}: {err}"
            self._report_now.set()
        current = self.current
        log.error(
            "preparing %s v%d failed (%s: %s); still serving %s",
            self.stage_name, version, type(err).__name__, err,
            f"v{current.version}" if current else "nothing",
            exc_info=not transient and not expected_failure(err),
        )  # fmt: skip
        await call_back("on_error", self._on_error, version, err)

    async def _report_loop(self) -> None:
        def request() -> fs.ReportNodeRequest:
            current = self.current
            return report_request(
                node_id=self.node_id,
                region=self.region,
                labels=self.labels,
                stage_name=self.stage_name,
                serving_version=current.version if current else 0,
                counters=self._counters,
                ttl_seconds=self._ttl,
            )

        await report_loop(self._fleet_stub, request, self._report_now, self._counters, self._config)
