"""Model versions: register (the server numbers them), read with derived state, list, annotate."""

from __future__ import annotations

from collections.abc import Sequence

from modelreg.server.domain import keys, lifecycle, names, records, validation
from modelreg.server.domain.errors import NotFoundError
from modelreg.server.domain.models import update_paths
from modelreg.server.domain.ports import Entry, Put, Unchanged
from modelreg.server.domain.transaction import Call, Operations, Plan, Reader
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res

VERSION_MASK = ("description", "tags", "sunset_time")
"""The only fields of a version that change after registration; the rest is immutable."""

MAX_VERSION_BYTES = 512 * 1024
"""Encoded size limit of one version record, a third of etcd's request limit."""


def pointers_of(entries: Sequence[Entry], model_id: str) -> dict[str, res.StagePointer]:
    """Stage pointers of one model keyed by stage id, from a scan of its stages prefix."""
    prefix = keys.stages_prefix(model_id)
    return {e.key.removeprefix(prefix): res.StagePointer.FromString(e.value) for e in entries}


def with_state(
    mv: res.ModelVersion, pointers: dict[str, res.StagePointer]
) -> res.ModelVersion:
    """The version with its derived ``state`` and ``stages`` filled in."""
    state, stages = lifecycle.derive_state(mv, pointers)
    mv.state = state
    del mv.stages[:]
    mv.stages.extend(stages)
    return mv


class Versions(Operations):
    """Operations on model versions."""

    async def _pointers(self, model_id: str) -> tuple[dict[str, res.StagePointer], int]:
        prefix = keys.stages_prefix(model_id)
        page = await self._store.scan(
            prefix, keys.prefix_end(prefix), limit=validation.MAX_PAGE_SIZE
        )
        return pointers_of(page.entries, model_id), page.revision

    async def create(
        self, call: Call, req: svc.CreateModelVersionRequest
    ) -> svc.CreateModelVersionResponse:
        """Registers the next version of a model; its number comes from the model record."""
        model_id = names.parse_model("parent", req.parent)
        v = validation.Violations()
        validation.model_version(v, "model_version", req.model_version)
        validation.request_id(v, req.request_id)
        v.check(
            req.model_version.ByteSize() <= MAX_VERSION_BYTES,
            "model_version",
            f"is {req.model_version.ByteSize()} bytes encoded; at most {MAX_VERSION_BYTES}",
        )
        v.raise_if_any()
        model_key = keys.model(model_id)

        async def decide(r: Reader) -> Plan:
            entry = await r.get(model_key)
            if entry is None:
                raise NotFoundError(req.parent)
            model = records.decode(entry, res.RegisteredModel)
            number = model.version_count + 1
            model.version_count = number
            mv = res.ModelVersion()
            mv.CopyFrom(req.model_version)
            mv.name = names.version_name(model_id, number)
            mv.version = number
            mv.created_by = call.actor
            mv.create_time.CopyFrom(r.now)
            mv.ClearField("sunset_time")
            version_key = keys.version(model_id, number)
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_CREATE_VERSION,
                resource=mv.name,
                model=model_id,
                to_value=f"sha256:{mv.sha256} {mv.artifact_uri}",
            )
            return Plan(
                [Put(version_key, records.encode(mv)), Put(model_key, records.encode(model))],
                audit,
                svc.CreateModelVersionResponse(model_version=with_state(mv, {})),
                guards=[Unchanged(version_key, 0)],  # create-only, even if numbering went wrong
            )

        return await self._mutate(call, decide, svc.CreateModelVersionResponse)

    async def get(self, req: svc.GetModelVersionRequest) -> svc.GetModelVersionResponse:
        """Reads one version with its derived state."""
        model_id, number = names.parse_version("name", req.name)
        key = keys.version(model_id, number)
        snap = await self._store.read([key], fresh=True)
        entry = snap.get(key)
        if entry is None:
            raise NotFoundError(req.name)
        pointers, revision = await self._pointers(model_id)
        mv = with_state(records.decode(entry, res.ModelVersion), pointers)
        return svc.GetModelVersionResponse(model_version=mv, revision=max(revision, snap.revision))

    async def list(self, req: svc.ListModelVersionsRequest) -> svc.ListModelVersionsResponse:
        """Lists versions in number order, optionally only those in one state."""
        model_id = names.parse_model("parent", req.parent)
        v = validation.Violations()
        size = validation.page_size(v, req.page_size)
        v.raise_if_any()
        state = validation.version_state(req.state)
        model = await self._store.read([keys.model(model_id)], fresh=True)
        if model.get(keys.model(model_id)) is None:
            raise NotFoundError(req.parent)
        pointers, revision = await self._pointers(model_id)

        def decoded(e: Entry) -> res.ModelVersion:
            return with_state(records.decode(e, res.ModelVersion), pointers)

        def accept(e: Entry) -> bool:
            return decoded(e).state == state

        prefix = keys.versions_prefix(model_id)
        page = await records.list_page(
            self._store, prefix, keys.prefix_end(prefix), page_size=size, token=req.page_token,
            accept=accept if state else None,
        )
        return svc.ListModelVersionsResponse(
            model_versions=[decoded(e) for e in page.entries],
            next_page_token=page.next_token,
            revision=max(revision, page.revision),
        )

    async def update(
        self, call: Call, req: svc.UpdateModelVersionRequest
    ) -> svc.UpdateModelVersionResponse:
        """Changes description, tags or sunset time; every other field is immutable."""
        model_id, number = names.parse_version("model_version.name", req.model_version.name)
        paths = update_paths(list(req.update_mask.paths), VERSION_MASK)
        v = validation.Violations()
        mv_in = req.model_version
        validation.text(v, "model_version.description", mv_in.description,
                        validation.MAX_DESCRIPTION)
        validation.tags(v, "model_version.tags", mv_in.tags)
        if "sunset_time" in paths and mv_in.HasField("sunset_time"):
            validation.timestamp(v, "model_version.sunset_time", mv_in.sunset_time)
        validation.request_id(v, req.request_id)
        v.raise_if_any()
        key = keys.version(model_id, number)

        async def decide(r: Reader) -> Plan:
            entry = await r.get(key)
            if entry is None:
                raise NotFoundError(mv_in.name)
            records.check_etag(mv_in.etag, mv_in.name, entry)
            mv = records.decode(entry, res.ModelVersion)
            if "description" in paths:
                mv.description = mv_in.description
            if "tags" in paths:
                mv.ClearField("tags")
                mv.tags.update(mv_in.tags)
            if "sunset_time" in paths:
                mv.ClearField("sunset_time")
                if mv_in.HasField("sunset_time"):
                    mv.sunset_time.CopyFrom(mv_in.sunset_time)
            prefix = keys.stages_prefix(model_id)
            pointers = pointers_of(await r.scan_all(prefix, keys.prefix_end(prefix)), model_id)
            audit = res.AuditEvent(
                action=res.AUDIT_ACTION_UPDATE_VERSION,
                resource=mv_in.name,
                model=model_id,
                to_value=",".join(paths),
            )
            return Plan(
                [Put(key, records.encode(mv))],
                audit,
                svc.UpdateModelVersionResponse(model_version=with_state(mv, pointers)),
            )

        return await self._mutate(call, decide, svc.UpdateModelVersionResponse)

