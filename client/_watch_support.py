"""Pieces of the watcher SDK: loaded models, backoff, node identity, fleet reports, streams."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import random
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from modelreg.client._config import ClientConfig
from modelreg.client._watch_stats import Counters
from modelreg.client.artifacts import ArtifactError, Fetcher, fetch_artifact
from modelreg.client.errors import RegistryError, from_rpc_error
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as ms
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws

if TYPE_CHECKING:
    from modelreg.v1.fleet_service_pb2_grpc import FleetServiceAsyncStub
    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub
    from modelreg.v1.watch_service_pb2_grpc import WatchServiceAsyncStub

# stdlib logging, not structlog: a library leaves handlers and format to the application.
log = logging.getLogger("modelreg.watcher")

T = TypeVar("T")

SwapCallback = Callable[["LoadedModel[T]", "LoadedModel[T] | None"], object]
"""``on_swap(new, old)``: called after each swap (may be ``async``); ``old`` is None at first."""
ErrorCallback = Callable[[int, BaseException], object]
"""``on_error(version, error)``: called when preparing ``version`` failed (may be ``async``)."""


@dataclass(frozen=True)
class LoadedModel(Generic[T]):
    """A verified, completely loaded model version; what ``watcher.current`` holds."""

    version: int
    """The version number."""
    model_version: res.ModelVersion
    """The registered version: artifact URI, digest, framework, signature, metrics..."""
    model: T
    """What the loader returned."""
    path: Path
    """The verified artifact the loader read."""
    loaded_at: datetime
    """When loading finished (UTC)."""


NODE_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
"""A node id: a lowercase slug of 1-63 characters, as the server validates it."""
FIGURE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
"""A health figure's name, as the server validates it (``error_rate``, ``latency_p99_ms``)."""
MAX_FIGURES = 32
"""Health figures a node may report per stage."""


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: attempt ``n`` waits ``U(0.5, 1) * min(maximum, initial*2**n)``.

    The half-range ("equal") jitter spreads reconnecting nodes apart while never retrying in a
    tight loop.
    """

    initial: float = 0.1
    """Upper bound of the first delay, in seconds."""
    maximum: float = 10.0
    """Cap of every delay, in seconds."""
    multiplier: float = 2.0
    """Growth of the bound per attempt."""

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ValueError(f"bad backoff {self}: need 0 < initial <= maximum, multiplier >= 1")

    def delay(self, attempt: int) -> float:
        """Draw the seconds to wait after 0-based ``attempt`` failed."""
        bound = min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))
        return bound * random.uniform(0.5, 1.0)  # jitter, not cryptography


def default_node_id() -> str:
    """Return ``{hostname}-{pid}`` as a valid node id (lowercase slug, at most 63 characters)."""
    host = re.sub(r"[^a-z0-9]+", "-", socket.gethostname().lower()).strip("-") or "node"
    if not host[0].isalpha():
        host = f"n-{host}"
    suffix = f"-{os.getpid()}"
    return host[: 63 - len(suffix)].rstrip("-") + suffix


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is a valid node id, else raise ``ValueError``."""
    if not NODE_ID_RE.match(node_id):
        raise ValueError(f"node_id {node_id!r} must be a lowercase slug [a-z0-9-] of 1-63 chars")
    return node_id


def check_health(figures: Mapping[str, float]) -> dict[str, float]:
    """Return ``figures`` as a dict of floats if the server would accept them, else raise.

    At most 32 figures; names of 1-64 characters of ``a-z 0-9 _ . -`` starting with a letter
    or digit; finite numbers (``ValueError`` otherwise, ``TypeError`` for a non-number).
    """
    if len(figures) > MAX_FIGURES:
        raise ValueError(f"at most {MAX_FIGURES} health figures, not {len(figures)}")
    out: dict[str, float] = {}
    for name, value in figures.items():
        if not isinstance(name, str) or not FIGURE_RE.fullmatch(name):
            raise ValueError(
                f"health figure name {name!r} must be 1-64 characters of a-z, 0-9, '_', '.', "
                "'-', starting with a letter or digit"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"health figure {name}: {value!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"health figure {name} must be a finite number, not {value!r}")
        out[name] = float(value)
    return out


def report_request(
    *,
    node_id: str,
    region: str,
    labels: Mapping[str, str],
    stage_name: str,
    serving_version: int,
    prepared_version: int,
    rollout: str,
    counters: Counters,
    ttl_seconds: int,
    health: Mapping[str, float] | None = None,
) -> fs.ReportNodeRequest:
    """Build the ``ReportNode`` request for a node following one stage.

    ``prepared_version`` is what could serve at once (the serving version unless a rollout's
    target is loaded beside it); ``rollout`` is the rollout whose target the prepared or
    failed version is, if any; ``health`` the figures of the serving version, if any.
    """
    served = fs.ServedStage(
        stage=stage_name,
        serving_version=serving_version,
        prepared_version=prepared_version,
        failed_version=counters.failed_version,
        error=counters.last_error[:1000],
        rollout=rollout,
        health=dict(health or {}),
    )
    if counters.swap_time is not None:
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(counters.swap_time)
        served.swap_time.CopyFrom(ts)
    node = fs.Node(node_id=node_id, region=region, labels=dict(labels), stages=[served])
    return fs.ReportNodeRequest(node=node, ttl_seconds=ttl_seconds)


async def call_back(name: str, callback: Any, *args: Any) -> None:
    """Call a user callback (sync, or async and awaited); log and swallow what it raises."""
    if callback is None:
        return
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("watcher callback %s raised", name)


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; tell whether it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def report_loop(
    stub: FleetServiceAsyncStub,
    request: Callable[[], fs.ReportNodeRequest],
    wake: asyncio.Event,
    counters: Counters,
    config: ClientConfig,
) -> None:
    """Call ``ReportNode`` every ``ttl / 3`` seconds, and at once whenever ``wake`` is set.

    The ttl is the one the server answers with (the requested one until it answers).
    """
    ttl: float | None = None
    while True:
        wake.clear()
        req = request()
        try:
            response = await stub.ReportNode(req, timeout=config.timeout, metadata=config.metadata)
        except grpc.aio.AioRpcError as err:
            counters.report_failures += 1
            log.warning("ReportNode failed: %s: %s", err.code().name, err.details())
        except Exception:
            counters.report_failures += 1
            log.exception("ReportNode failed")
        else:
            counters.reports += 1
            ttl = response.ttl_seconds or None
        await wait_event(wake, (ttl or req.ttl_seconds) / 3)


DEREGISTER_TIMEOUT = 2.0
"""Seconds a stopping watcher waits for the server to remove its node (else the lease ends it)."""


async def deregister(
    stub: FleetServiceAsyncStub, config: ClientConfig, node_id: str, counters: Counters
) -> None:
    """Remove this node from the fleet view now (``DeleteNode``), if it reported; best effort."""
    if not counters.reports:
        return
    request = fs.DeleteNodeRequest(name=f"nodes/{node_id}")
    try:
        await stub.DeleteNode(
            request, timeout=min(config.timeout, DEREGISTER_TIMEOUT), metadata=config.metadata
        )
    except grpc.aio.AioRpcError as err:
        log.info(
            "could not deregister node %s (%s); its lease will end it", node_id, err.code().name
        )


async def prepare_version(
    stub: ModelServiceAsyncStub,
    config: ClientConfig,
    name: str,
    cache_dir: Path,
    fetchers: Mapping[str, Fetcher],
    loader: Callable[[Path], T],
    cancel: threading.Event,
) -> LoadedModel[T]:
    """Read version ``name``, fetch and verify its artifact, load it: all or nothing."""
    try:
        request = ms.GetModelVersionRequest(name=name)
        response = await stub.GetModelVersion(
            request, timeout=config.timeout, metadata=config.metadata
        )
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err) from err
    mv = response.model_version
    log.info("fetching %s from %s", name, mv.artifact_uri)
    path = await asyncio.to_thread(
        fetch_artifact,
        mv.artifact_uri,
        cache_dir,
        sha256=mv.sha256,
        size_bytes=mv.size_bytes,
        fetchers=fetchers,
        cancel=cancel,
    )
    model = await asyncio.to_thread(loader, path)
    return LoadedModel(int(mv.version), mv, model, path, datetime.now(UTC))


def expected_failure(err: Exception) -> bool:
    """Tell whether a failure's message says it all (no traceback needed in the log)."""
    return isinstance(err, ArtifactError | RegistryError)


def log_crash(task: asyncio.Task[None]) -> None:
    """Log a background task that ended with an exception (a bug: it should never end)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("watcher %s crashed", task.get_name(), exc_info=task.exception())


async def follow_stream(
    stub: WatchServiceAsyncStub,
    request: Callable[[int], ws.WatchStagesRequest],
    handle: Callable[[ws.WatchStagesResponse], None],
    counters: Counters,
    config: ClientConfig,
    *,
    backoff: Backoff,
    idle_timeout: float,
) -> None:
    """Hold a watch stream for ever, passing each message to ``handle``.

    Whatever ends a stream (an error status such as UNAVAILABLE or RESOURCE_EXHAUSTED, a server
    that closes it, or ``idle_timeout`` seconds without even a bookmark), it is reopened after a
    jittered backoff with ``start_revision = counters.last_revision + 1`` (0, for a snapshot,
    until a first message arrived, and after OUT_OF_RANGE: a server whose etcd never reached
    our revision, because it was replaced or restored, can only give a fresh snapshot).
    ``handle`` moves ``last_revision``. The backoff restarts from its smallest delay once a
    stream delivered a message.
    """
    attempt = 0
    while True:
        last = counters.last_revision
        call = stub.WatchStages(request(last + 1 if last else 0), metadata=config.metadata)
        try:
            async with asyncio.timeout(idle_timeout) as idle:
                async for message in call:
                    attempt = 0
                    idle.reschedule(asyncio.get_running_loop().time() + idle_timeout)
                    handle(message)
            why = "the server ended the stream"
        except grpc.aio.AioRpcError as err:
            why = f"{err.code().name}: {err.details()}"
            if err.code() == grpc.StatusCode.OUT_OF_RANGE:
                # The server has never reached our revision: its etcd was replaced or restored
                # from a backup. What we hold may be gone: start over from a snapshot.
                log.warning("the server's revisions are behind ours (%s); taking a snapshot", why)
                counters.last_revision = 0
        except TimeoutError:
            why = f"nothing received for {idle_timeout:g}s"
        except Exception as err:  # a bug or a broken message: never stop watching
            log.exception("watch stream failed")
            why = repr(err)
        finally:
            call.cancel()
        delay = backoff.delay(attempt)
        attempt += 1
        counters.reconnects += 1
        log.warning(
            "watch stream lost (%s); resuming from revision %d in %.2fs",
            why, counters.last_revision + 1, delay,
        )  # fmt: skip
        await asyncio.sleep(delay)
