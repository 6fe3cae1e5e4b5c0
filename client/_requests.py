"""Resource names and request messages built from the clients' keyword arguments.

Every function here is pure, so each client method is "build the request, send it" and the
sync and asyncio clients cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from google.protobuf import field_mask_pb2, timestamp_pb2

from modelreg.client._common import new_request_id
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as pb
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws


def model_name(model: str) -> str:
    """Return ``models/{model}`` for a model id or a full model name."""
    return model if model.startswith("models/") else f"models/{model}"


def model_id(model: str) -> str:
    """Return the bare model id of a model id or a full model name."""
    return model.removeprefix("models/").split("/", 1)[0]


def version_name(model: str, version: int) -> str:
    """Return ``models/{model}/versions/{version}``."""
    return f"{model_name(model)}/versions/{int(version)}"


def stage_name(model: str, stage: str) -> str:
    """Return ``models/{model}/stages/{stage}``; a full stage name is passed through."""
    if stage.startswith("models/"):
        return stage
    return f"{model_name(model)}/stages/{stage}"


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """Convert a datetime to a Timestamp; a naive datetime is taken as local time."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo is not None else value.astimezone())
    return ts


def create_model(
    model: str,
    *,
    description: str,
    tags: Mapping[str, str] | None,
    custom_stages: Sequence[str] | None,
    request_id: str | None,
) -> pb.CreateModelRequest:
    """Build a CreateModelRequest."""
    return pb.CreateModelRequest(
        model_id=model_id(model),
        model=res.RegisteredModel(
            description=description, tags=dict(tags or {}), custom_stages=list(custom_stages or [])
        ),
        request_id=new_request_id(request_id),
    )


def update_model(
    model: str,
    *,
    description: str | None,
    tags: Mapping[str, str] | None,
    custom_stages: Sequence[str] | None,
    etag: str | None,
    request_id: str | None,
) -> pb.UpdateModelRequest:
    """Build an UpdateModelRequest; update_mask names the arguments that are not None."""
    msg = res.RegisteredModel(name=model_name(model), etag=etag or "")
    paths: list[str] = []
    if description is not None:
        msg.description = description
        paths.append("description")
    if tags is not None:
        msg.tags.update(tags)
        paths.append("tags")
    if custom_stages is not None:
        msg.custom_stages.extend(custom_stages)
        paths.append("custom_stages")
    if not paths:
        raise ValueError("update_model needs at least one of description, tags, custom_stages")
    return pb.UpdateModelRequest(
        model=msg,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        request_id=new_request_id(request_id),
    )


def create_version(
    model: str,
    *,
    artifact_uri: str,
    sha256: str,
    size_bytes: int,
    framework: str,
    signature: str,
    metrics: Mapping[str, float] | None,
    params: Mapping[str, str] | None,
    lineage: res.Lineage | Mapping[str, str] | None,
    model_card: str,
    description: str,
    tags: Mapping[str, str] | None,
    request_id: str | None,
) -> pb.CreateModelVersionRequest:
    """Build a CreateModelVersionRequest; ``lineage`` may be a Lineage or a dict."""
    if lineage is None:
        lineage_msg = res.Lineage()
    elif isinstance(lineage, res.Lineage):
        lineage_msg = lineage
    else:
        lineage_msg = res.Lineage(**dict(lineage))
    version = res.ModelVersion(
        artifact_uri=artifact_uri,
        sha256=sha256,
        size_bytes=size_bytes,
        framework=framework,
        signature=signature,
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        params=dict(params or {}),
        lineage=lineage_msg,
        model_card=model_card,
        description=description,
        tags=dict(tags or {}),
    )
    return pb.CreateModelVersionRequest(
        parent=model_name(model), model_version=version, request_id=new_request_id(request_id)
    )


def update_version(
    model: str,
    version: int,
    *,
    description: str | None,
    tags: Mapping[str, str] | None,
    sunset_time: datetime | None,
    clear_sunset_time: bool,
    etag: str | None,
    request_id: str | None,
) -> pb.UpdateModelVersionRequest:
    """Build an UpdateModelVersionRequest; update_mask names the arguments not None."""
    msg = res.ModelVersion(name=version_name(model, version), etag=etag or "")
    paths: list[str] = []
    if description is not None:
        msg.description = description
        paths.append("description")
    if tags is not None:
        msg.tags.update(tags)
        paths.append("tags")
    if sunset_time is not None and clear_sunset_time:
        raise ValueError("give sunset_time or clear_sunset_time, not both")
    if sunset_time is not None:
        msg.sunset_time.CopyFrom(timestamp(sunset_time))
        paths.append("sunset_time")
    elif clear_sunset_time:
        paths.append("sunset_time")
    if not paths:
        raise ValueError("update_version needs at least one of description, tags, sunset_time")
    return pb.UpdateModelVersionRequest(
        model_version=msg,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        request_id=new_request_id(request_id),
    )


def list_versions(
    model: str, *, state: res.VersionState.ValueType | None, page_size: int, page_token: str
) -> pb.ListModelVersionsRequest:
    """Build a ListModelVersionsRequest."""
    return pb.ListModelVersionsRequest(
        parent=model_name(model),
        state=state or res.VERSION_STATE_UNSPECIFIED,
        page_size=page_size,
        page_token=page_token,
    )


def promote(
    model: str,
    stage: str,
    version: int,
    *,
    etag: str | None,
    reason: str,
    hotfix: bool,
    request_id: str | None,
) -> pb.PromoteVersionRequest:
    """Build a PromoteVersionRequest."""
    return pb.PromoteVersionRequest(
        name=stage_name(model, stage),
        version=int(version),
        etag=etag or "",
        reason=reason,
        hotfix=hotfix,
        request_id=new_request_id(request_id),
    )


def rollback(
    model: str,
    stage: str,
    *,
    to_version: int,
    etag: str | None,
    reason: str,
    request_id: str | None,
    allow_unserved: bool = False,
) -> pb.RollbackStageRequest:
    """Build a RollbackStageRequest."""
    return pb.RollbackStageRequest(
        name=stage_name(model, stage),
        to_version=int(to_version),
        etag=etag or "",
        reason=reason,
        request_id=new_request_id(request_id),
        allow_unserved=allow_unserved,
    )


def clear_stage(
    model: str, stage: str, *, etag: str | None, reason: str, force: bool, request_id: str | None
) -> pb.ClearStageRequest:
    """Build a ClearStageRequest."""
    return pb.ClearStageRequest(
        name=stage_name(model, stage),
        etag=etag or "",
        reason=reason,
        force=force,
        request_id=new_request_id(request_id),
    )


def list_audit_events(
    *,
    model: str | None,
    actor: str | None,
    start_time: datetime | None,
    end_time: datetime | None,
    page_size: int,
    page_token: str,
) -> pb.ListAuditEventsRequest:
    """Build a ListAuditEventsRequest; ``model`` (an id or a full name) becomes its ``parent``."""
    req = pb.ListAuditEventsRequest(
        parent=model_name(model) if model else "",
        actor=actor or "",
        page_size=page_size,
        page_token=page_token,
    )
    if start_time is not None:
        req.start_time.CopyFrom(timestamp(start_time))
    if end_time is not None:
        req.end_time.CopyFrom(timestamp(end_time))
    return req


def delete_model(model: str, *, etag: str | None, request_id: str | None) -> pb.DeleteModelRequest:
    """Build a DeleteModelRequest."""
    return pb.DeleteModelRequest(
        name=model_name(model), etag=etag or "", request_id=new_request_id(request_id)
    )


def list_nodes(
    *, region: str | None, model: str | None, page_size: int, page_token: str
) -> fs.ListNodesRequest:
    """Build a ListNodesRequest; ``model`` may be an id or a full model name."""
    return fs.ListNodesRequest(
        region=region or "",
        model=model_id(model) if model else "",
        page_size=page_size,
        page_token=page_token,
    )


def rollout_status(model: str, stage: str, *, region: str | None) -> fs.GetRolloutStatusRequest:
    """Build a GetRolloutStatusRequest."""
    return fs.GetRolloutStatusRequest(name=stage_name(model, stage), region=region or "")


def watch_stages(
    *,
    models: Sequence[str] | None,
    model_prefix: str,
    stages: Sequence[str] | None,
    start_revision: int,
) -> ws.WatchStagesRequest:
    """Build a WatchStagesRequest; models may be ids or names, stages ids or stage names."""
    if isinstance(models, str) or isinstance(stages, str):
        raise TypeError("models and stages take a sequence of ids, not one string")
    return ws.WatchStagesRequest(
        models=[model_id(m) for m in models or ()],
        model_prefix=model_prefix,
        stages=[s.rsplit("/", 1)[-1] for s in stages or ()],
        start_revision=int(start_revision),
    )
