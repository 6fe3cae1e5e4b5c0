"""Typed errors raised by the modelreg clients: one class per status code the server sends.

The server sends every error as a ``google.rpc.Status`` whose details hold an ``ErrorInfo``
(``reason``: the name of a ``modelreg.v1.errors_pb2.ErrorReason`` value, where each reason is
documented; domain ``modelreg.dev``; string ``metadata``) and, for
``INVALID_ARGUMENT``, a ``BadRequest`` with field violations. :func:`from_rpc_error` unpacks
both, so callers branch on the class and on ``reason`` instead of parsing messages::

    RegistryError                    root; carries code, reason, message, metadata, violations
    ├── InvalidArgumentError         INVALID_ARGUMENT     a request field is malformed
    ├── NotFoundError                NOT_FOUND            metadata["resource"] does not exist
    ├── AlreadyExistsError           ALREADY_EXISTS       metadata["resource"] is taken
    ├── FailedPreconditionError      FAILED_PRECONDITION  a lifecycle rule refused (see reason)
    ├── AbortedError                 ABORTED              stale etag; see current_etag
    ├── UnauthenticatedError         UNAUTHENTICATED      no or bad credentials
    ├── PermissionDeniedError        PERMISSION_DENIED    the actor may not do this
    ├── UnavailableError             UNAVAILABLE          server unreachable or etcd down
    ├── DeadlineExceededError        DEADLINE_EXCEEDED    no answer within the timeout
    └── UnexpectedStatusError        any other code (INTERNAL, UNKNOWN, CANCELLED, ...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "modelreg.dev"
"""``google.rpc.ErrorInfo.domain`` of the errors the modelreg server sends."""


class RegistryError(Exception):
    """Root of every error the modelreg clients raise for a failed call.

    Attributes:
        code: The gRPC status code.
        reason: ``ErrorInfo.reason`` (UPPER_SNAKE, e.g. ``STAGING_REQUIRED``); the code's name
            when the server sent no ``ErrorInfo`` (e.g. an unreachable server).
        message: The human-readable status message.
        metadata: ``ErrorInfo.metadata`` (e.g. ``field``, ``resource``, ``current_etag``).
        field_violations: ``(field, description)`` pairs from ``google.rpc.BadRequest``.

    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.reason: str = reason or self.code.name
        self.message: str = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)

    def __str__(self) -> str:
        if self.reason == self.code.name:
            return f"{self.code.name}: {self.message}"
        return f"{self.code.name} {self.reason}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={self.metadata!r})"
        )


class InvalidArgumentError(RegistryError):
    """A request field is malformed; ``metadata["field"]`` and ``field_violations`` say which."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field(self) -> str:
        """The first bad field (dotted path), or ``""`` if the server named none."""
        if "field" in self.metadata:
            return self.metadata["field"]
        return self.field_violations[0][0] if self.field_violations else ""


class NotFoundError(RegistryError):
    """The named model, version or stage does not exist (``metadata["resource"]``)."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(RegistryError):
    """A create named a resource that already exists (``metadata["resource"]``)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(RegistryError):
    """A lifecycle rule refused the change; ``reason`` names the rule (e.g. STAGING_REQUIRED)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(RegistryError):
    """The etag sent is stale: someone changed the resource since it was read."""

    default_code = grpc.StatusCode.ABORTED

    @property
    def current_etag(self) -> str | None:
        """The resource's current etag as the server reported it, if it did."""
        return self.metadata.get("current_etag")


class UnauthenticatedError(RegistryError):
    """The server could not establish who is calling."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RegistryError):
    """The calling actor is not allowed to do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(RegistryError):
    """The server is unreachable, or reachable but its etcd is not (reason STORE_UNAVAILABLE)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RegistryError):
    """No answer arrived within the call's timeout; the call may or may not have taken effect."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnexpectedStatusError(RegistryError):
    """Any status code without a class of its own (INTERNAL, UNKNOWN, CANCELLED, ...)."""


ERRORS_BY_CODE: dict[grpc.StatusCode, type[RegistryError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}
"""The one mapping from a gRPC status code to the exception class raised for it."""


def from_rpc_error(err: grpc.RpcError) -> RegistryError:
    """Turn a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``) into a typed error.

    Args:
        err: The error a stub call raised. It must also be a ``grpc.Call`` (as sync errors are)
            or an ``AioRpcError`` to carry a code; anything else becomes ``UNKNOWN``.

    Returns:
        An instance of the class :data:`ERRORS_BY_CODE` maps the status code to (or
        :class:`UnexpectedStatusError`), with reason, metadata and field violations unpacked
        from the ``google.rpc.Status`` details when the server sent them.

    """
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    details = details_fn() if callable(details_fn) else None
    message = str(details) if details else str(err)

    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    status = _rich_status(err)
    if status is not None:
        message = str(status.message) or message
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = str(info.reason) or reason
                metadata.update({str(k): str(v) for k, v in info.metadata.items()})
            elif detail.Unpack(bad_request):
                violations.extend(
                    (str(v.field), str(v.description)) for v in bad_request.field_violations
                )
    cls = ERRORS_BY_CODE.get(code, UnexpectedStatusError)
    return cls(message, code=code, reason=reason, metadata=metadata, field_violations=violations)


def _rich_status(err: grpc.RpcError) -> Any:
    """Return the ``google.rpc.Status`` in the trailers; ``None`` if absent or unreadable."""
    if not callable(getattr(err, "trailing_metadata", None)):
        return None
    try:
        return rpc_status.from_call(err)
    except ValueError:
        # Code or message in the Status disagree with the call's own: trust the call's.
        return None
