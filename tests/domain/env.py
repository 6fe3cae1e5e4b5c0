"""The domain tests' world: a registry over a fresh in-memory store, a fake clock, shorthands.

Pure domain unit tests only: the proof that a feature works runs against real etcd.
"""

from __future__ import annotations

import hashlib

from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from modelreg.server.domain.errors import (
    InvalidArgumentError,
)
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.transaction import Call
from modelreg.server.store.memory import MemoryStore
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res

SERVICE = "/modelreg.v1.ModelService/"
MODEL = "fraud"
T0 = 1_700_000_000_000_000_000
VS = res.VersionState


class FakeClock:
    """Unix nanoseconds that advance one second per reading."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1_000_000_000
        return self.now


def digest(n: int) -> str:
    """A valid lowercase sha256 for artifact ``n``."""
    return hashlib.sha256(f"artifact-{n}".encode()).hexdigest()


def version_fields(n: int = 1) -> res.ModelVersion:
    """The immutable fields of a valid version to register."""
    return res.ModelVersion(
        artifact_uri=f"file:///models/fraud/{n}.bin", sha256=digest(n), size_bytes=1000 + n
    )


class Env:
    """A registry over a fresh MemoryStore, with shorthands for the calls tests make."""

    def __init__(self, *, clock: FakeClock | None = None, default_clock: bool = False) -> None:
        self.store = MemoryStore()
        self.clock = clock or FakeClock()
        self.reg = (
            Registry.over(self.store) if default_clock else Registry.over(self.store, self.clock)
        )

    @staticmethod
    def call(method: str, request: Message, actor: str = "alice") -> Call:
        return Call(actor=actor, method=SERVICE + method, request=request)

    async def create_model(
        self, model_id: str = MODEL, *, custom_stages: tuple[str, ...] = (), actor: str = "alice"
    ) -> res.RegisteredModel:
        req = svc.CreateModelRequest(
            model_id=model_id, model=res.RegisteredModel(custom_stages=custom_stages)
        )
        return (await self.reg.models.create(self.call("CreateModel", req, actor), req)).model

    async def create_version(
        self, model_id: str = MODEL, n: int = 1, *, actor: str = "alice"
    ) -> res.ModelVersion:
        req = svc.CreateModelVersionRequest(
            parent=f"models/{model_id}", model_version=version_fields(n)
        )
        resp = await self.reg.versions.create(self.call("CreateModelVersion", req, actor), req)
        return resp.model_version

    async def setup(self, versions: int, *, custom_stages: tuple[str, ...] = ()) -> None:
        """The model ``fraud`` with versions 1..``versions`` registered."""
        await self.create_model(custom_stages=custom_stages)
        for n in range(1, versions + 1):
            await self.create_version(n=n)

    async def promote(
        self,
        stage: str,
        version: int,
        *,
        model_id: str = MODEL,
        hotfix: bool = False,
        reason: str = "",
        etag: str = "",
        actor: str = "alice",
    ) -> svc.PromoteVersionResponse:
        req = svc.PromoteVersionRequest(
            name=f"models/{model_id}/stages/{stage}", version=version, hotfix=hotfix,
            reason=reason, etag=etag,
        )
        return await self.reg.stages.promote(self.call("PromoteVersion", req, actor), req)

    async def to_production(self, version: int) -> svc.PromoteVersionResponse:
        """The regular path: staging, then production."""
        await self.promote("staging", version)
        return await self.promote("production", version)

    async def rollback(
        self, stage: str = "production", to_version: int = 0, *, actor: str = "alice"
    ) -> svc.RollbackStageResponse:
        req = svc.RollbackStageRequest(
            name=f"models/{MODEL}/stages/{stage}", to_version=to_version, reason="bad p99"
        )
        return await self.reg.stages.rollback(self.call("RollbackStage", req, actor), req)

    async def version(self, number: int, model_id: str = MODEL) -> res.ModelVersion:
        req = svc.GetModelVersionRequest(name=f"models/{model_id}/versions/{number}")
        return (await self.reg.versions.get(req)).model_version

    async def stage(self, stage: str) -> res.StagePointer:
        req = svc.GetStageRequest(name=f"models/{MODEL}/stages/{stage}")
        return (await self.reg.stages.get(req)).stage

    async def model(self, model_id: str = MODEL) -> res.RegisteredModel:
        return (await self.reg.models.get(svc.GetModelRequest(name=f"models/{model_id}"))).model

    async def update_version(
        self, number: int, paths: list[str], **fields: object
    ) -> svc.UpdateModelVersionResponse:
        mv = res.ModelVersion(name=f"models/{MODEL}/versions/{number}", **fields)  # type: ignore[arg-type]
        req = svc.UpdateModelVersionRequest(
            model_version=mv, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return await self.reg.versions.update(self.call("UpdateModelVersion", req), req)

    async def deprecate(self, number: int) -> svc.UpdateModelVersionResponse:
        return await self.update_version(
            number, ["sunset_time"], sunset_time=timestamp_pb2.Timestamp(seconds=1_900_000_000)
        )

    async def audit(self, **filters: object) -> list[res.AuditEvent]:
        req = svc.ListAuditEventsRequest(page_size=1000, **filters)  # type: ignore[arg-type]
        return list((await self.reg.audit.list(req)).audit_events)


def field_of(err: InvalidArgumentError) -> str:
    """The (first) field an InvalidArgumentError names, as sent in ErrorInfo metadata."""
    assert err.metadata["field"] == err.violations[0].field
    return err.violations[0].field
