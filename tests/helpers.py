"""Small helpers shared by the integration tests."""

from __future__ import annotations

import hashlib
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelreg.v1 import model_service_pb2 as svc
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
