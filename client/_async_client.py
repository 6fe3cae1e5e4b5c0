"""The asyncio client, ``AsyncRegistryClient``: stage pointers, audit, fleet and watch.

The asyncio source of a blocking twin (edit here, then run
``python -m modelreg.client._unasync``). Models and versions come from ``_async_models``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from modelreg.client import _paging
from modelreg.client import _requests as rq
from modelreg.client._async_models import AsyncModelsAndVersions
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as pb
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1 import rollout_service_pb2 as ro
from modelreg.v1 import watch_service_pb2 as ws


class AsyncRegistryClient(AsyncModelsAndVersions):
    """Typed asyncio client of the modelreg services; safe to share between tasks.

    It speaks ``ModelService`` (models, versions, stage pointers, audit), ``FleetService``
    (serving nodes, rollout status), ``WatchService`` (live stage pointers),
    ``RegionService`` (regions, replication lag) and ``RolloutService`` (the two-phase
    rollouts of stages governed by a rollout policy), on one channel.

    The channel is created on first use (behind a lock) and closed by :meth:`aclose` or at the
    end of ``async with``. Model arguments take an id (``fraud-detector``) or a full name
    (``models/fraud-detector``). Every method takes ``timeout``: the call's deadline in seconds,
    retries included, defaulting to the client's (a gRPC deadline the server sees too, hence a
    parameter). Reads (and ``watch_stages``) take ``min_revision``: the server answers only
    once its region has applied that revision, so passing the ``revision`` a mutation returned
    reads that mutation in any region (read-your-writes); past the deadline they raise
    :class:`~modelreg.client.UnavailableError` with reason ``REVISION_NOT_YET_APPLIED``.
    Mutations take ``request_id``, an idempotency key; when ``None`` a uuid4 is
    generated so the client's own retries are applied once, and ``""`` sends none and disables
    retrying. Failures raise :class:`~modelreg.client.RegistryError` subclasses, never raw gRPC
    errors.

    Args:
        target: ``host:port`` of the server; default ``$MODELREG_TARGET``, else
            ``127.0.0.1:50051``.
        **connection: Passed on to :meth:`ClientConfig.create`: ``actor`` (for the audit trail;
            default ``$MODELREG_ACTOR`` or the OS user), ``timeout`` (default per-call deadline
            in seconds, retries included; 10), ``retries`` (on UNAVAILABLE; 3, or a full
            :class:`RetryPolicy`), ``options`` (gRPC channel options), ``credentials`` (TLS
            channel credentials; plaintext if ``None``).

    Example::

        async with AsyncRegistryClient() as client:  # $MODELREG_TARGET or 127.0.0.1:50051
            response = await client.get_stage("fraud-detector", "production")
            print(response.stage.version)

    """

    async def get_stage(
        self,
        model: str,
        stage: str,
        *,
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.GetStageResponse:
        """Read one stage pointer (version 0: the stage is empty)."""
        req = pb.GetStageRequest(name=rq.stage_name(model, stage))
        return await self._call(
            lambda s: s.models.GetStage, req, timeout, min_revision=min_revision
        )

    async def list_stages(
        self,
        model: str,
        *,
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.ListStagesResponse:
        """Read every stage pointer of a model, empty ones included."""
        req = pb.ListStagesRequest(parent=rq.model_name(model))
        return await self._call(
            lambda s: s.models.ListStages, req, timeout, min_revision=min_revision
        )

    async def promote(
        self,
        model: str,
        stage: str,
        version: int,
        *,
        etag: str | None = None,
        reason: str = "",
        hotfix: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.PromoteVersionResponse:
        """Point ``stage`` at ``version`` under the lifecycle rules; hotfix needs a reason."""
        req = pb.PromoteVersionRequest(
            name=rq.stage_name(model, stage),
            version=int(version),
            etag=etag or "",
            reason=reason,
            hotfix=hotfix,
            request_id=rq.new_request_id(request_id),
        )
        return await self._call(
            lambda s: s.models.PromoteVersion, req, timeout, idempotent=bool(req.request_id)
        )

    async def rollback(
        self,
        model: str,
        stage: str,
        *,
        to_version: int = 0,
        etag: str | None = None,
        reason: str = "",
        allow_unserved: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.RollbackStageResponse:
        """Move ``stage`` back to its last known-good version, or to former ``to_version``.

        Last known-good: the most recent former version that served in this stage (as the
        fleet reported); ``skipped`` in the response lists the candidates passed over and why.
        A named ``to_version`` the fleet refused or never served needs ``allow_unserved`` and a
        ``reason``.
        """
        req = pb.RollbackStageRequest(
            name=rq.stage_name(model, stage),
            to_version=int(to_version),
            etag=etag or "",
            reason=reason,
            request_id=rq.new_request_id(request_id),
            allow_unserved=allow_unserved,
        )
        return await self._call(
            lambda s: s.models.RollbackStage, req, timeout, idempotent=bool(req.request_id)
        )

    async def clear_stage(
        self,
        model: str,
        stage: str,
        *,
        etag: str | None = None,
        reason: str = "",
        force: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.ClearStageResponse:
        """Empty ``stage`` (it names no version); ``production`` needs ``force`` and a reason."""
        req = pb.ClearStageRequest(
            name=rq.stage_name(model, stage),
            etag=etag or "",
            reason=reason,
            force=force,
            request_id=rq.new_request_id(request_id),
        )
        return await self._call(
            lambda s: s.models.ClearStage, req, timeout, idempotent=bool(req.request_id)
        )

    async def stage_history(
        self,
        model: str,
        stage: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.ListStageHistoryResponse:
        """Read one page of a stage pointer's moves, newest first."""
        req = pb.ListStageHistoryRequest(
            name=rq.stage_name(model, stage), page_size=page_size, page_token=page_token
        )
        return await self._call(
            lambda s: s.models.ListStageHistory, req, timeout, min_revision=min_revision
        )

    iter_stage_history = _paging.apaged(stage_history, lambda page: page.entries)

    async def list_audit_events(
        self,
        *,
        model: str | None = None,
        actor: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> pb.ListAuditEventsResponse:
        """Read one page of audit events, newest first, filtered by model, actor and time.

        ``model`` is a model id or ``models/{model}``; it is sent as the request's ``parent``.
        """
        req = pb.ListAuditEventsRequest(
            parent=rq.model_name(model) if model else "",
            actor=actor or "",
            start_time=rq.timestamp(start_time) if start_time is not None else None,
            end_time=rq.timestamp(end_time) if end_time is not None else None,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(
            lambda s: s.models.ListAuditEvents, req, timeout, min_revision=min_revision
        )

    iter_audit_events = _paging.apaged(list_audit_events, lambda page: page.audit_events)

    async def list_nodes(
        self,
        *,
        region: str | None = None,
        model: str | None = None,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> fs.ListNodesResponse:
        """Read one page of live serving nodes in id order, optionally of a region or model."""
        req = fs.ListNodesRequest(
            region=region or "",
            model=rq.model_id(model) if model else "",
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(
            lambda s: s.fleet.ListNodes, req, timeout, min_revision=min_revision
        )

    iter_nodes = _paging.apaged(list_nodes, lambda page: page.nodes)

    async def delete_node(
        self,
        node_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> fs.DeleteNodeResponse:
        """Remove a serving node from the fleet view now (``node_id`` or ``nodes/{id}``)."""
        req = fs.DeleteNodeRequest(name="nodes/" + node_id.removeprefix("nodes/"))
        return await self._call(lambda s: s.fleet.DeleteNode, req, timeout, idempotent=False)

    async def rollout_status(
        self,
        model: str,
        stage: str,
        *,
        region: str | None = None,
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> fs.GetRolloutStatusResponse:
        """Read a stage's committed version and how many live nodes serve which version."""
        req = fs.GetRolloutStatusRequest(name=rq.stage_name(model, stage), region=region or "")
        return await self._call(
            lambda s: s.fleet.GetRolloutStatus, req, timeout, min_revision=min_revision
        )

    def watch_stages(
        self,
        *,
        models: Sequence[str] | None = None,
        model_prefix: str = "",
        stages: Sequence[str] | None = None,
        start_revision: int = 0,
        min_revision: int = 0,
    ) -> AsyncIterator[ws.WatchStagesResponse]:
        """Follow stage pointers live: yield the messages of ONE ``WatchStages`` stream.

        With ``start_revision`` 0 the first message is a SNAPSHOT of the selected pointers,
        then CHANGES (one message per etcd transaction) and, while idle, BOOKMARKs; otherwise
        every change from ``start_revision`` on (or a snapshot flagged ``reset`` if those were
        compacted away). Empty selectors select everything; give ``models`` (ids or names) or
        ``model_prefix``, not both; ``stages`` takes ids or full stage names.

        The stream opens on the first iteration and has no deadline; closing the iterator (or
        the client) cancels it. It is not retried nor resumed: when the server ends it or it
        fails, iteration stops or raises a :class:`~modelreg.client.RegistryError` (e.g.
        RESOURCE_EXHAUSTED for a reader that fell too far behind). To resume from the last
        revision + 1 across failures, use the watchers of :mod:`modelreg.client.watcher`.
        """
        req = ws.WatchStagesRequest(
            models=rq.model_ids(models),
            model_prefix=model_prefix,
            stages=rq.stage_ids(stages),
            start_revision=int(start_revision),
        )
        return self._stream(lambda s: s.watch.WatchStages, req, min_revision=min_revision)

    async def list_regions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> rs.ListRegionsResponse:
        """Read one page of the deployment's regions, as the server's topology lists them."""
        req = rs.ListRegionsRequest(page_size=page_size, page_token=page_token)
        return await self._call(
            lambda s: s.regions.ListRegions, req, timeout, min_revision=min_revision
        )

    iter_regions = _paging.apaged(list_regions, lambda page: page.regions)

    async def region_status(
        self,
        region: str = "",
        *,
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> rs.GetRegionStatusResponse:
        """Read how the server's own region is doing: applied revision, lag, primary reachable.

        ``region`` (``eu`` or ``regions/eu``) must be the server's own region; empty means it.
        """
        req = rs.GetRegionStatusRequest(name=rq.region_name(region) if region else "")
        return await self._call(
            lambda s: s.regions.GetRegionStatus, req, timeout, min_revision=min_revision
        )

    async def pin_stage(
        self,
        model: str,
        stage: str,
        *,
        region: str,
        reason: str,
        to_version: int = 0,
        allow_unserved: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> rs.PinStageResponse:
        """Break glass: pin ``stage`` in ``region`` (the server's own) to a known-good version.

        Answered by the region's own server, primary reachable or not: the region serves the
        pinned version (the last known-good one, or former ``to_version``) until
        :meth:`unpin_stage`; the pin is audited there and reported to the primary when it can.
        """
        req = rs.PinStageRequest(
            name=rq.stage_name(model, stage), region=rq.region_name(region), reason=reason,
            to_version=int(to_version), allow_unserved=allow_unserved,
            request_id=rq.new_request_id(request_id),
        )
        return await self._call(
            lambda s: s.regions.PinStage, req, timeout, idempotent=bool(req.request_id)
        )

    async def unpin_stage(
        self,
        model: str,
        stage: str,
        *,
        region: str,
        reason: str,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> rs.UnpinStageResponse:
        """Clear ``region``'s pin of ``stage``: it follows the primary's pointer again."""
        req = rs.UnpinStageRequest(
            name=rq.stage_name(model, stage), region=rq.region_name(region), reason=reason,
            request_id=rq.new_request_id(request_id),
        )
        return await self._call(
            lambda s: s.regions.UnpinStage, req, timeout, idempotent=bool(req.request_id)
        )

    async def get_rollout(
        self,
        name: str,
        *,
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ro.GetRolloutResponse:
        """Read one rollout (``models/{model}/stages/{stage}/rollouts/{id}``)."""
        req = ro.GetRolloutRequest(name=rq.rollout_name(name))
        return await self._call(
            lambda s: s.rollouts.GetRollout, req, timeout, min_revision=min_revision
        )

    async def list_rollouts(
        self,
        model: str,
        stage: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        min_revision: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ro.ListRolloutsResponse:
        """Read one page of a stage's rollouts, newest first."""
        req = ro.ListRolloutsRequest(
            parent=rq.stage_name(model, stage), page_size=page_size, page_token=page_token
        )
        return await self._call(
            lambda s: s.rollouts.ListRollouts, req, timeout, min_revision=min_revision
        )

    iter_rollouts = _paging.apaged(list_rollouts, lambda page: page.rollouts)

    def watch_rollout(
        self, name: str, *, min_revision: int = 0
    ) -> AsyncIterator[ro.WatchRolloutResponse]:
        """Follow one rollout: yield it now, then at every change, until it is done.

        One ``WatchRollout`` stream, with no deadline and no retry; it ends after the message
        whose rollout has ``done`` set (committed or aborted).
        """
        req = ro.WatchRolloutRequest(name=rq.rollout_name(name))
        return self._stream(lambda s: s.rollouts.WatchRollout, req, min_revision=min_revision)

    async def cancel_rollout(
        self,
        name: str,
        *,
        reason: str,
        request_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ro.CancelRolloutResponse:
        """Abort a rollout that is still preparing; nothing moves anywhere. Needs a reason."""
        req = ro.CancelRolloutRequest(
            name=rq.rollout_name(name), reason=reason, request_id=rq.new_request_id(request_id)
        )
        return await self._call(
            lambda s: s.rollouts.CancelRollout, req, timeout, idempotent=bool(req.request_id)
        )
