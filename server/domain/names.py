"""Resource names (AIP-122): parsing and formatting, with errors that name the field."""

from __future__ import annotations

from modelreg.server.domain import validation
from modelreg.server.domain.errors import InvalidArgumentError, echo


def model_name(model_id: str) -> str:
    """``models/{model}``."""
    return f"models/{model_id}"


def version_name(model_id: str, number: int) -> str:
    """``models/{model}/versions/{version}``."""
    return f"models/{model_id}/versions/{number}"


def stage_name(model_id: str, stage_id: str) -> str:
    """``models/{model}/stages/{stage}``."""
    return f"models/{model_id}/stages/{stage_id}"


def rollout_name(model_id: str, stage_id: str, rollout_id: int) -> str:
    """``models/{model}/stages/{stage}/rollouts/{id}``."""
    return f"models/{model_id}/stages/{stage_id}/rollouts/{rollout_id}"


def _parts(field: str, name: str, collection: str | None, shape: str) -> list[str]:
    parts = name.split("/")
    expected = 2 if collection is None else 4
    if len(parts) != expected or parts[0] != "models" or (
        collection is not None and parts[2] != collection
    ):
        raise InvalidArgumentError.field(
            field, f"{echo(name)} is not a resource name of form {shape}"
        )
    return parts


def parse_model(field: str, name: str) -> str:
    """The model id in ``models/{model}``."""
    model_id = _parts(field, name, None, "models/{model}")[1]
    v = validation.Violations()
    validation.model_id(v, field, model_id)
    v.raise_if_any()
    return model_id


def parse_version(field: str, name: str) -> tuple[str, int]:
    """The model id and number in ``models/{model}/versions/{version}``."""
    parts = _parts(field, name, "versions", "models/{model}/versions/{version}")
    v = validation.Violations()
    validation.model_id(v, field, parts[1])
    number = validation.number(parts[3])
    v.check(number > 0, field, f"version {echo(parts[3])} must be a positive integer")
    v.raise_if_any()
    return parts[1], number


def parse_stage(field: str, name: str) -> tuple[str, str]:
    """The model id and stage id in ``models/{model}/stages/{stage}``."""
    parts = _parts(field, name, "stages", "models/{model}/stages/{stage}")
    v = validation.Violations()
    validation.model_id(v, field, parts[1])
    validation.stage_id(v, field, parts[3])
    v.raise_if_any()
    return parts[1], parts[3]


def parse_rollout(field: str, name: str) -> tuple[str, str, int]:
    """The model id, stage id and number in ``models/{model}/stages/{stage}/rollouts/{id}``."""
    parts = name.split("/")
    if len(parts) != 6 or parts[0] != "models" or parts[2] != "stages" or parts[4] != "rollouts":
        raise InvalidArgumentError.field(
            field, f"{echo(name)} is not a resource name of form "
            "models/{model}/stages/{stage}/rollouts/{id}")
    v = validation.Violations()
    validation.model_id(v, field, parts[1])
    validation.stage_id(v, field, parts[3])
    number = validation.number(parts[5])
    v.check(number > 0, field, f"rollout id {echo(parts[5])} must be a positive integer")
    v.raise_if_any()
    return parts[1], parts[3], number
