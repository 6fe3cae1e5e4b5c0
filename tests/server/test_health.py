"""The app's health loop: gRPC health follows etcd, NOT_SERVING while it is gone, SERVING back."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from modelreg.server.embedded_etcd import EmbeddedEtcd
from tests.helpers import start_server
from tests.up_process import health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _until(target: str, status: int, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (seen := await health(target)) != status:
        assert asyncio.get_running_loop().time() < deadline, f"health stayed {seen}"
        await asyncio.sleep(0.05)


class TestHealthLoop:
    async def test_health_follows_etcd_down_and_back(self, own_etcd: EmbeddedEtcd) -> None:
        """Health says SERVING once etcd answers, NOT_SERVING after etcd is stopped, and
        SERVING again once it is back: the app's own loop, with no one setting it by hand.
        """
        running = await start_server(own_etcd.endpoint, "/health/", etcd_timeout=1.0,
                                     health_interval=0.1)
        try:
            await _until(running.target, SERVING)
            own_etcd.stop()
            await _until(running.target, NOT_SERVING)
            own_etcd.start()
            await _until(running.target, SERVING)
        finally:
            await running.stop()
