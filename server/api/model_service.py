"""``modelreg.v1.ModelService``: each handler builds the call context and calls the domain.

Validation, rules and storage live in ``modelreg.server.domain``; identity, error mapping,
logging and metrics in the interceptor of ``modelreg.server.api.grpc``. A handler here is one
line.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message
from typing_extensions import override

from modelreg.server.api import identity
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.transaction import Call
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import model_service_pb2_grpc

SERVICE = "modelreg.v1.ModelService"
Context = grpc.aio.ServicerContext[Message, Message]


def _call(method: str, request: Message) -> Call:
    # The interceptor authenticated the caller before this handler ran.
    return Call(actor=identity.principal().name, method=f"/{SERVICE}/{method}", request=request)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """Thin gRPC face of ``Registry``."""

    def __init__(self, registry: Registry) -> None:
        self._r = registry

    @override
    async def CreateModel(
        self, request: svc.CreateModelRequest, context: Context
    ) -> svc.CreateModelResponse:
        return await self._r.models.create(_call("CreateModel", request), request)

    @override
    async def GetModel(
        self, request: svc.GetModelRequest, context: Context
    ) -> svc.GetModelResponse:
        return await self._r.models.get(request)

    @override
    async def ListModels(
        self, request: svc.ListModelsRequest, context: Context
    ) -> svc.ListModelsResponse:
        return await self._r.models.list(request)

    @override
    async def UpdateModel(
        self, request: svc.UpdateModelRequest, context: Context
    ) -> svc.UpdateModelResponse:
        return await self._r.models.update(_call("UpdateModel", request), request)

    @override
    async def DeleteModel(
        self, request: svc.DeleteModelRequest, context: Context
    ) -> svc.DeleteModelResponse:
        return await self._r.models.delete(_call("DeleteModel", request), request)

    @override
    async def CreateModelVersion(
        self, request: svc.CreateModelVersionRequest, context: Context
    ) -> svc.CreateModelVersionResponse:
        return await self._r.versions.create(
            _call("CreateModelVersion", request), request
        )

    @override
    async def GetModelVersion(
        self, request: svc.GetModelVersionRequest, context: Context
    ) -> svc.GetModelVersionResponse:
        return await self._r.versions.get(request)

    @override
    async def ListModelVersions(
        self, request: svc.ListModelVersionsRequest, context: Context
    ) -> svc.ListModelVersionsResponse:
        return await self._r.versions.list(request)

    @override
    async def UpdateModelVersion(
        self, request: svc.UpdateModelVersionRequest, context: Context
    ) -> svc.UpdateModelVersionResponse:
        return await self._r.versions.update(
            _call("UpdateModelVersion", request), request
        )

    @override
    async def GetStage(
        self, request: svc.GetStageRequest, context: Context
    ) -> svc.GetStageResponse:
        return await self._r.stages.get(request)

    @override
    async def ListStages(
        self, request: svc.ListStagesRequest, context: Context
    ) -> svc.ListStagesResponse:
        return await self._r.stages.list(request)

    @override
    async def PromoteVersion(
        self, request: svc.PromoteVersionRequest, context: Context
    ) -> svc.PromoteVersionResponse:
        return await self._r.stages.promote(_call("PromoteVersion", request), request)

    @override
    async def RollbackStage(
        self, request: svc.RollbackStageRequest, context: Context
    ) -> svc.RollbackStageResponse:
        return await self._r.stages.rollback(_call("RollbackStage", request), request)

    @override
    async def ClearStage(
        self, request: svc.ClearStageRequest, context: Context
    ) -> svc.ClearStageResponse:
        return await self._r.stages.clear(_call("ClearStage", request), request)

    @override
    async def ListStageHistory(
        self, request: svc.ListStageHistoryRequest, context: Context
    ) -> svc.ListStageHistoryResponse:
        return await self._r.stages.history(request)

    @override
    async def ListAuditEvents(
        self, request: svc.ListAuditEventsRequest, context: Context
    ) -> svc.ListAuditEventsResponse:
        return await self._r.audit.list(request)
