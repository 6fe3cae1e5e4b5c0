"""``modelreg.v1.RolloutService``: the thin face of ``modelreg.server.domain.rollouts``.

Reads are answered from the server's region; CancelRollout is a mutation, forwarded to the
primary by the interceptor outside the primary region (``forward.FORWARDED``). Errors become
statuses in the server's one interceptor (``modelreg.server.api.grpc``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from typing_extensions import override

from modelreg.server.api import identity
from modelreg.server.domain.rollouts import Rollouts
from modelreg.server.domain.transaction import Call
from modelreg.v1 import rollout_service_pb2 as rs
from modelreg.v1 import rollout_service_pb2_grpc

SERVICE = "modelreg.v1.RolloutService"


class RolloutServicer(rollout_service_pb2_grpc.RolloutServiceServicer):
    """Get, list, watch and cancel rollouts."""

    def __init__(self, rollouts: Rollouts, *, watch_interval: float = 0.1) -> None:
        self._rollouts = rollouts
        self._watch_interval = watch_interval

    @override
    async def GetRollout(
        self, request: rs.GetRolloutRequest, context: Any
    ) -> rs.GetRolloutResponse:
        return await self._rollouts.get(request)

    @override
    async def ListRollouts(
        self, request: rs.ListRolloutsRequest, context: Any
    ) -> rs.ListRolloutsResponse:
        return await self._rollouts.list(request)

    @override
    async def WatchRollout(
        self, request: rs.WatchRolloutRequest, context: Any
    ) -> AsyncIterator[rs.WatchRolloutResponse]:
        async for message in self._rollouts.watch(request, interval=self._watch_interval):
            yield message

    @override
    async def CancelRollout(
        self, request: rs.CancelRolloutRequest, context: Any
    ) -> rs.CancelRolloutResponse:
        # The interceptor authenticated the caller before this handler ran.
        call = Call(actor=identity.principal().name, method=f"/{SERVICE}/CancelRollout",
                    request=request)
        return await self._rollouts.cancel(call, request)
