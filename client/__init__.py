"""Typed Python clients of the modelreg registry, sync and asyncio.

Example::

    from modelreg.client import RegistryClient

    with RegistryClient() as client:  # $MODELREG_TARGET, else 127.0.0.1:50051
        v = client.create_version("fraud-detector", artifact_uri=uri, sha256=digest, size_bytes=n)
        client.promote("fraud-detector", "staging", v.model_version.version, reason="nightly")
"""

from modelreg.client._async_client import AsyncRegistryClient
from modelreg.client._channel import ClientState
from modelreg.client._config import DEFAULT_TARGET, ClientConfig, RetryPolicy
from modelreg.client._sync_client import RegistryClient
from modelreg.client.artifacts import ArtifactError, DigestMismatchError
from modelreg.client.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RegistryError,
    UnauthenticatedError,
    UnavailableError,
    UnexpectedStatusError,
    from_rpc_error,
)
from modelreg.client.watcher import (
    AsyncModelWatcher,
    LoadedModel,
    ThreadedModelWatcher,
    WatcherStats,
)
from modelreg.v1.resources_pb2 import (
    AuditAction,
    AuditEvent,
    Lineage,
    ModelVersion,
    PointerHistoryEntry,
    PointerMoveKind,
    RegisteredModel,
    StagePointer,
    VersionState,
)

__all__ = [
    "DEFAULT_TARGET",
    "AbortedError",
    "AlreadyExistsError",
    "ArtifactError",
    "AsyncModelWatcher",
    "AsyncRegistryClient",
    "AuditAction",
    "AuditEvent",
    "ClientConfig",
    "ClientState",
    "DeadlineExceededError",
    "DigestMismatchError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "Lineage",
    "LoadedModel",
    "ModelVersion",
    "NotFoundError",
    "PermissionDeniedError",
    "PointerHistoryEntry",
    "PointerMoveKind",
    "RegisteredModel",
    "RegistryClient",
    "RegistryError",
    "RetryPolicy",
    "StagePointer",
    "ThreadedModelWatcher",
    "UnauthenticatedError",
    "UnavailableError",
    "UnexpectedStatusError",
    "VersionState",
    "WatcherStats",
    "from_rpc_error",
]
