"""``modelreg.v1.RegionService``: the thin face of the region view and of break glass.

The region view is ``domain.regions``, break glass ``domain.pins``.

Errors become statuses in the server's one interceptor (``modelreg.server.api.grpc``).
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from modelreg.server.api import identity
from modelreg.server.domain.pins import Pins
from modelreg.server.domain.regions import Regions
from modelreg.server.domain.transaction import Call
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1 import region_service_pb2_grpc

SERVICE = "modelreg.v1.RegionService"


def _call(method: str, request: Any) -> Call:
    return Call(actor=identity.principal().name, method=f"/{SERVICE}/{method}", request=request)


class RegionServicer(region_service_pb2_grpc.RegionServiceServicer):
    """The topology, this server's region's health, and break glass in it."""

    def __init__(self, regions: Regions, pins: Pins) -> None:
        self._regions = regions
        self._pins = pins

    @override
    async def ListRegions(
        self, request: rs.ListRegionsRequest, context: Any
    ) -> rs.ListRegionsResponse:
        return await self._regions.list(request)

    @override
    async def GetRegionStatus(
        self, request: rs.GetRegionStatusRequest, context: Any
    ) -> rs.GetRegionStatusResponse:
        return await self._regions.status(request)

    @override
    async def PinStage(self, request: rs.PinStageRequest, context: Any) -> rs.PinStageResponse:
        return await self._pins.pin(_call("PinStage", request), request)

    @override
    async def UnpinStage(
        self, request: rs.UnpinStageRequest, context: Any
    ) -> rs.UnpinStageResponse:
        return await self._pins.unpin(_call("UnpinStage", request), request)

    @override
    async def ReportBreakGlass(
        self, request: rs.ReportBreakGlassRequest, context: Any
    ) -> rs.ReportBreakGlassResponse:
        return await self._pins.report(_call("ReportBreakGlass", request), request)
