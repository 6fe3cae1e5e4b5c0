"""``modelreg.v1.RegionService``: the thin face of the region view (``domain.regions``).

Errors become statuses in the server's one interceptor (``modelreg.server.api.grpc``).
"""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from modelreg.server.domain.regions import Regions
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1 import region_service_pb2_grpc


class RegionServicer(region_service_pb2_grpc.RegionServiceServicer):
    """The topology and this server's region's health."""

    def __init__(self, regions: Regions) -> None:
        self._regions = regions

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
