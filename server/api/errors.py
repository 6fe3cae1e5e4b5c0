"""The one table from domain errors to gRPC status codes, and the rich status sent with them.

Each error goes out as a ``google.rpc.Status`` carrying ``ErrorInfo`` (reason, domain,
metadata: AIP-193) and, for bad requests, ``BadRequest`` with one violation per field.
Anything that is not a ``ModelregError`` is a server bug: the interceptor turns it into an
``InternalError`` (``INTERNAL``, a generic message and an error id).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from modelreg.server.domain.errors import (
    ERROR_DOMAIN,
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ModelregError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    RolloutDoneError,
    RolloutInProgressError,
    SlowConsumerError,
    UnauthenticatedError,
    UnavailableError,
)

STATUS_BY_ERROR: dict[type[ModelregError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    RolloutDoneError: grpc.StatusCode.FAILED_PRECONDITION,
    AbortedError: grpc.StatusCode.ABORTED,
    RolloutInProgressError: grpc.StatusCode.ABORTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    SlowConsumerError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    InternalError: grpc.StatusCode.INTERNAL,
}


def status_code(err: ModelregError) -> grpc.StatusCode:
    """The code of the nearest class of ``err`` in the table."""
    for cls in type(err).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(err: ModelregError) -> grpc.Status:
    """The gRPC status, with ``ErrorInfo`` and ``BadRequest`` details, for a domain error."""
    code = status_code(err)
    details = [
        _pack(error_details_pb2.ErrorInfo(
            reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata
        ))
    ]
    if isinstance(err, InvalidArgumentError):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations
        ])))
    status = status_pb2.Status(code=code.value[0], message=err.message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted
