"""``modelreg.v1.WatchService``: the thin face of the stage hub.

A WatchStages handler validates the selection, subscribes to the hub, writes the opening
(snapshot or missed changes), then every queued message; when nothing arrives for a bookmark
interval it writes a bookmark. A stream that overflowed its queue ends RESOURCE_EXHAUSTED.
Every message leaves stamped with ``server_time``, this server's clock as it is written: the
watcher SDK estimates its own clock's offset from it to switch at a rollout's activation time.
Errors become statuses in the server's one interceptor (``modelreg.server.api.grpc``), as for
unary RPCs. Cancellation (the client went away, the server is stopping) is never swallowed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from typing_extensions import override

from modelreg.server.domain import validation
from modelreg.server.domain.errors import FieldViolation, SlowConsumerError, UnavailableError
from modelreg.server.domain.stage_hub import Message, OverflowError_, Selector, StageHub
from modelreg.server.domain.transaction import now_timestamp
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc

READY_TIMEOUT = 10.0
"""Seconds a new stream waits for the hub's first load before UNAVAILABLE."""


def selector_of(req: ws.WatchStagesRequest) -> Selector:
    """Validates a request's selection."""
    v = validation.Violations()
    for i, model in enumerate(req.models):
        validation.model_id(v, f"models[{i}]", model)
    if req.model_prefix:
        v.check(bool(validation.NODE_ID_RE.fullmatch(req.model_prefix.rstrip("-"))) and
                len(req.model_prefix) <= 63, "model_prefix", "must be the start of a model id")
    for i, stage in enumerate(req.stages):
        validation.stage_id(v, f"stages[{i}]", stage)
    if req.region:
        validation.label(v, "region", req.region)
    v.check(req.start_revision >= 0, "start_revision", "must not be negative")
    if req.models and req.model_prefix:
        v.items.append(FieldViolation("model_prefix", "give models or model_prefix, not both"))
    v.raise_if_any()
    return Selector(frozenset(req.models), req.model_prefix, frozenset(req.stages))


class WatchServicer(watch_service_pb2_grpc.WatchServiceServicer):
    """Streams stage pointer changes from the hub."""

    def __init__(
        self,
        hub: StageHub,
        *,
        bookmark_interval: float = 10.0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._hub = hub
        self._bookmark_interval = bookmark_interval
        self._clock = clock

    def _stamped(self, message: Message, *, shared: bool) -> Message:
        """``message`` with ``server_time`` = now, taken as late as possible before it is sent.

        A queued change is shared by every stream with the same selection (the hub builds it
        once), so it is stamped on a copy: each stream's own send time, and the hub's message
        left untouched. Openings and bookmarks are built for this stream alone.
        """
        if shared:
            copy = Message()
            copy.CopyFrom(message)
            message = copy
        message.server_time.CopyFrom(now_timestamp(self._clock()))
        return message

    @override
    async def WatchStages(
        self, request: ws.WatchStagesRequest, context: Any
    ) -> AsyncIterator[ws.WatchStagesResponse]:
        selector = selector_of(request)
        try:
            await asyncio.wait_for(self._hub.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            raise UnavailableError("the watch cache has not loaded from etcd yet") from None
        sub = self._hub.subscribe(selector)
        try:
            for message in await self._hub.opening(sub, request.start_revision):
                yield self._stamped(message, shared=False)
            while True:
                try:
                    # asyncio.timeout, not wait_for: no extra task per message.
                    async with asyncio.timeout(self._bookmark_interval):
                        message = self._stamped(await sub.get(), shared=True)
                except TimeoutError:
                    bookmark = self._hub.bookmark(sub)
                    if bookmark is None:
                        continue
                    message = self._stamped(bookmark, shared=False)
                yield message
        except OverflowError_:
            raise SlowConsumerError(
                f"this stream fell more than {sub.queue.maxsize} messages behind; "
                f"resume with start_revision = your last revision + 1"
            ) from None
        finally:
            self._hub.unsubscribe(sub)
