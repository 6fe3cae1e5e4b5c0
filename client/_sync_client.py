"""The blocking client: ``RegistryClient``, over a plain ``grpc`` channel."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime

from modelreg.client import _common as cm
from modelreg.client import _requests as rq
from modelreg.client._transport import SyncTransport
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as pb
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws


class RegistryClient(SyncTransport):
    """Typed blocking client of the modelreg services; safe to share between threads.

    It speaks ``ModelService`` (models, versions, stage pointers, audit), ``FleetService``
    (serving nodes, rollout status) and ``WatchService`` (live stage pointers), on one channel.

    The channel is created on first use (behind a lock) and closed by :meth:`close` or at the
    end of ``with``. Model arguments take an id (``fraud-detector``) or a full name
    (``models/fraud-detector``). Every method takes ``timeout``: the call's deadline in seconds,
    retries included, defaulting to the client's. Mutations take ``request_id``, an idempotency
    key; when ``None`` a uuid4 is generated so the client's own retries are applied once, and
    ``""`` sends none and disables retrying. Failures raise :class:`~modelreg.client.RegistryError`
    subclasses, never raw gRPC errors.

    Args:
        target: ``host:port`` of the server.
        actor: Who is calling, for the audit trail; default ``$MODELREG_ACTOR`` or the OS user.
        timeout: Default per-call deadline in seconds, retries included.
        retries: Retries on UNAVAILABLE, or a full :class:`RetryPolicy`.
        options: gRPC channel options.
        credentials: TLS channel credentials; plaintext when ``None``.

    Example::

        with RegistryClient("127.0.0.1:50051") as client:
            stage = client.get_stage("fraud-detector", "production").stage

    """

    def create_model(
        self,
        model_id: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        custom_stages: Sequence[str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.CreateModelResponse:
        """Register a model id; ``custom_stages`` declares stages besides staging/production."""
        req = rq.create_model(
            model_id,
            description=description,
            tags=tags,
            custom_stages=custom_stages,
            request_id=request_id,
        )
        return self._call(
            lambda s: s.models.CreateModel, req, timeout, idempotent=bool(req.request_id)
        )

    def get_model(
        self,
        model: str,
        *,
        timeout: float | None = None,
    ) -> pb.GetModelResponse:
        """Read one model."""
        req = pb.GetModelRequest(name=rq.model_name(model))
        return self._call(lambda s: s.models.GetModel, req, timeout)

    def list_models(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListModelsResponse:
        """Read one page of models in name order (``page_size`` 0: the server's default)."""
        req = pb.ListModelsRequest(page_size=page_size, page_token=page_token)
        return self._call(lambda s: s.models.ListModels, req, timeout)

    def iter_models(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[res.RegisteredModel]:
        """Iterate over every model, fetching pages as needed (``timeout`` is per page)."""
        return cm.pages(
            lambda t: self.list_models(page_size=page_size, page_token=t, timeout=timeout),
            lambda page: page.models,
        )

    def update_model(
        self,
        model: str,
        *,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        custom_stages: Sequence[str] | None = None,
        etag: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.UpdateModelResponse:
        """Replace the fields given (not None); with ``etag``, only if it is still current."""
        req = rq.update_model(
            model,
            description=description,
            tags=tags,
            custom_stages=custom_stages,
            etag=etag,
            request_id=request_id,
        )
        return self._call(
            lambda s: s.models.UpdateModel, req, timeout, idempotent=bool(req.request_id)
        )

    def delete_model(
        self,
        model: str,
        *,
        etag: str | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.DeleteModelResponse:
        """Delete a model and its versions; refused while a stage names one of them."""
        req = rq.delete_model(model, etag=etag, request_id=request_id)
        return self._call(
            lambda s: s.models.DeleteModel, req, timeout, idempotent=bool(req.request_id)
        )

    def create_version(
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
        timeout: float | None = None,
    ) -> pb.CreateModelVersionResponse:
        """Register the next immutable version of a model; the server assigns its number."""
        req = rq.create_version(
            model,
            artifact_uri=artifact_uri,
            sha256=sha256,
            size_bytes=size_bytes,
            framework=framework,
            signature=signature,
            metrics=metrics,
            params=params,
            lineage=lineage,
            model_card=model_card,
            description=description,
            tags=tags,
            request_id=request_id,
        )
        return self._call(
            lambda s: s.models.CreateModelVersion, req, timeout, idempotent=bool(req.request_id)
        )

    def get_version(
        self,
        model: str,
        version: int,
        *,
        timeout: float | None = None,
    ) -> pb.GetModelVersionResponse:
        """Read one version with its derived state and stages."""
        req = pb.GetModelVersionRequest(name=rq.version_name(model, version))
        return self._call(lambda s: s.models.GetModelVersion, req, timeout)

    def list_versions(
        self,
        model: str,
        *,
        state: res.VersionState.ValueType | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListModelVersionsResponse:
        """Read one page of a model's versions in number order, optionally in one state only."""
        req = rq.list_versions(model, state=state, page_size=page_size, page_token=page_token)
        return self._call(lambda s: s.models.ListModelVersions, req, timeout)

    def iter_versions(
        self,
        model: str,
        *,
        state: res.VersionState.ValueType | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[res.ModelVersion]:
        """Iterate over every version of a model (``timeout`` is per page)."""
        return cm.pages(
            lambda t: self.list_versions(
                model, state=state, page_size=page_size, page_token=t, timeout=timeout
            ),
            lambda page: page.model_versions,
        )

    def update_version(
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
        timeout: float | None = None,
    ) -> pb.UpdateModelVersionResponse:
        """Replace a version's annotations given (not None); a sunset time deprecates it."""
        req = rq.update_version(
            model,
            version,
            description=description,
            tags=tags,
            sunset_time=sunset_time,
            clear_sunset_time=clear_sunset_time,
            etag=etag,
            request_id=request_id,
        )
        return self._call(
            lambda s: s.models.UpdateModelVersion, req, timeout, idempotent=bool(req.request_id)
        )

    def get_stage(
        self,
        model: str,
        stage: str,
        *,
        timeout: float | None = None,
    ) -> pb.GetStageResponse:
        """Read one stage pointer (version 0: the stage is empty)."""
        req = pb.GetStageRequest(name=rq.stage_name(model, stage))
        return self._call(lambda s: s.models.GetStage, req, timeout)

    def list_stages(
        self,
        model: str,
        *,
        timeout: float | None = None,
    ) -> pb.ListStagesResponse:
        """Read every stage pointer of a model, empty ones included."""
        req = pb.ListStagesRequest(parent=rq.model_name(model))
        return self._call(lambda s: s.models.ListStages, req, timeout)

    def promote(
        self,
        model: str,
        stage: str,
        version: int,
        *,
        etag: str | None = None,
        reason: str = "",
        hotfix: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.PromoteVersionResponse:
        """Point ``stage`` at ``version`` under the lifecycle rules; hotfix needs a reason."""
        req = rq.promote(
            model, stage, version, etag=etag, reason=reason, hotfix=hotfix, request_id=request_id
        )
        return self._call(
            lambda s: s.models.PromoteVersion, req, timeout, idempotent=bool(req.request_id)
        )

    def rollback(
        self,
        model: str,
        stage: str,
        *,
        to_version: int = 0,
        etag: str | None = None,
        reason: str = "",
        allow_unserved: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.RollbackStageResponse:
        """Move ``stage`` back to its last known-good version, or to former ``to_version``.

        Last known-good: the most recent former version that served in this stage (as the
        fleet reported); ``skipped`` in the response lists the candidates passed over and why.
        A named ``to_version`` the fleet refused or never served needs ``allow_unserved`` and a
        ``reason``.
        """
        req = rq.rollback(
            model,
            stage,
            to_version=to_version,
            etag=etag,
            reason=reason,
            request_id=request_id,
            allow_unserved=allow_unserved,
        )
        return self._call(
            lambda s: s.models.RollbackStage, req, timeout, idempotent=bool(req.request_id)
        )

    def clear_stage(
        self,
        model: str,
        stage: str,
        *,
        etag: str | None = None,
        reason: str = "",
        force: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.ClearStageResponse:
        """Empty ``stage`` (it names no version); ``production`` needs ``force`` and a reason."""
        req = rq.clear_stage(
            model, stage, etag=etag, reason=reason, force=force, request_id=request_id
        )
        return self._call(
            lambda s: s.models.ClearStage, req, timeout, idempotent=bool(req.request_id)
        )

    def stage_history(
        self,
        model: str,
        stage: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListStageHistoryResponse:
        """Read one page of a stage pointer's moves, newest first."""
        req = pb.ListStageHistoryRequest(
            name=rq.stage_name(model, stage), page_size=page_size, page_token=page_token
        )
        return self._call(lambda s: s.models.ListStageHistory, req, timeout)

    def iter_stage_history(
        self, model: str, stage: str, *, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[res.PointerHistoryEntry]:
        """Iterate over a stage pointer's moves, newest first (``timeout`` is per page)."""
        return cm.pages(
            lambda t: self.stage_history(
                model, stage, page_size=page_size, page_token=t, timeout=timeout
            ),
            lambda page: page.entries,
        )

    def list_audit_events(
        self,
        *,
        model: str | None = None,
        actor: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListAuditEventsResponse:
        """Read one page of audit events, newest first, filtered by model, actor and time.

        ``model`` is a model id or ``models/{model}``; it is sent as the request's ``parent``.
        """
        req = rq.list_audit_events(
            model=model,
            actor=actor,
            start_time=start_time,
            end_time=end_time,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call(lambda s: s.models.ListAuditEvents, req, timeout)

    def iter_audit_events(
        self,
        *,
        model: str | None = None,
        actor: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[res.AuditEvent]:
        """Iterate over matching audit events, newest first (``timeout`` is per page)."""
        return cm.pages(
            lambda t: self.list_audit_events(
                model=model,
                actor=actor,
                start_time=start_time,
                end_time=end_time,
                page_size=page_size,
                page_token=t,
                timeout=timeout,
            ),
            lambda page: page.audit_events,
        )

    def list_nodes(
        self,
        *,
        region: str | None = None,
        model: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> fs.ListNodesResponse:
        """Read one page of live serving nodes in id order, optionally of a region or model."""
        req = rq.list_nodes(region=region, model=model, page_size=page_size, page_token=page_token)
        return self._call(lambda s: s.fleet.ListNodes, req, timeout)

    def iter_nodes(
        self,
        *,
        region: str | None = None,
        model: str | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[fs.Node]:
        """Iterate over every live node that matches (``timeout`` is per page)."""
        return cm.pages(
            lambda t: self.list_nodes(
                region=region, model=model, page_size=page_size, page_token=t, timeout=timeout
            ),
            lambda page: page.nodes,
        )

    def delete_node(
        self,
        node_id: str,
        *,
        timeout: float | None = None,
    ) -> fs.DeleteNodeResponse:
        """Remove a serving node from the fleet view now (``node_id`` or ``nodes/{id}``)."""
        req = fs.DeleteNodeRequest(name="nodes/" + node_id.removeprefix("nodes/"))
        return self._call(lambda s: s.fleet.DeleteNode, req, timeout, idempotent=False)

    def rollout_status(
        self,
        model: str,
        stage: str,
        *,
        region: str | None = None,
        timeout: float | None = None,
    ) -> fs.GetRolloutStatusResponse:
        """Read a stage's committed version and how many live nodes serve which version."""
        req = rq.rollout_status(model, stage, region=region)
        return self._call(lambda s: s.fleet.GetRolloutStatus, req, timeout)

    def watch_stages(
        self,
        *,
        models: Sequence[str] | None = None,
        model_prefix: str = "",
        stages: Sequence[str] | None = None,
        start_revision: int = 0,
    ) -> Iterator[ws.WatchStagesResponse]:
        """Follow stage pointers live: yield the messages of ONE ``WatchStages`` stream.

        With ``start_revision`` 0 the first message is a SNAPSHOT of the selected pointers,
        then CHANGES (one message per etcd transaction) and, while idle, BOOKMARKs; otherwise
        every change from ``start_revision`` on (or a snapshot flagged ``reset`` if those were
        compacted away). Empty selectors select everything; give ``models`` or
        ``model_prefix``, not both.

        The stream opens on the first iteration and has no deadline; closing the iterator (or
        the client) cancels it. It is not retried nor resumed: when the server ends it or it
        fails, iteration stops or raises a :class:`~modelreg.client.RegistryError` (e.g.
        RESOURCE_EXHAUSTED for a reader that fell too far behind). To resume from the last
        revision + 1 across failures, use the watchers of :mod:`modelreg.client.watcher`.
        """
        req = rq.watch_stages(
            models=models, model_prefix=model_prefix, stages=stages, start_revision=start_revision
        )
        return self._stream(lambda s: s.watch.WatchStages, req)
