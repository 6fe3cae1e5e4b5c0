"""``modelreg.v1.FleetService``: the thin face of the fleet (node reports and the views).

Validation and rules live in ``modelreg.server.domain.fleet``; errors become statuses in the
server's one interceptor (``modelreg.server.api.grpc``).
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from modelreg.server.domain.fleet import Fleet
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc


class FleetServicer(fleet_service_pb2_grpc.FleetServiceServicer):
    """Node reports and the fleet view."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    @override
    async def ReportNode(
        self, request: fs.ReportNodeRequest, context: Any
    ) -> fs.ReportNodeResponse:
        return await self._fleet.report(request)

    @override
    async def DeleteNode(
        self, request: fs.DeleteNodeRequest, context: Any
    ) -> fs.DeleteNodeResponse:
        return await self._fleet.delete(request)

    @override
    async def ListNodes(
        self, request: fs.ListNodesRequest, context: Any
    ) -> fs.ListNodesResponse:
        return await self._fleet.list(request)

    @override
    async def GetRolloutStatus(
        self, request: fs.GetRolloutStatusRequest, context: Any
    ) -> fs.GetRolloutStatusResponse:
        return await self._fleet.rollout(request)

    @override
    async def GetRegionReadiness(
        self, request: fs.GetRegionReadinessRequest, context: Any
    ) -> fs.GetRegionReadinessResponse:
        return await self._fleet.readiness(request)

    @override
    async def GetRegionHealth(
        self, request: fs.GetRegionHealthRequest, context: Any
    ) -> fs.GetRegionHealthResponse:
        return await self._fleet.health(request)
