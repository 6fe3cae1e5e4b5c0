"""Registered models: create, read, list, annotate, delete."""

from __future__ import annotations

from modelreg.server.domain import keys, names, records, validation
from modelreg.server.domain.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    RolloutInProgressError,
)
from modelreg.server.domain.ports import DeleteRange, Entry, Put, Write
from modelreg.server.domain.transaction import Call, Operations, Plan, Reader
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1.errors_pb2 import ErrorReason

MODEL_MASK = ("description", "tags", "custom_stages", "rollout_policies")
"""Fields of a model that UpdateModel may change."""


def _check_model_fields(v: validation.Violations, model: res.RegisteredModel) -> None:
    validation.text(v, "model.description", model.description, validation.MAX_DESCRIPTION)
    validation.tags(v, "model.tags", model.tags)
    validation.custom_stages(v, "model.custom_stages", model.custom_stages)


def _check_policies(
    model: res.RegisteredModel, regions: tuple[str, ...]
) -> None:
    """The model's rollout policies against its stages (as they will be) and the regions."""
    v = validation.Violations()
    validation.rollout_policies(
        v, "model.rollout_policies", model.rollout_policies,
        stages=[*validation.BUILTIN_STAGES, *model.custom_stages], regions=regions)
    v.raise_if_any()


def _preparing(pointers: list[Entry | None]) -> list[str]:
    """The rollouts still preparing on the stages whose pointer entries are ``pointers``."""
    pending = (res.StagePointer.FromString(e.value).pending_rollout
               for e in pointers if e is not None)
    return [p for p in pending if p]


def update_paths(mask_paths: list[str], allowed: tuple[str, ...]) -> list[str]:
    """Validates an update mask against the fields a resource lets change."""
    if not mask_paths:
        raise InvalidArgumentError.field(
            "update_mask", f"is required; paths among: {', '.join(allowed)}"
        )
    bad = [p for p in mask_paths if p not in allowed]
    if bad:
        raise InvalidArgumentError.field(
            "update_mask",
            f"{', '.join(bad)} cannot be changed; paths among: {', '.join(allowed)}",
        )
    return sorted(set(mask_paths))


class Models(Operations):
    """Operations on registered models."""

    async def create(self, call: Call, req: svc.CreateModelRequest) -> svc.CreateModelResponse:
        """Registers a model name with its description, tags and custom stages."""
        v = validation.Violations()
        validation.model_id(v, "model_id", req.model_id)
        _check_model_fields(v, req.model)
        validation.request_id(v, req.request_id)
        v.raise_if_any()
        _check_policies(req.model, self._regions)
        key, name = keys.model(req.model_id), names.model_name(req.model_id)

        async def decide(r: Reader) -> Plan:
            if await r.get(key) is not None:
                raise AlreadyExistsError(name)
            now = r.now
            model = res.RegisteredModel(
                name=name,
                description=req.model.description,
                tags=req.model.tags,
                custom_stages=req.model.custom_stages,
                rollout_policies=req.model.rollout_policies,
                create_time=now,
                update_time=now,
            )
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_CREATE_MODEL, resource=name, model=req.model_id
            )
            return Plan(
                [Put(key, records.encode(model))], audit, svc.CreateModelResponse(model=model)
            )

        return await self._mutate(call, decide, svc.CreateModelResponse)

    async def get(self, req: svc.GetModelRequest) -> svc.GetModelResponse:
        """Reads one model, fresh from the store."""
        model_id = names.parse_model("name", req.name)
        snap = await self._store.read([keys.model(model_id)], fresh=True)
        entry = snap.get(keys.model(model_id))
        if entry is None:
            raise NotFoundError(req.name)
        return svc.GetModelResponse(
            model=records.decode(entry, res.RegisteredModel), revision=snap.revision
        )

    async def list(self, req: svc.ListModelsRequest) -> svc.ListModelsResponse:
        """Lists models in name order, one page at a time."""
        v = validation.Violations()
        size = validation.page_size(v, req.page_size)
        v.raise_if_any()
        page = await records.list_page(
            self._store, keys.MODELS_START, keys.MODELS_END, page_size=size, token=req.page_token
        )
        return svc.ListModelsResponse(
            models=[records.decode(e, res.RegisteredModel) for e in page.entries],
            next_page_token=page.next_token,
            revision=page.revision,
        )

    async def update(self, call: Call, req: svc.UpdateModelRequest) -> svc.UpdateModelResponse:
        """Changes the fields named by the update mask, checking the etag if one is given."""
        model_id = names.parse_model("model.name", req.model.name)
        paths = update_paths(list(req.update_mask.paths), MODEL_MASK)
        v = validation.Violations()
        _check_model_fields(v, req.model)
        validation.request_id(v, req.request_id)
        v.raise_if_any()
        key = keys.model(model_id)

        async def decide(r: Reader) -> Plan:
            entry = await r.get(key)
            if entry is None:
                raise NotFoundError(req.model.name)
            records.check_etag(req.model.etag, req.model.name, entry)
            model = records.decode(entry, res.RegisteredModel)
            removed: list[str] = []
            if "custom_stages" in paths:
                removed = [s for s in model.custom_stages if s not in req.model.custom_stages]
                pointers = await r.get_many([keys.stage(model_id, s) for s in removed])
                in_use = [s for s, p in zip(removed, pointers, strict=True)
                          if p is not None and records.decode(p, res.StagePointer).version]
                if in_use:
                    raise FailedPreconditionError(
                        ErrorReason.STAGE_IN_USE,
                        f"cannot remove stage(s) {', '.join(in_use)} of {req.model.name}: "
                        "they point at a version (empty them first with ClearStage)",
                    )
            if "rollout_policies" in paths:
                removed += [s for s in model.rollout_policies
                            if s not in req.model.rollout_policies and s not in removed]
            if removed:
                # A stage that stops being governed (or existing) while a rollout prepares on
                # it would leave the rollout with nothing to commit or abort it.
                pointers = await r.get_many([keys.stage(model_id, s) for s in removed])
                preparing = _preparing(pointers)
                if preparing:
                    raise RolloutInProgressError(
                        req.model.name, preparing[0],
                        "its stage's policy (or the stage) cannot be removed meanwhile")
            if "description" in paths:
                model.description = req.model.description
            if "tags" in paths:
                model.ClearField("tags")
                model.tags.update(req.model.tags)
            if "custom_stages" in paths:
                model.ClearField("custom_stages")
                model.custom_stages.extend(req.model.custom_stages)
            if "rollout_policies" in paths:
                model.ClearField("rollout_policies")
                for stage, policy in req.model.rollout_policies.items():
                    model.rollout_policies[stage].CopyFrom(policy)
            if {"custom_stages", "rollout_policies"} & set(paths):
                _check_policies(model, self._regions)
            model.update_time.CopyFrom(r.now)
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_UPDATE_MODEL,
                resource=req.model.name,
                model=model_id,
                to_value=",".join(paths),
            )
            return Plan(
                [Put(key, records.encode(model))], audit, svc.UpdateModelResponse(model=model)
            )

        return await self._mutate(call, decide, svc.UpdateModelResponse)

    async def delete(self, call: Call, req: svc.DeleteModelRequest) -> svc.DeleteModelResponse:
        """Deletes a model with its versions and history, unless a stage still names one."""
        model_id = names.parse_model("name", req.name)
        v = validation.Violations()
        validation.request_id(v, req.request_id)
        v.raise_if_any()
        key = keys.model(model_id)

        async def decide(r: Reader) -> Plan:
            entry = await r.get(key)
            if entry is None:
                raise NotFoundError(req.name)
            records.check_etag(req.etag, req.name, entry)
            prefix = keys.stages_prefix(model_id)
            pointers = await r.scan_all(prefix, keys.prefix_end(prefix))
            staged = [(e.key.removeprefix(prefix), records.decode(e, res.StagePointer))
                      for e in pointers]
            preparing = [p.pending_rollout for _, p in staged if p.pending_rollout]
            if preparing:
                raise RolloutInProgressError(
                    req.name, preparing[0], "a model is deleted only when no rollout prepares")
            in_use = [f"{stage} (v{p.version})" for stage, p in staged if p.version]
            if in_use:
                raise FailedPreconditionError(
                    ErrorReason.MODEL_HAS_STAGED_VERSIONS,
                    f"{req.name} still has versions in stage(s) {', '.join(in_use)}; "
                    "a model is deleted only when no stage points at its versions "
                    "(empty them first with ClearStage)",
                    stages=",".join(stage for stage, p in staged if p.version),
                )
            writes: list[Write] = [
                DeleteRange(start, keys.prefix_end(start))
                for start in (
                    keys.versions_prefix(model_id),
                    keys.history_prefix(model_id),
                    keys.outcomes_prefix(model_id),
                    keys.rollouts_prefix(model_id),
                )
            ]
            # Stage keys are never deleted (see keys): each empty pointer is reset to a blank
            # one instead, so a model created again under this id inherits no candidates.
            writes += [Put(keys.stage(model_id, stage),
                           records.encode(res.StagePointer(name=names.stage_name(model_id, stage))))
                       for stage, _ in staged]
            writes.append(DeleteRange(key, key + "\0"))
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_DELETE_MODEL, resource=req.name, model=model_id
            )
            return Plan(list(writes), audit, svc.DeleteModelResponse())

        return await self._mutate(call, decide, svc.DeleteModelResponse)

