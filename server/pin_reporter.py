"""Reconciliation of break glass: a region's servers report its local audit events to the primary.

A pin (or its clearing) is written in the region's etcd only, with a region-local audit event
(:mod:`modelreg.server.domain.pins`). Every server of the region runs a :class:`PinReporter`:
whenever the region holds an event the primary has not recorded, it sends it to the primary's
servers (``RegionService.ReportBreakGlass``, over the forwarder's channels), then waits until
the region has replicated the primary's copy and marks the local event reported. It tries
again every ``REPORT_INTERVAL`` and at once after a local change, so an event made with the
primary unreachable reaches it within about that long of its return, oldest first. The
primary records an event once however often it arrives (ALREADY_EXISTS says it has it), so
two servers of a region reporting together, or a server that died between the report and the
mark, never make a second copy. Nothing here decides what the region serves: a pin stays in
force until an operator clears it, reported or not.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog

from modelreg.server.api.forward import Forwarder, PrimaryAnswered
from modelreg.server.domain import keys, records
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.identity import Principal
from modelreg.server.domain.pins import Pins
from modelreg.server.domain.ports import ModelStore
from modelreg.v1 import region_service_pb2 as rs
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import store_pb2

log = structlog.get_logger("modelreg.break_glass")

METHOD = "/modelreg.v1.RegionService/ReportBreakGlass"
REPORT_INTERVAL = 1.0
"""Seconds between two looks for unreported events (a local change looks at once)."""
APPLY_WAIT = 5.0
"""Seconds a report waits for the region to replicate the primary's copy before trying later."""


class PinReporter:
    """Reports this region's unreported break-glass events to the primary (module docstring)."""

    def __init__(self, pins: Pins, forwarder: Forwarder, store: ModelStore, *, region: str,
                 interval: float = REPORT_INTERVAL) -> None:
        self._pins = pins
        self._forwarder = forwarder
        self._store = store
        self._principal = Principal(f"modelreg-server/{region}")
        self._interval = interval
        self._wake = asyncio.Event()
        self._deferred = ""
        """Why the last pass stopped early ("" if it did not): logged once, not every pass."""
        self.reported = 0
        """Events this server saw recorded on the primary and marked reported."""

    def kick(self) -> None:
        """Looks for unreported events now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        """Reports until cancelled; a failure is logged and tried again later."""
        while True:
            self._wake.clear()
            try:
                await self.report_all()
                if self._deferred:
                    log.info("break_glass_reports_resumed")
                self._deferred = ""
            except UnavailableError as err:
                if not self._deferred:
                    log.info("break_glass_report_deferred", why=err.message)
                self._deferred = err.message
            except Exception:  # never let reconciliation die: try again next time
                log.exception("break_glass_report_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)

    async def report_all(self) -> int:
        """One pass over the unreported events, oldest first; how many got marked reported.

        Raises:
            UnavailableError: The primary (or the region's etcd) cannot be reached now.

        """
        marked = 0
        for entry in await self._pins.unreported():
            assert entry.value is not None
            event = store_pb2.StoredLocalEvent.FromString(entry.value).event
            recorded = await self._report(event)
            if recorded is not None:
                await self._pins.mark_reported(entry, recorded)
                marked += 1
                self.reported += 1
                log.info("break_glass_reported", audit_event=event.name, resource=event.resource,
                         action=res.AuditAction.Name(event.action), region=event.region)
        return marked

    async def _report(self, event: res.AuditEvent) -> res.AuditEvent | None:
        """The primary's copy of ``event`` once the region holds it (None: not yet)."""
        try:
            resp = await self._forwarder.forward(
                METHOD, rs.ReportBreakGlassRequest(audit_event=event), self._principal, None)
        except PrimaryAnswered as answer:
            if answer.code != grpc.StatusCode.ALREADY_EXISTS:
                log.warning("break_glass_report_refused", audit_event=event.name,
                            code=answer.code.name, reason=answer.reason, error=answer.message)
                return None
            return await self._replicated(event)  # recorded before: by us, or another server
        assert isinstance(resp, rs.ReportBreakGlassResponse)
        if await self._store.wait_for(resp.revision, timeout=APPLY_WAIT) < resp.revision:
            return None  # the region lags: mark it on a later pass, when it has the copy
        return resp.audit_event

    async def _replicated(self, event: res.AuditEvent) -> res.AuditEvent | None:
        key = keys.AUDIT_START + event.name.removeprefix("auditEvents/")
        entry = (await self._store.read([key], fresh=True)).get(key)
        return None if entry is None else records.decode(entry, res.AuditEvent)
