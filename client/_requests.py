"""The pieces request messages are made of: resource names, request ids, update masks, lineage.

The clients build each request inline from their own arguments (an RPC's parameters are
written once, in :mod:`modelreg.client._async_client`); what is here takes values, never an
RPC's keyword list, so adding an RPC does not touch this module.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from google.protobuf import field_mask_pb2, message, timestamp_pb2

from modelreg.v1 import resources_pb2 as res


def model_name(model: str) -> str:
    """Return ``models/{model}`` for a model id or a full model name."""
    return model if model.startswith("models/") else f"models/{model}"


def model_id(model: str) -> str:
    """Return the bare model id of a model id or a full model name."""
    return model.removeprefix("models/").split("/", 1)[0]


def version_name(model: str, version: int) -> str:
    """Return ``models/{model}/versions/{version}``."""
    return f"{model_name(model)}/versions/{int(version)}"


def region_name(region: str) -> str:
    """``regions/{region}`` for ``eu`` or ``regions/eu``."""
    return "regions/" + region.removeprefix("regions/")


def stage_name(model: str, stage: str) -> str:
    """Return ``models/{model}/stages/{stage}``; a full stage name is passed through."""
    if stage.startswith("models/"):
        return stage
    return f"{model_name(model)}/stages/{stage}"


def rollout_name(model: str, stage: str | None = None, rollout: int | None = None) -> str:
    """Return ``models/{model}/stages/{stage}/rollouts/{id}``; a full name is passed through.

    ``rollout_name("models/m/stages/production/rollouts/3")`` and
    ``rollout_name("m", "production", 3)`` name the same rollout.
    """
    if stage is None or rollout is None:
        if "/rollouts/" not in model:
            raise ValueError(f"{model!r} is not a rollout name (models/M/stages/S/rollouts/N)")
        return model
    return f"{stage_name(model, stage)}/rollouts/{int(rollout)}"


def rollout_policy(
    *,
    regions: Sequence[str] | None = None,
    readiness_fraction: float = 0.0,
    prepare_deadline: float | None = None,
    activation_margin: float | None = None,
    guard: Mapping[str, float] | None = None,
    bake_window: float | None = None,
    breach_duration: float | None = None,
    guard_node_fraction: float = 0.0,
) -> res.RolloutPolicy:
    """A RolloutPolicy from plain values (seconds for the durations; None: the server's default).

    ``guard`` names the highest allowed value of each health figure nodes report (e.g.
    ``{"error_rate": 0.05}``); with it, ``bake_window``, ``breach_duration`` and
    ``guard_node_fraction`` shape the rollout guard (see ``RolloutGuard``). Without it there is
    no guard, and those three must be left unset (the server refuses a guard without figures).
    """
    policy = res.RolloutPolicy(regions=list(regions or ()), readiness_fraction=readiness_fraction)
    if prepare_deadline is not None:
        policy.prepare_deadline.FromNanoseconds(round(prepare_deadline * 1e9))
    if activation_margin is not None:
        policy.activation_margin.FromNanoseconds(round(activation_margin * 1e9))
    if guard or bake_window is not None or breach_duration is not None or guard_node_fraction:
        policy.guard.max_values.update(dict(guard or {}))
        policy.guard.node_fraction = guard_node_fraction
        if bake_window is not None:
            policy.guard.bake_window.FromNanoseconds(round(bake_window * 1e9))
        if breach_duration is not None:
            policy.guard.breach_duration.FromNanoseconds(round(breach_duration * 1e9))
    return policy


def model_ids(models: Sequence[str] | None) -> list[str]:
    """Return the ids of model ids or names; one string is refused (it is no sequence of ids)."""
    if isinstance(models, str):
        raise TypeError("models takes a sequence of ids, not one string")
    return [model_id(m) for m in models or ()]


def stage_ids(stages: Sequence[str] | None) -> list[str]:
    """Return the ids of stage ids or full stage names; one string is refused."""
    if isinstance(stages, str):
        raise TypeError("stages takes a sequence of ids, not one string")
    return [s.rsplit("/", 1)[-1] for s in stages or ()]


def new_request_id(request_id: str | None) -> str:
    """Return the caller's idempotency key, or a fresh uuid4 for ``None`` (``""`` stays)."""
    return str(uuid.uuid4()) if request_id is None else request_id


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """Convert a datetime to a Timestamp; a naive datetime is taken as local time."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo is not None else value.astimezone())
    return ts


def lineage(value: res.Lineage | Mapping[str, str] | None) -> res.Lineage:
    """Return a Lineage message from a message, a dict of its fields, or ``None``."""
    if value is None:
        return res.Lineage()
    if isinstance(value, res.Lineage):
        return value
    return res.Lineage(**dict(value))


class _Cleared:
    def __repr__(self) -> str:
        return "CLEARED"


CLEARED = _Cleared()
"""An :func:`update_mask` value that names the field in the mask and leaves it unset."""


def update_mask(msg: message.Message, **fields: object) -> field_mask_pb2.FieldMask:
    """Set the fields given (not ``None``) on ``msg`` and return the mask naming them.

    A mapping replaces a map field, a sequence a repeated one, a datetime a Timestamp;
    :data:`CLEARED` clears a field. Updates are AIP-134: the mask is exactly what was given.

    Raises:
        ValueError: Every value is ``None``: an update of nothing is refused locally.

    """
    paths: list[str] = []
    for name, value in fields.items():
        if value is None:
            continue
        paths.append(name)
        if value is CLEARED:
            continue
        field = getattr(msg, name)
        if isinstance(value, datetime):
            field.CopyFrom(timestamp(value))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, message.Message):
                    field[key].CopyFrom(item)  # a map of messages takes no assignment
                else:
                    field[key] = item
        elif isinstance(value, Sequence) and not isinstance(value, str):
            field.extend(value)
        else:
            setattr(msg, name, value)
    if not paths:
        raise ValueError(f"an update needs at least one of {', '.join(fields)}")
    return field_mask_pb2.FieldMask(paths=paths)
