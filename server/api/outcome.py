"""What one RPC's caller got: logged as one line and counted once, when the call ends.

Part of the server's one interceptor (:mod:`modelreg.server.api.grpc`): the error a handler
raised becomes the status its caller gets here (a domain error through the one table of
:mod:`modelreg.server.api.errors`, the primary's status of a forwarded call unchanged, anything
else INTERNAL with an error id), and the line logged names method, actor, request id, model,
stage, revision and that code.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from modelreg.server.api import errors
from modelreg.server.api.forward import PrimaryAnswered
from modelreg.server.api.metrics import Metrics
from modelreg.server.domain.errors import InternalError, ModelregError, clip
from modelreg.v1.errors_pb2 import ErrorReason

log = structlog.get_logger("modelreg.rpc")

_STORE_UNAVAILABLE = ErrorReason.Name(ErrorReason.STORE_UNAVAILABLE)

LOGGED_CHARS = 64
"""Characters of a request value (model, stage, request id) put in a log line."""


def context_fields(request: object) -> dict[str, Any]:
    """Request id, model and stage named by a request, for the log line (bounded)."""
    fields: dict[str, Any] = {}
    if getattr(request, "request_id", ""):
        fields["request_id"] = clip(request.request_id, LOGGED_CHARS)  # type: ignore[attr-defined]
    for attr in ("name", "parent", "model"):
        value = getattr(request, attr, None)
        if isinstance(value, Message):
            value = getattr(value, "name", "")
        if isinstance(value, str) and value.startswith("models/"):
            parts = value.split("/", 4)
            fields["model"] = clip(parts[1], LOGGED_CHARS)
            if len(parts) >= 4 and parts[2] == "stages":
                fields["stage"] = clip(parts[3], LOGGED_CHARS)
            break
    return fields


def deadline_passed(context: Any) -> bool:
    """Whether the call's deadline has passed (its caller has DEADLINE_EXCEEDED already)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class Outcome:
    """What one call's caller got, logged as one line and counted once when the call ends."""

    def __init__(self, metrics: Metrics, method: str, request: object) -> None:
        self.metrics = metrics
        self.method = method
        self.fields = context_fields(request)
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()

    def succeeded(self, context: Any, response: object = None) -> None:
        """The handler finished; past the deadline the caller has DEADLINE_EXCEEDED already."""
        if deadline_passed(context):
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED
        if getattr(response, "revision", 0):
            self.fields["revision"] = response.revision  # type: ignore[attr-defined]

    def failed(self, err: BaseException, context: Any) -> grpc.Status | None:
        """The status to abort with, or None when ``err`` must propagate as it is."""
        if isinstance(err, asyncio.CancelledError | GeneratorExit):
            # grpc cancels the handler when the client cancels or the deadline passes.
            self.code = (grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context)
                         else grpc.StatusCode.CANCELLED)
            return None
        if isinstance(err, ModelregError):
            self.code = errors.status_code(err)
            self.fields.update(reason=err.reason, error=err.message)
            if err.reason == _STORE_UNAVAILABLE:
                self.metrics.etcd_errors.inc()
            return errors.to_status(err)
        if isinstance(err, PrimaryAnswered):
            # The primary's status, as it sent it: code, message and details.
            self.code = err.code
            self.fields.update(reason=err.reason, error=err.message)
            return err.status
        if not isinstance(err, Exception) or isinstance(err, grpc.aio.AbortError):
            # KeyboardInterrupt and the like, or a handler that aborted by itself (none does:
            # handlers raise and this maps): grpc ends the call; its code is not known here.
            self.code = grpc.StatusCode.UNKNOWN
            return None
        internal = InternalError(uuid.uuid4().hex[:16])
        self.code = grpc.StatusCode.INTERNAL
        self.fields.update(reason=internal.reason, error_id=internal.error_id)
        log.error("rpc_failed", method=self.method, exc_info=err, **self.fields)
        return errors.to_status(internal)

    def done(self) -> None:
        """Counts and logs the call with the code its caller got."""
        elapsed = time.perf_counter() - self.started
        self.metrics.rpcs.labels(self.method, self.code.name).inc()
        self.metrics.latency.labels(self.method).observe(elapsed)
        level = log.info if self.code == grpc.StatusCode.OK else log.warning
        level("rpc", method=self.method, code=self.code.name,
              duration_ms=round(elapsed * 1000, 3), **self.fields)
