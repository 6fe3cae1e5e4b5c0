"""``modelreg up`` recovers from crashes by itself: its own (SIGKILL) and its etcd child's.

Each test runs the installed ``modelreg up`` as a child process on free ports and a temp data
dir, writes through a real gRPC client, and ends every process it started (``UpProcess.close``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import ActorStub
from tests.up_process import UpProcess, alive, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and prctl"),
]

Start = Callable[..., UpProcess]


@pytest.fixture
def start_up() -> Iterator[Start]:
    """Starts ``modelreg up`` processes; all of them, and their etcd, end at teardown."""
    started: list[UpProcess] = []

    def start(data_dir: Path, **kw: object) -> UpProcess:
        started.append(up := UpProcess(data_dir, **kw))  # type: ignore[arg-type]
        return up

    try:
        yield start
    finally:
        for up in started:
            up.close()


async def _create(stub: ActorStub, model_id: str) -> None:
    await stub.CreateModel(svc.CreateModelRequest(
        model_id=model_id, model=res.RegisteredModel(description="x")), timeout=5)


async def _missing(target: str, model_ids: list[str]) -> list[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ActorStub(channel, "alice")
        missing = []
        for model_id in model_ids:
            try:
                await stub.GetModel(svc.GetModelRequest(name=f"models/{model_id}"))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                missing.append(model_id)
        return missing


def _get(host_port: str) -> str:
    with urllib.request.urlopen(f"http://{host_port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


class TestUpCrash:
    async def test_sigkilled_up_comes_back_with_every_acknowledged_write(
        self, tmp_path: Path, start_up: Start
    ) -> None:
        """A `modelreg up` SIGKILLed while a client writes takes its etcd with it, and a new one
        on the same data dir serves every write acknowledged before the crash.
        """
        first = start_up(tmp_path / "data")
        await first.wait_serving()
        old_etcd = first.etcd_pid()
        assert old_etcd is not None
        written: list[str] = []

        async def writer(stub: ActorStub) -> None:
            while True:
                model_id = f"model-{len(written)}"
                await _create(stub, model_id)
                written.append(model_id)

        async with grpc.aio.insecure_channel(first.target) as channel:
            task = asyncio.create_task(writer(ActorStub(channel, "alice")))
            await wait_for(lambda: len(written) >= 20 or task.done(), what="20 writes")
            assert not task.done(), task
            first.kill()
            with pytest.raises(grpc.aio.AioRpcError):
                await task
        await wait_for(lambda: not alive(old_etcd), what="etcd gone with its parent")

        second = start_up(tmp_path / "data", etcd_port=first.etcd_port)
        await second.wait_serving()
        assert "etcd_stale_stopped" not in second.logs()
        missing = await _missing(second.target, written)
        # Seen once with six test runs sharing two cores; the logs say which start lost what.
        assert missing == [], (missing, len(written), first.logs()[-4000:], second.logs()[-4000:])


class TestEtcdSupervision:
    async def test_killed_etcd_is_restarted_and_serving_resumes(
        self, tmp_path: Path, start_up: Start
    ) -> None:
        """SIGKILLing the etcd child of a running `modelreg up` gets it restarted on the same
        data: health returns to SERVING, the data is there, and logs and metrics count it.
        """
        up = start_up(tmp_path / "data", metrics=True)
        await up.wait_serving()
        async with grpc.aio.insecure_channel(up.target) as channel:
            await _create(ActorStub(channel, "alice"), "before-crash")
        old_etcd = up.etcd_pid()
        assert old_etcd is not None

        os.kill(old_etcd, signal.SIGKILL)
        await wait_for(lambda: up.etcd_pid() not in (None, old_etcd), what="a new etcd")
        await up.wait_serving()
        assert await up.health() == health_pb2.HealthCheckResponse.SERVING
        assert await _missing(up.target, ["before-crash"]) == []
        async with grpc.aio.insecure_channel(up.target) as channel:
            await _create(ActorStub(channel, "alice"), "after-crash")

        logs = up.logs()
        assert '"exit_code": -9' in logs and '"event": "etcd_exited"' in logs
        assert '"event": "etcd_restarted"' in logs
        assert '"etcd_version": "3.' in logs  # the release is logged, and its known bugs
        assert "modelreg_etcd_restarts_total 1.0" in await asyncio.to_thread(_get, up.metrics)
