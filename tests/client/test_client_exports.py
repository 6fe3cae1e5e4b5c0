"""Pin the public surface of modelreg.client: adding or removing a name is a deliberate act."""

from __future__ import annotations

import modelreg.client


class TestExports:
    def test_all_is_pinned(self) -> None:
        """__all__ lists exactly the documented public names."""
        assert sorted(modelreg.client.__all__) == sorted(
            [
                "DEFAULT_TARGET",
                "ArtifactError",
                "AsyncModelWatcher",
                "DigestMismatchError",
                "LoadedModel",
                "ThreadedModelWatcher",
                "WatcherStats",
                "AbortedError",
                "AlreadyExistsError",
                "AsyncRegistryClient",
                "AuditAction",
                "AuditEvent",
                "ClientConfig",
                "ClientState",
                "DeadlineExceededError",
                "FailedPreconditionError",
                "InvalidArgumentError",
                "Lineage",
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
                "UnauthenticatedError",
                "UnavailableError",
                "UnexpectedStatusError",
                "VersionState",
                "from_rpc_error",
            ]
        )

    def test_every_export_resolves(self) -> None:
        """Every name in __all__ is an attribute of the package."""
        for name in modelreg.client.__all__:
            assert getattr(modelreg.client, name) is not None

    def test_no_private_module_leaks(self) -> None:
        """Public names are defined in public places, never exposed as private modules."""
        public = {n for n in vars(modelreg.client) if not n.startswith("_")}
        assert public - set(modelreg.client.__all__) <= {
            "errors",
            "cli",
            "annotations",
            "artifacts",
            "watcher",
        }
