"""Helpers shared by the tests: fixtures' building blocks, servers, stubs, models."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelreg.server.app import App
from modelreg.server.config import ServerConfig
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.identity import Authenticator, Authorizer
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import model_service_pb2_grpc
from modelreg.v1 import resources_pb2 as res

MODEL = "fraud-detector"
PARENT = f"models/{MODEL}"


@pytest.fixture(scope="session", name="etcd_server")
def on_each_etcd_build(etcd_each_build: Any) -> Any:
    """Imported by a test module, runs each of its tests once per etcd build (3.5, 3.4)."""
    return etcd_each_build


def digest(seed: str) -> str:
    """A valid sha256 hex digest derived from ``seed``."""
    return hashlib.sha256(seed.encode()).hexdigest()


def version_message(seed: str = "v", **fields: Any) -> res.ModelVersion:
    """A valid model version to register."""
    base: dict[str, Any] = {
        "artifact_uri": f"file:///models/{seed}.bin",
        "sha256": digest(seed),
        "size_bytes": 1234,
        "framework": "sklearn",
        "metrics": {"auc": 0.91},
        "lineage": res.Lineage(training_run="run-1", code_commit="abc123"),
    }
    base.update(fields)
    return res.ModelVersion(**base)


def stage(stage_id: str, model: str = MODEL) -> str:
    """Resource name of a stage."""
    return f"models/{model}/stages/{stage_id}"


async def make_model(stub: Any, model: str = MODEL, versions: int = 0, **kw: Any) -> None:
    """Create a model and register ``versions`` versions of it."""
    await stub.CreateModel(svc.CreateModelRequest(model_id=model, model=res.RegisteredModel(**kw)))
    for i in range(versions):
        await stub.CreateModelVersion(svc.CreateModelVersionRequest(
            parent=f"models/{model}", model_version=version_message(f"{model}-{i + 1}")))


def error_info(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str], list[str]]:
    """The ErrorInfo reason and metadata and the BadRequest fields of a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    reason, metadata, fields = "", {}, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
            assert info.domain == "modelreg.dev"
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, metadata, fields


# ----- servers and stubs ------------------------------------------------------------------


class RunningServer:
    """A started modelreg server and what tests need to talk to it.

    The app runs in a task of its own, entered and left there as ``modelreg serve`` does
    (``async with App.from_config(...)``), so a fixture may start it and a test stop it.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self, started: asyncio.Future[None]) -> None:
        async with self.app:
            started.set_result(None)
            await self._stop.wait()

    async def start(self) -> RunningServer:
        """Starts the app; raises what its start raised."""
        started = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(started), name="test-server")
        await asyncio.wait([started, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            self._task.result()  # the start failed: raise its error
        self.store = self.app.store
        self.hub = self.app.hub
        self.target = f"127.0.0.1:{self.app.port}"
        return self

    async def stop(self) -> None:
        """Stop serving, the stage hub and the etcd connection."""
        self._stop.set()
        if self._task is not None:
            await self._task


def server_config(endpoint: str, prefix: str, **settings: Any) -> ServerConfig:
    """A test server's config: etcd at ``endpoint``, port 0, no metrics endpoint, no grace.

    No rollout coordinator either (``coordinator="auto"`` or ``"on"`` runs one): it commits and
    aborts rollouts on its own clock, which tests of anything else must not race against
    (``tests/server/test_rollout_coordinator.py`` runs it).
    """
    base: dict[str, Any] = {"etcd": (endpoint,), "prefix": prefix, "listen": "127.0.0.1:0",
                            "etcd_timeout": 2.0, "metrics_listen": "", "grace": 0.0,
                            "coordinator": "off"}
    return ServerConfig(**{**base, **settings})


async def start_server(
    endpoint: str, prefix: str, *, authenticator: Authenticator | None = None,
    authorizer: Authorizer | None = None, **settings: Any,
) -> RunningServer:
    """Start a modelreg server over etcd at ``endpoint`` under ``prefix``.

    ``settings`` are ``ServerConfig`` fields (``listen``, ``etcd_timeout``, ``watch_queue``,
    ...); the identity seam's defaults may be replaced.
    """
    app = App.from_config(server_config(endpoint, prefix, **settings),
                          authenticator=authenticator, authorizer=authorizer)
    return await RunningServer(app).start()


class ActorStub(model_service_pb2_grpc.ModelServiceStub):
    """The generated stub with the actor header on every call."""

    def __init__(self, channel: grpc.aio.Channel, actor: str) -> None:
        super().__init__(channel)
        for name in dir(self):
            method = getattr(self, name)
            if not name.startswith("_") and callable(method):
                setattr(self, name, _with_actor(method, actor))


def _with_actor(method: Any, actor: str) -> Any:
    def call(request: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("metadata", (("x-modelreg-actor", actor),))
        kwargs.setdefault("timeout", 10)
        return method(request, **kwargs)

    return call


# ----- a toy model for the hot-swap tests ------------------------------------------------------


class Toy:
    """A model that is built in steps, so a half-loaded one would be visible."""

    def __init__(self) -> None:
        self.complete = False
        self.version = 0
        self.weights: list[int] = []


def load_toy(path: Path) -> Toy:
    """Parse ``version:N`` plus padding, slowly, filling the object step by step."""
    toy = Toy()
    text = path.read_text()
    toy.version = int(text.split("\n", 1)[0].split(":")[1])
    for i in range(50):
        toy.weights.append(toy.version * i)
        if i % 10 == 0:
            time.sleep(0.001)
    toy.complete = True
    return toy


async def register(stub, directory: Path, n: int) -> Path:
    """Write artifact n and register it as version n."""
    path = directory / f"toy-{n}.txt"
    path.write_text(f"version:{n}\n" + "#" * 1000)
    data = path.read_bytes()
    created = await stub.CreateModelVersion(svc.CreateModelVersionRequest(
        parent=f"models/{MODEL}", model_version=res.ModelVersion(
            artifact_uri=path.as_uri(), sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data))))
    assert created.model_version.version == n
    return path


async def reset_under_watches(
    proxy: Any, ready: Callable[[], Awaitable[object]],
    watch: Callable[[], AsyncIterator[object]], rounds: int = 40,
) -> None:
    """``rounds`` times: once ``ready()`` answers through ``proxy`` (a ``LatencyProxy``), a
    watch from ``watch()`` is followed and the proxy resets its connection a few probe
    intervals later, at a random moment. Each watch must end with ``UnavailableError``, what
    the stage hub retries on: not with the error of a progress request written to the stream
    as it ended (grpc.aio's ``InvalidStateError``, or INTERNAL), which used to replace it and
    end the hub.
    """
    rng = random.Random(rounds)
    for _ in range(rounds):
        async with asyncio.timeout(30):  # the channel reconnects after the last heal
            while True:
                try:
                    await ready()
                    break
                except UnavailableError:
                    await asyncio.sleep(0.02)

        async def follow() -> None:
            async for _ in watch():
                pass

        reader = asyncio.ensure_future(follow())
        await asyncio.sleep(rng.uniform(0.03, 0.12))
        proxy.cut("reset")
        try:
            async with asyncio.timeout(15):
                with pytest.raises(UnavailableError):
                    await reader
        finally:
            reader.cancel()
            proxy.heal()
