"""The identity ports: who is calling (``Authenticator``) and may they (``Authorizer``).

Both are asked once per RPC, unary or streaming, by the server's one interceptor
(``modelreg.server.api.grpc``), before the handler runs: a caller refused here reads and writes
nothing. The principal an authenticator vouches for is what every audit event records. Health
and reflection are not modelreg RPCs and stay open, for probes and tools.

Today's identity is the ``x-modelreg-actor`` header (``modelreg.server.api.identity``); bearer
tokens or mTLS certificates are further ``Authenticator`` implementations, and roles a further
``Authorizer``, over the one table below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol


@dataclass(frozen=True)
class Caller:
    """What the transport knows of a caller before anyone vouches for it."""

    metadata: Sequence[tuple[str, str | bytes]]
    """The request's metadata (headers), as sent; keys are lowercase."""
    peer: str
    """The transport's name for the other end, e.g. ``ipv4:127.0.0.1:50412``."""


@dataclass(frozen=True)
class Principal:
    """Who a caller proved to be."""

    name: str
    """Recorded as the actor of every audit event the call writes."""
    via: str = ""
    """The server that vouched for ``name`` when it forwarded the call ("" when the caller
    called this server itself): a regional server forwarding a mutation to the primary."""


class Permission(StrEnum):
    """What an RPC needs; a role grants a set of these."""

    MODELS_READ = "models.read"
    MODELS_WRITE = "models.write"
    MODELS_DELETE = "models.delete"
    STAGES_PROMOTE = "stages.promote"
    STAGES_ROLLBACK = "stages.rollback"
    STAGES_CLEAR = "stages.clear"
    STAGES_WATCH = "stages.watch"
    AUDIT_READ = "audit.read"
    FLEET_READ = "fleet.read"
    FLEET_REPORT = "fleet.report"
    REGIONS_READ = "regions.read"
    STAGES_PIN = "stages.pin"
    REGIONS_REPORT = "regions.report"


_MODEL = "/modelreg.v1.ModelService/"
_P = Permission
PERMISSIONS: Mapping[str, Permission] = MappingProxyType({
    _MODEL + "CreateModel": _P.MODELS_WRITE,
    _MODEL + "GetModel": _P.MODELS_READ,
    _MODEL + "ListModels": _P.MODELS_READ,
    _MODEL + "UpdateModel": _P.MODELS_WRITE,
    _MODEL + "DeleteModel": _P.MODELS_DELETE,
    _MODEL + "CreateModelVersion": _P.MODELS_WRITE,
    _MODEL + "GetModelVersion": _P.MODELS_READ,
    _MODEL + "ListModelVersions": _P.MODELS_READ,
    _MODEL + "UpdateModelVersion": _P.MODELS_WRITE,
    _MODEL + "GetStage": _P.MODELS_READ,
    _MODEL + "ListStages": _P.MODELS_READ,
    _MODEL + "PromoteVersion": _P.STAGES_PROMOTE,
    _MODEL + "RollbackStage": _P.STAGES_ROLLBACK,
    _MODEL + "ClearStage": _P.STAGES_CLEAR,
    _MODEL + "ListStageHistory": _P.MODELS_READ,
    _MODEL + "ListAuditEvents": _P.AUDIT_READ,
    "/modelreg.v1.WatchService/WatchStages": _P.STAGES_WATCH,
    "/modelreg.v1.FleetService/ReportNode": _P.FLEET_REPORT,
    # A node's clean stop: the same right as reporting, since it removes only a report.
    "/modelreg.v1.FleetService/DeleteNode": _P.FLEET_REPORT,
    "/modelreg.v1.FleetService/ListNodes": _P.FLEET_READ,
    "/modelreg.v1.FleetService/GetRolloutStatus": _P.FLEET_READ,
    # What the rollout coordinator asks every region: a read of the fleet view.
    "/modelreg.v1.FleetService/GetRegionReadiness": _P.FLEET_READ,
    # What the rollout coordinator asks every region while a guarded rollout bakes.
    "/modelreg.v1.FleetService/GetRegionHealth": _P.FLEET_READ,
    "/modelreg.v1.RolloutService/GetRollout": _P.MODELS_READ,
    "/modelreg.v1.RolloutService/ListRollouts": _P.MODELS_READ,
    "/modelreg.v1.RolloutService/WatchRollout": _P.MODELS_READ,
    # Stopping a rollout decides what a stage serves, as starting it (a promotion) does.
    "/modelreg.v1.RolloutService/CancelRollout": _P.STAGES_PROMOTE,
    "/modelreg.v1.RegionService/ListRegions": _P.REGIONS_READ,
    "/modelreg.v1.RegionService/GetRegionStatus": _P.REGIONS_READ,
    # Break glass overrides what a region serves, whatever the primary says: a right of its
    # own, for pinning and clearing alike.
    "/modelreg.v1.RegionService/PinStage": _P.STAGES_PIN,
    "/modelreg.v1.RegionService/UnpinStage": _P.STAGES_PIN,
    # A region's servers recording its break-glass events in the primary's audit log.
    "/modelreg.v1.RegionService/ReportBreakGlass": _P.REGIONS_REPORT,
})
"""The one table of RPC → permission: every RPC of ``modelreg.v1``, by its full method path.

The server refuses to start with a modelreg RPC missing here, so a new RPC cannot slip
through unguarded.
"""


class Authenticator(Protocol):
    """Turns what a caller presented into a principal."""

    async def authenticate(self, caller: Caller) -> Principal:
        """The principal ``caller`` proved to be.

        Raises:
            UnauthenticatedError: The credentials are missing, unknown or expired.
            InvalidArgumentError: A credential is malformed (the field names it).

        """
        ...


class Authorizer(Protocol):
    """Decides whether a principal may call an RPC."""

    async def authorize(self, principal: Principal, method: str, permission: Permission) -> None:
        """Returns if ``principal`` may call ``method``, which needs ``permission``.

        Raises:
            PermissionDeniedError: It may not.

        """
        ...
