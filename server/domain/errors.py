"""The one error hierarchy of modelreg's domain.

Every failure a caller can cause or meet is one of these; the gRPC layer maps each class to one
status code in a single table (``modelreg.server.api.errors``) and sends ``reason`` as the
``google.rpc.ErrorInfo`` reason, so clients can branch on it without parsing messages::

    ModelregError                   root; never raised itself
    ├── InvalidArgumentError        a field is malformed or too large   → INVALID_ARGUMENT
    │   └── OutOfRangeError         a valid value past what exists now  → OUT_OF_RANGE
    ├── NotFoundError               the named resource does not exist   → NOT_FOUND
    ├── AlreadyExistsError          create of a name that is taken      → ALREADY_EXISTS
    ├── FailedPreconditionError     a lifecycle rule refuses the change → FAILED_PRECONDITION
    │   └── RolloutDoneError        the rollout already committed or aborted
    ├── AbortedError                a concurrent change got in the way  → ABORTED
    │   ├── EtagMismatchError       the caller's etag is stale
    │   ├── ContentionError         retried against fresh state, gave up
    │   └── RolloutInProgressError  a rollout of the stage is still preparing
    ├── UnauthenticatedError        no identity the server accepts      → UNAUTHENTICATED
    ├── PermissionDeniedError       the principal may not call the RPC  → PERMISSION_DENIED
    ├── SlowConsumerError           a watch stream fell too far behind  → RESOURCE_EXHAUSTED
    ├── UnavailableError            etcd cannot be reached              → UNAVAILABLE
    │   ├── PrimaryUnavailableError     a mutation cannot be forwarded to the primary
    │   └── RevisionNotYetAppliedError  the region lags behind the call's minimum revision
    └── InternalError               a server bug, found by its error id → INTERNAL

Everything an error carries goes back to the caller in the status trailers (message, metadata,
field violations), where gRPC clients refuse more than 8 KiB in all: a bad value is only ever
echoed as a short prefix (``echo``), and the constructors bound whatever else they are given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelreg.v1.errors_pb2 import ErrorReason

ERROR_DOMAIN = "modelreg.dev"
"""``google.rpc.ErrorInfo.domain`` of every error modelreg sends."""

ECHO_CHARS = 40
"""Characters of a caller's value echoed back in an error (and logged)."""
MAX_MESSAGE = 1024
MAX_METADATA_VALUE = 256
MAX_VIOLATIONS = 8
MAX_FIELD = 128
MAX_DESCRIPTION = 256


def echo(value: str) -> str:
    """A caller's value for an error message: quoted, ASCII-escaped, at most a short prefix.

    ASCII so the status message needs no percent-encoding on the wire (which would multiply
    its size); a prefix so a 2 MiB id cannot make a 2 MiB status, trailer or log line.
    """
    if len(value) <= ECHO_CHARS:
        return ascii(value)
    return f"{value[:ECHO_CHARS]!a}... ({len(value)} characters)"


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, marked with "..." when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as in ``google.rpc.BadRequest.FieldViolation``."""

    field: str
    """Dotted path of the field in the request, e.g. ``model_version.sha256``."""
    description: str
    """What is wrong and what would be right."""

    def __post_init__(self) -> None:
        # Map keys become part of field paths: bound them here, whoever built the violation.
        object.__setattr__(self, "field", clip(self.field, MAX_FIELD))
        object.__setattr__(self, "description", clip(self.description, MAX_DESCRIPTION))


class ModelregError(Exception):
    """Root of every domain error: a stable ``reason`` plus string metadata for clients."""

    reason: str = ErrorReason.Name(ErrorReason.MODELREG_ERROR)
    """The ``ErrorInfo.reason`` sent: always the name of a ``modelreg.v1.ErrorReason`` value."""

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason.ValueType | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE)
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = ErrorReason.Name(reason)
        self.metadata: dict[str, str] = {
            k: clip(v, MAX_METADATA_VALUE) for k, v in (metadata or {}).items()
        }


class InvalidArgumentError(ModelregError):
    """A request field is malformed, out of range or over its size limit; nothing was written."""

    reason = ErrorReason.Name(ErrorReason.INVALID_ARGUMENT)

    def __init__(
        self, violations: Sequence[FieldViolation], *, reason: ErrorReason.ValueType | None = None
    ) -> None:
        # The first few name the problem; hundreds (one per bad tag) would overflow the trailers.
        self.violations = tuple(violations)[:MAX_VIOLATIONS]
        text = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        if len(violations) > MAX_VIOLATIONS:
            text += f"; and {len(violations) - MAX_VIOLATIONS} more"
        super().__init__(
            f"invalid request: {text}",
            reason=reason,
            metadata={"field": self.violations[0].field} if self.violations else None,
        )

    @classmethod
    def field(
        cls, field: str, description: str, *, reason: ErrorReason.ValueType | None = None
    ) -> InvalidArgumentError:
        """Shorthand for a single bad field."""
        return cls([FieldViolation(field, description)], reason=reason)


class OutOfRangeError(InvalidArgumentError):
    """A well-formed value past what exists now (AIP-193 OUT_OF_RANGE); it may be valid later.

    Example: a watch ``start_revision`` beyond the store's current revision.
    """

    def __init__(
        self, field: str, description: str, *, reason: ErrorReason.ValueType, **metadata: str
    ) -> None:
        super().__init__([FieldViolation(field, description)], reason=reason)
        self.metadata.update(metadata)


class NotFoundError(ModelregError):
    """The named model, version or stage history entry does not exist."""

    reason = ErrorReason.Name(ErrorReason.NOT_FOUND)

    def __init__(self, resource: str) -> None:
        super().__init__(f"{resource} not found", metadata={"resource": resource})
        self.resource = resource


class AlreadyExistsError(ModelregError):
    """A create named something that already exists."""

    reason = ErrorReason.Name(ErrorReason.ALREADY_EXISTS)

    def __init__(self, resource: str) -> None:
        super().__init__(f"{resource} already exists", metadata={"resource": resource})
        self.resource = resource


class FailedPreconditionError(ModelregError):
    """A lifecycle rule refuses the change in the current state; ``reason`` names the rule."""

    reason = ErrorReason.Name(ErrorReason.FAILED_PRECONDITION)

    def __init__(self, rule: ErrorReason.ValueType, message: str, **metadata: str) -> None:
        super().__init__(message, reason=rule, metadata=metadata)


class AbortedError(ModelregError):
    """A concurrent change got in the way; re-read and decide again."""

    reason = ErrorReason.Name(ErrorReason.ABORTED)


class EtagMismatchError(AbortedError):
    """The caller's etag is stale: someone changed the resource since the caller read it."""

    reason = ErrorReason.Name(ErrorReason.ETAG_MISMATCH)

    def __init__(self, resource: str, given_etag: str, current_etag: str) -> None:
        super().__init__(
            f"{resource} changed: etag {echo(given_etag)} is stale, "
            f"current etag is {current_etag}",
            metadata={"resource": resource, "current_etag": current_etag},
        )
        self.resource = resource
        self.current_etag = current_etag


class ContentionError(AbortedError):
    """Other writers kept changing what this request read; it was retried and gave up."""

    reason = ErrorReason.Name(ErrorReason.CONTENTION)


class RolloutInProgressError(AbortedError):
    """A rollout of the stage is still preparing: the stage takes one move at a time.

    ABORTED, as for any concurrent change: the caller waits for the rollout named in the
    metadata to commit or abort (or cancels it) and asks again.
    """

    reason = ErrorReason.Name(ErrorReason.ROLLOUT_IN_PROGRESS)

    def __init__(self, stage: str, rollout: str, what: str) -> None:
        super().__init__(
            f"{stage} has a rollout still preparing ({rollout}): {what}; wait until it commits "
            "or aborts (WatchRollout), or cancel it (CancelRollout)",
            metadata={"stage": stage, "rollout": rollout},
        )
        self.rollout = rollout


class RolloutDoneError(FailedPreconditionError):
    """The rollout already committed or aborted, so it can no longer change."""

    def __init__(self, rollout: str, state: str) -> None:
        super().__init__(
            ErrorReason.ROLLOUT_DONE, f"{rollout} is done ({state}); it can no longer change",
            rollout=rollout, state=state,
        )
        self.rollout = rollout
        self.state = state


class UnauthenticatedError(ModelregError):
    """The caller proved no identity the server accepts; nothing was read or written.

    The message says what was missing or wrong, never the credential itself.
    """

    reason = ErrorReason.Name(ErrorReason.UNAUTHENTICATED)


class PermissionDeniedError(ModelregError):
    """The authenticated principal may not call this RPC; nothing was read or written."""

    reason = ErrorReason.Name(ErrorReason.PERMISSION_DENIED)

    def __init__(self, principal: str, method: str, permission: str) -> None:
        super().__init__(
            f"{echo(principal)} may not call {method} (needs permission {permission!r})",
            metadata={"principal": principal, "method": method, "permission": permission},
        )
        self.permission = permission


class SlowConsumerError(ModelregError):
    """A watch stream's client read too slowly and its bounded queue overflowed."""

    reason = ErrorReason.Name(ErrorReason.WATCH_TOO_SLOW)


class UnavailableError(ModelregError):
    """etcd could not be reached or did not answer in time; the request may be retried."""

    reason = ErrorReason.Name(ErrorReason.STORE_UNAVAILABLE)


class PrimaryUnavailableError(UnavailableError):
    """A server outside the primary region reached none of the primary's servers.

    Raised before anything was sent (or, for a call that carries a request id, after every
    server was tried), so nothing was written unless the message says the call was sent.
    """

    reason = ErrorReason.Name(ErrorReason.PRIMARY_UNAVAILABLE)

    def __init__(self, primary: str, servers: Sequence[str], why: str) -> None:
        super().__init__(
            f"the primary region {primary} is unreachable ({why}); mutations commit there "
            f"only, reads and watches here go on",
            metadata={"primary": primary, "servers": ",".join(servers)},
        )
        self.primary = primary


class RevisionNotYetAppliedError(UnavailableError):
    """This region had not applied the minimum revision a call asked for within its deadline."""

    reason = ErrorReason.Name(ErrorReason.REVISION_NOT_YET_APPLIED)

    def __init__(self, region: str, applied: int, wanted: int) -> None:
        super().__init__(
            f"region {region} has applied revision {applied}, not yet {wanted} "
            f"(x-modelreg-min-revision); retry, or read in the primary region",
            metadata={"region": region, "applied_revision": str(applied),
                      "min_revision": str(wanted)},
        )
        self.applied = applied


class InternalError(ModelregError):
    """A server bug: the caller gets a generic message and an id that finds the log entry.

    Raised only by the gRPC layer when a handler fails unexpectedly; the exception's own text
    may hold internals and is logged with its traceback, never sent.
    """

    reason = ErrorReason.Name(ErrorReason.INTERNAL)

    def __init__(self, error_id: str) -> None:
        super().__init__(
            f"internal error {error_id}; the server log has the details under this error_id",
            metadata={"error_id": error_id},
        )
        self.error_id = error_id
