"""The models and versions part of the asyncio client (``ModelService``'s registry records).

The asyncio source of a blocking twin (edit here, then run
``python -m modelreg.client._unasync``). ``_async_client`` adds stages, audit, fleet and watch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from modelreg.client import _paging
from modelreg.client import _requests as rq
from modelreg.client._async_transport import AsyncTransport
from modelreg.v1 import model_service_pb2 as pb
from modelreg.v1 import resources_pb2 as res


class AsyncModelsAndVersions(AsyncTransport):
    """Create, read, list, update and delete models; register, read and annotate versions."""

    async def create_model(
        self,
        model_id: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        custom_stages: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.CreateModelResponse:
        """Register a model id; ``custom_stages`` declares stages besides staging/production."""
        req = pb.CreateModelRequest(
            model_id=rq.model_id(model_id),
            model=res.RegisteredModel(
                description=description, tags=tags or {}, custom_stages=custom_stages or ()
            ),
            request_id=rq.new_request_id(request_id),
        )
        return await self._call(
            lambda s: s.models.CreateModel, req, timeout, idempotent=bool(req.request_id)
        )

    async def get_model(
        self,
        model: str,
        *,
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.GetModelResponse:
        """Read one model."""
        req = pb.GetModelRequest(name=rq.model_name(model))
        return await self._call(
            lambda s: s.models.GetModel, req, timeout, min_revision=min_revision
        )

    async def list_models(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.ListModelsResponse:
        """Read one page of models in name order (``page_size`` 0: the server's default)."""
        req = pb.ListModelsRequest(page_size=page_size, page_token=page_token)
        return await self._call(
            lambda s: s.models.ListModels, req, timeout, min_revision=min_revision
        )

    iter_models = _paging.apaged(list_models, lambda page: page.models)

    async def update_model(
        self,
        model: str,
        *,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        custom_stages: Sequence[str] | None = None,
        rollout_policies: Mapping[str, res.RolloutPolicy] | None = None,
        etag: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.UpdateModelResponse:
        """Replace the fields given (not None); with ``etag``, only if it is still current.

        ``rollout_policies`` replaces the whole map of stage -> policy (``{}`` removes every
        policy); read the model first to change one stage's policy (its etag guards the rest).
        """
        msg = res.RegisteredModel(name=rq.model_name(model), etag=etag or "")
        mask = rq.update_mask(msg, description=description, tags=tags, custom_stages=custom_stages,
                              rollout_policies=rollout_policies)
        req = pb.UpdateModelRequest(
            model=msg, update_mask=mask, request_id=rq.new_request_id(request_id)
        )
        return await self._call(
            lambda s: s.models.UpdateModel, req, timeout, idempotent=bool(req.request_id)
        )

    async def delete_model(
        self,
        model: str,
        *,
        etag: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.DeleteModelResponse:
        """Delete a model and its versions; refused while a stage names one of them."""
        req = pb.DeleteModelRequest(
            name=rq.model_name(model), etag=etag or "", request_id=rq.new_request_id(request_id)
        )
        return await self._call(
            lambda s: s.models.DeleteModel, req, timeout, idempotent=bool(req.request_id)
        )

    async def create_version(
        self,
        model: str,
        *,
        artifact_uri: str,
        sha256: str,
        size_bytes: int,
        framework: str = "",
        signature: str = "",
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, str] | None = None,
        lineage: res.Lineage | Mapping[str, str] | None = None,
        model_card: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.CreateModelVersionResponse:
        """Register the next immutable version of a model; the server assigns its number.

        ``lineage`` is a :class:`Lineage` or a dict of its fields.
        """
        version = res.ModelVersion(
            artifact_uri=artifact_uri,
            sha256=sha256,
            size_bytes=size_bytes,
            framework=framework,
            signature=signature,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            params=params or {},
            lineage=rq.lineage(lineage),
            model_card=model_card,
            description=description,
            tags=tags or {},
        )
        req = pb.CreateModelVersionRequest(
            parent=rq.model_name(model),
            model_version=version,
            request_id=rq.new_request_id(request_id),
        )
        return await self._call(
            lambda s: s.models.CreateModelVersion, req, timeout, idempotent=bool(req.request_id)
        )

    async def get_version(
        self,
        model: str,
        version: int,
        *,
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.GetModelVersionResponse:
        """Read one version with its derived state and stages."""
        req = pb.GetModelVersionRequest(name=rq.version_name(model, version))
        return await self._call(
            lambda s: s.models.GetModelVersion, req, timeout, min_revision=min_revision
        )

    async def list_versions(
        self,
        model: str,
        *,
        state: res.VersionState.ValueType | None = None,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.ListModelVersionsResponse:
        """Read one page of a model's versions in number order, optionally in one state only."""
        req = pb.ListModelVersionsRequest(
            parent=rq.model_name(model),
            state=state or res.VERSION_STATE_UNSPECIFIED,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(
            lambda s: s.models.ListModelVersions, req, timeout, min_revision=min_revision
        )

    iter_versions = _paging.apaged(list_versions, lambda page: page.model_versions)

    async def update_version(
        self,
        model: str,
        version: int,
        *,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        sunset_time: datetime | None = None,
        clear_sunset_time: bool = False,
        etag: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.UpdateModelVersionResponse:
        """Replace a version's annotations given (not None); a sunset time deprecates it."""
        if sunset_time is not None and clear_sunset_time:
            raise ValueError("give sunset_time or clear_sunset_time, not both")
        msg = res.ModelVersion(name=rq.version_name(model, version), etag=etag or "")
        sunset = rq.CLEARED if clear_sunset_time else sunset_time
        mask = rq.update_mask(msg, description=description, tags=tags, sunset_time=sunset)
        req = pb.UpdateModelVersionRequest(
            model_version=msg, update_mask=mask, request_id=rq.new_request_id(request_id)
        )
        return await self._call(
            lambda s: s.models.UpdateModelVersion, req, timeout, idempotent=bool(req.request_id)
        )
