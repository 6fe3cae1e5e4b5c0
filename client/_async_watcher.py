"""``AsyncModelWatcher``: follow one stage pointer and hot-swap the model it names."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
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
from modelreg.client._model_slots import ModelSlots
from modelreg.client._server_clock import ServerClock
from modelreg.client._stage_target import StageTarget
from modelreg.client._watch_stats import Counters, SwapRecord, WatcherStats
from modelreg.client._watch_support import (
    Backoff,
    ErrorCallback,
    LoadedModel,
    SwapCallback,
    call_back,
    check_health,
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

    Health: :meth:`set_health` publishes figures of the node's choosing (an error rate, a
    latency percentile) with every fleet report, for the rollout guard of a governed stage,
    which rolls a new version back in every region when too many nodes breach its thresholds.

    Two-phase rollouts: while the pointer carries a rollout's ``pending_version``, that version
    is prepared the same way (fetched, verified, loaded) but not served: it is kept as
    :attr:`prepared` and reported (``prepared_version``, or ``failed_version`` with the error,
    retried with backoff while the rollout lasts). When the pointer then moves to it with an
    ``activation_time``, the swap happens when the servers' clock reaches that time (estimated
    from the stream's ``server_time``: see :mod:`modelreg.client._server_clock`), or on
    receipt if it is past; a version that was not prepared is prepared first. A rollout that
    aborts (pending cleared, the pointer still where it was) drops the prepared model. Each
    swap is recorded in ``stats.recent_swaps`` (local time, estimated server time, activation
    time, where the model came from).

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
        self._slots: ModelSlots[T] = ModelSlots(own_cache=self._own_cache)
        self._counters = Counters()
        self._clock = ServerClock()
        self._pointer: StageTarget | None = None  # None until the first snapshot
        self._preparing: _Preparing | None = None
        self._health: tuple[int, dict[str, float]] = (0, {})
        """The figures of :meth:`set_health`, with the version serving when they were set."""
        self._channel: aio.Channel | None = None
        self._main: asyncio.Task[None] | None = None

    @property
    def current(self) -> LoadedModel[T] | None:
        """The model serving now; ``None`` until the first version is loaded."""
        return self._slots.current

    @property
    def previous(self) -> LoadedModel[T] | None:
        """The model served before ``current``, kept loaded for an instant rollback."""
        return self._slots.previous

    @property
    def prepared(self) -> LoadedModel[T] | None:
        """A model loaded but not serving, if any.

        A rollout's target, or a version waiting for its activation time.
        """
        prepared = self._slots.prepared
        return prepared.loaded if prepared is not None else None

    @property
    def stats(self) -> WatcherStats:
        """Counters: swaps, failures, reconnects, revision, versions, clock offset, swaps..."""
        return self._counters.snapshot(self._clock.offset)

    @property
    def state(self) -> ClientState:
        """Lifecycle: unopened, opened (started) or closed (stopped)."""
        return self._state

    @property
    def health(self) -> dict[str, float]:
        """The health figures reported now (see :meth:`set_health`); empty after a swap."""
        version, figures = self._health
        current = self.current
        return dict(figures) if current is not None and current.version == version else {}

    def set_health(self, figures: Mapping[str, float]) -> None:
        """Publish this node's health figures, replacing those set before; reported at once.

        Figures of the application's choosing, by name (e.g. ``{"error_rate": 0.02,
        "latency_p99_ms": 180.0}``), sent with every fleet report (``ServedStage.health``): a
        stage's rollout guard compares them with its thresholds while a new version bakes,
        and rolls the stage back in every region if too many nodes breach them. The figures
        describe the version serving when they are set: after a swap they are no longer
        reported until set again, so the old version's figures are never taken for the new
        one's. Call it from the watcher's event loop (``ThreadedModelWatcher.set_health``
        from any thread); an empty mapping stops reporting figures.

        Raises:
            ValueError: More than 32 figures, a name the server refuses (1-64 characters of
                ``a-z 0-9 _ . -``, starting with a letter or digit), a value not finite.
            TypeError: A value that is not a number.

        """
        checked = check_health(figures)
        current = self.current
        self._health = (current.version if current is not None else 0, checked)
        if self._state is ClientState.OPENED:
            self._report_now.set()

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
            # A pin is its region's state, outside the revisions a stream resumes from: a
            # watcher that serves a pinned version starts over from a snapshot (the pin may
            # have been cleared meanwhile, or this may be another region's server).
            pinned = self._pointer is not None and self._pointer.pinned
            return ws.WatchStagesRequest(
                models=[self.model_id],
                stages=[self.stage_id],
                region=self.region,
                start_revision=0 if pinned else start_revision,
            )

        await follow_stream(
            self._watch_stub, request, self._handle, self._counters, self._config,
            backoff=self._reconnect_backoff, idle_timeout=self._idle_timeout,
        )  # fmt: skip

    def _handle(self, message: ws.WatchStagesResponse) -> None:
        c = self._counters
        if message.HasField("server_time"):
            self._clock.observe(message.server_time.ToNanoseconds() / 1e9)
        if message.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT:
            # Initial or `reset` snapshot: the pointer's value, whatever came before.
            found = next((p for p in message.snapshot if p.name == self.stage_name), None)
            if message.reset:
                log.warning("watch of %s reset at revision %d", self.stage_name, message.revision)
            target = StageTarget() if found is None else StageTarget.of(found, message)
            self._set_pointer(target)
        elif message.type == ws.WATCH_MESSAGE_TYPE_CHANGES and (
            message.revision > c.last_revision or message.local_change
        ):  # a region's pin set or cleared comes at a revision the stream may have reached
            for change in message.changes:
                if change.stage.name == self.stage_name:
                    self._set_pointer(
                        StageTarget() if change.deleted else StageTarget.of(change.stage, message)
                    )
        c.last_revision = max(c.last_revision, message.revision)

    def _set_pointer(self, pointer: StageTarget) -> None:
        before = self._pointer
        if pointer.pinned and (before is None or before.pinned != pointer.pinned
                               or before.version != pointer.version):
            log.warning("%s is pinned to v%d in %s (break glass): the primary's pointer is "
                        "overridden until an operator clears the pin",
                        self.stage_name, pointer.version, pointer.pinned)
        elif before is not None and before.pinned and not pointer.pinned:
            log.warning("%s: the pin in %s was cleared; following the primary's v%d",
                        self.stage_name, before.pinned, pointer.version)
        self._pointer = pointer
        c = self._counters
        c.committed_version = pointer.version
        c.pending_version, c.pending_rollout = pointer.pending_version, pointer.pending_rollout
        if c.drop_failure_unless(pointer.version, pointer.pending_version):
            self._report_now.set()  # the failure no longer applies: say so now
        prep = self._preparing
        if prep is not None and not self._still_wanted(prep.version, pointer):
            prep.cancel.set()  # stops the artifact transfer at its next write
            prep.task.cancel()
        self._wake.set()

    def _still_wanted(self, version: int, pointer: StageTarget) -> bool:
        """Whether preparing ``version`` still serves a purpose.

        It does if it is the version to serve, or the rollout's target while the version to
        serve is already serving: serving the pointer's version comes first.
        """
        if version == pointer.version:
            return True
        current = self.current
        serving = current is not None and current.version == pointer.version
        return version == pointer.pending_version and (serving or not pointer.version)

    async def _apply_loop(self) -> None:
        """Reconcile ``current`` and ``prepared`` with the pointer, one attempt at a time.

        The pointer's version comes first: swap to it (at its activation time) if a loaded
        model of it is at hand, else prepare it. Then the rollout's pending version: prepare
        it, and keep it beside the serving model.
        """
        failed_version, attempt = 0, 0
        while True:
            self._wake.clear()
            pointer = self._pointer
            if pointer is None:
                await self._wake.wait()
                continue
            self._drop_prepared(pointer)
            current, prepared = self.current, self.prepared
            if pointer.version and (current is None or current.version != pointer.version):
                target = pointer.version
                ready = self._slots.ready(target)
                if ready is not None:
                    if not await self._until_activation(pointer):
                        failed_version, attempt = 0, 0
                        await self._swap(*ready, pointer)
                    continue
            elif pointer.pending_version and (
                prepared is None or prepared.version != pointer.pending_version
            ):
                target = pointer.pending_version
            else:
                if pointer.version == 0 and current is not None:
                    log.warning("%s is empty; still serving v%d", self.stage_name, current.version)
                await self._wake.wait()
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
            if loaded is not None:
                failed_version, attempt = 0, 0
                self._keep_prepared(loaded, ahead=target != pointer.version)

    async def _until_activation(self, pointer: StageTarget) -> bool:
        """Wait for ``pointer``'s activation time on the servers' clock.

        Tell whether the pointer moved meanwhile (then nothing is due: look again).
        """
        if pointer.activation is None:
            return False
        logged = False
        while (delay := self._clock.until(pointer.activation)) > 0:
            if not logged:
                log.info(
                    "%s: switching to v%d in %.3fs (activation time)",
                    self.stage_name,
                    pointer.version,
                    delay,
                )
                logged = True
            if await wait_event(self._wake, delay):
                return True
        return False

    def _keep_prepared(self, loaded: LoadedModel[T], *, ahead: bool) -> None:
        self._slots.keep_prepared(loaded, ahead=ahead)
        self._counters.prepared_version = loaded.version
        if ahead:
            current = self.current
            log.info(
                "%s: v%d prepared for %s; still serving %s",
                self.stage_name, loaded.version, self._counters.pending_rollout or "a rollout",
                f"v{current.version}" if current else "nothing",
            )  # fmt: skip
        self._report_now.set()

    def _drop_prepared(self, pointer: StageTarget) -> None:
        """Drop a prepared model the pointer no longer names (its rollout aborted)."""
        dropped = self._slots.drop_prepared_unless(pointer.version, pointer.pending_version)
        if dropped is not None:
            self._counters.prepared_version = 0
            log.info(
                "%s: dropped prepared v%d (the pointer no longer names it)",
                self.stage_name,
                dropped.version,
            )
            self._report_now.set()

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

    async def _swap(self, new: LoadedModel[T], source: str, pointer: StageTarget) -> None:
        old = self._slots.swap(new)  # the swap: one reference assignment
        local, server = time.time(), self._clock.now()
        c = self._counters
        c.prepared_version = self.prepared.version if self.prepared is not None else 0
        c.swaps += 1
        c.swap_time = datetime.fromtimestamp(local, UTC)
        c.failed_version, c.last_error = 0, ""
        c.recent_swaps.append(SwapRecord(
            version=new.version,
            from_version=old.version if old else 0,
            local_time=c.swap_time,
            server_time=datetime.fromtimestamp(server, UTC),
            activation_time=(datetime.fromtimestamp(pointer.activation, UTC)
                             if pointer.activation is not None else None),
            rollout=pointer.rollout,
            source=source,
        ))  # fmt: skip
        log.info(
            "%s now serves v%d (was %s)",
            self.stage_name, new.version, f"v{old.version}" if old else "nothing",
        )  # fmt: skip
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
            current, prepared = self.current, self.prepared
            pointer = self._pointer or StageTarget()
            serving = current.version if current else 0
            ready = prepared.version if prepared is not None else serving
            return report_request(
                node_id=self.node_id,
                region=self.region,
                labels=self.labels,
                stage_name=self.stage_name,
                serving_version=serving,
                prepared_version=ready,
                rollout=pointer.rollout_of(self._counters.failed_version or ready),
                counters=self._counters,
                ttl_seconds=self._ttl,
                health=self.health,
            )

        await report_loop(self._fleet_stub, request, self._report_now, self._counters, self._config)
