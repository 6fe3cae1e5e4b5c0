"""The regions of the deployment as one server sees them: the topology and its own region's health.

A server answers for its own region only: the revision its store has applied (what its reads
reflect), its replication lag (the replicator's figures, through a ``LagSource``; zero in the
primary) and whether it reaches the primary to forward mutations (a ``PrimaryLink``). Other
regions are asked through their own servers (``modelreg regions`` does), so no figure is ever
second-hand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from modelreg.server.domain import records, validation
from modelreg.server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.server.domain.ports import LagSource, ModelStore, ReplicationLag
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1.errors_pb2 import ErrorReason

PREFIX = "regions/"


@dataclass(frozen=True)
class RegionInfo:
    """A region of the topology, as the API lists it."""

    name: str
    """The region's id (``eu``), without ``regions/``."""
    primary: bool
    servers: tuple[str, ...]
    """Its modelreg servers' gRPC addresses."""


class PrimaryLink(Protocol):
    """The connection a regional server forwards mutations over."""

    async def reachable(self) -> bool:
        """Whether one of the primary's servers can be reached now (a short probe)."""
        ...


class Regions:
    """``ListRegions`` and ``GetRegionStatus`` for the server of region ``own``."""

    def __init__(
        self,
        own: str,
        regions: Sequence[RegionInfo],
        store: ModelStore,
        *,
        lag: LagSource | None = None,
        link: PrimaryLink | None = None,
    ) -> None:
        self._regions = tuple(regions)
        self._own = next(r for r in self._regions if r.name == own)
        self._primary = next(r for r in self._regions if r.primary)
        self._store = store
        self._lag = lag
        self._link = link

    async def list(self, req: rs.ListRegionsRequest) -> rs.ListRegionsResponse:
        """One page of the topology's regions, in its order."""
        v = validation.Violations()
        size = validation.page_size(v, req.page_size)
        v.raise_if_any()
        after = records.decode_token(req.page_token, PREFIX, PREFIX + "\x7f")
        names = [r.name for r in self._regions]
        start = 0
        if after is not None:
            if after.removeprefix(PREFIX) not in names:
                raise InvalidArgumentError.field(
                    "page_token", "is not a token from this list; start over")
            start = names.index(after.removeprefix(PREFIX)) + 1
        page = self._regions[start:start + size]
        more = start + size < len(self._regions)
        return rs.ListRegionsResponse(
            regions=[rs.Region(name=PREFIX + r.name, primary=r.primary, servers=r.servers)
                     for r in page],
            next_page_token=records.encode_token(PREFIX + page[-1].name) if more else "",
            region=PREFIX + self._own.name,
        )

    async def status(self, req: rs.GetRegionStatusRequest) -> rs.GetRegionStatusResponse:
        """This server's region: applied revision, lag, whether the primary is reachable."""
        self._check_name(req.name)
        applied = (await self._store.read([], fresh=True)).revision
        if self._own.primary:
            lag: ReplicationLag | None = ReplicationLag(0, 0.0, applied, 0, True)
            reachable = True
        else:
            lag = await self._lag.lag() if self._lag is not None else None
            reachable = await self._link.reachable() if self._link is not None else False
        status = rs.RegionStatus(
            name=PREFIX + self._own.name, primary=self._own.primary,
            primary_region=PREFIX + self._primary.name, applied_revision=applied,
            primary_reachable=reachable,
        )
        if lag is not None:
            status.lag.revisions = lag.revisions
            status.lag.seconds = lag.seconds
            status.lag.primary_revision = lag.primary_revision
            status.lag.current = lag.current
            written_ms = lag.written_ms or time.time_ns() // 1_000_000
            status.lag.update_time.FromMilliseconds(written_ms)
        return rs.GetRegionStatusResponse(region_status=status, revision=applied)

    @property
    def own(self) -> RegionInfo:
        """This server's region."""
        return self._own

    @property
    def primary(self) -> RegionInfo:
        """The primary region."""
        return self._primary

    def known(self, name: str) -> bool:
        """Whether ``name`` (``regions/{region}``) is a region of the topology."""
        return any(PREFIX + r.name == name for r in self._regions)

    def check_own(self, name: str, field: str = "name") -> None:
        """Refuses a ``regions/{region}`` that is not this server's (empty means this one).

        Raises:
            InvalidArgumentError: ``name`` is no region name.
            NotFoundError: No region of the topology has that name.
            FailedPreconditionError: NOT_THIS_REGION, naming that region's servers.

        """
        self._check_name(name, field)

    def _check_name(self, name: str, field: str = "name") -> None:
        if not name:
            return
        region = name.removeprefix(PREFIX)
        if not name.startswith(PREFIX) or not region:
            raise InvalidArgumentError.field(field, "must be regions/{region}, e.g. regions/eu")
        if region == self._own.name:
            return
        other = next((r for r in self._regions if r.name == region), None)
        if other is None:
            raise NotFoundError(name)
        raise FailedPreconditionError(
            ErrorReason.NOT_THIS_REGION,
            f"this server answers for regions/{self._own.name}; ask a server of {name} "
            f"({', '.join(other.servers) or 'none listed'})",
            region=name, servers=",".join(other.servers),
        )
