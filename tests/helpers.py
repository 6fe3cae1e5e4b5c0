"""Helpers shared by the tests: fixtures' building blocks, servers, stubs, models."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelreg.server.app import App
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
    """A started modelreg server and what tests need to talk to it."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.store = app.store
        self.hub = app.hub
        self.target = f"127.0.0.1:{app.port}"

    async def stop(self) -> None:
        """Stop serving, the stage hub and the etcd connection."""
        await self.app.stop()


async def start_server(
    endpoint: str, prefix: str, *, etcd_timeout: float = 2.0, listen: str = "127.0.0.1:0",
    bookmark_interval: float = 10.0, watch_queue: int = 256,
) -> RunningServer:
    """Start a modelreg server over etcd at ``endpoint`` under ``prefix``."""
    app = await App.start([endpoint], prefix, listen, etcd_timeout=etcd_timeout,
                          bookmark_interval=bookmark_interval, watch_queue=watch_queue)
    await app.set_serving(True)
    return RunningServer(app)


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
