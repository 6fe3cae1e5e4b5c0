"""``modelreg.v1.ModelService``: each handler builds the call context and calls the domain.

Validation, rules and storage live in ``modelreg.server.domain``; identity, error mapping,
logging and metrics in the interceptor of ``modelreg.server.api.grpc``. A handler here is one
line.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

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

    async def CreateModel(  # noqa: D102
        self, request: svc.CreateModelRequest, context: Context
    ) -> svc.CreateModelResponse:
        return await self._r.models.create(_call("CreateModel", request), request)

    async def GetModel(  # noqa: D102
        self, request: svc.GetModelRequest, context: Context
    ) -> svc.GetModelResponse:
        return await self._r.models.get(request)

    async def ListModels(  # noqa: D102
        self, request: svc.ListModelsRequest, context: Context
    ) -> svc.ListModelsResponse:
        return await self._r.models.list(request)

    async def UpdateModel(  # noqa: D102
        self, request: svc.UpdateModelRequest, context: Context
    ) -> svc.UpdateModelResponse:
        return await self._r.models.update(_call("UpdateModel", request), request)

    async def DeleteModel(  # noqa: D102
        self, request: svc.DeleteModelRequest, context: Context
    ) -> svc.DeleteModelResponse:
        return await self._r.models.delete(_call("DeleteModel", request), request)

    async def CreateModelVersion(  # noqa: D102
        self, request: svc.CreateModelVersionRequest, context: Context
    ) -> svc.CreateModelVersionResponse:
        return await self._r.versions.create(
            _call("CreateModelVersion", request), request
        )

    async def GetModelVersion(  # noqa: D102
        self, request: svc.GetModelVersionRequest, context: Context
    ) -> svc.GetModelVersionResponse:
        return await self._r.versions.get(request)

    async def ListModelVersions(  # noqa: D102
        self, request: svc.ListModelVersionsRequest, context: Context
    ) -> svc.ListModelVersionsResponse:
        return await self._r.versions.list(request)

    async def UpdateModelVersion(  # noqa: D102
        self, request: svc.UpdateModelVersionRequest, context: Context
    ) -> svc.UpdateModelVersionResponse:
        return await self._r.versions.update(
            _call("UpdateModelVersion", request), request
        )

    async def GetStage(  # noqa: D102
        self, request: svc.GetStageRequest, context: Context
    ) -> svc.GetStageResponse:
        return await self._r.stages.get(request)

    async def ListStages(  # noqa: D102
        self, request: svc.ListStagesRequest, context: Context
    ) -> svc.ListStagesResponse:
        return await self._r.stages.list(request)

    async def PromoteVersion(  # noqa: D102
        self, request: svc.PromoteVersionRequest, context: Context
    ) -> svc.PromoteVersionResponse:
        return await self._r.stages.promote(_call("PromoteVersion", request), request)

    async def RollbackStage(  # noqa: D102
        self, request: svc.RollbackStageRequest, context: Context
    ) -> svc.RollbackStageResponse:
        return await self._r.stages.rollback(_call("RollbackStage", request), request)

    async def ClearStage(  # noqa: D102
        self, request: svc.ClearStageRequest, context: Context
    ) -> svc.ClearStageResponse:
        return await self._r.stages.clear(_call(context, "ClearStage", request), request)

    async def ListStageHistory(  # noqa: D102
        self, request: svc.ListStageHistoryRequest, context: Context
    ) -> svc.ListStageHistoryResponse:
        return await self._r.stages.history(request)

    async def ListAuditEvents(  # noqa: D102
        self, request: svc.ListAuditEventsRequest, context: Context
    ) -> svc.ListAuditEventsResponse:
        return await self._r.audit.list(request)
