"""The audit trail: every mutation's event, listed newest first with filters.

In a region outside the primary, the listing adds the region's break-glass events that the
primary has not recorded yet (``pins``): each appears once, from the region until its copy
from the primary has replicated there, then from the primary's log, under the same id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from modelreg.server.domain import keys, names, records, validation
from modelreg.server.domain.errors import InvalidArgumentError
from modelreg.server.domain.ports import Entry, ModelStore
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1.errors_pb2 import ErrorReason


class AuditLog:
    """Reads the audit events that mutations write in their own transactions."""

    def __init__(
        self,
        store: ModelStore,
        local_events: Callable[[], Awaitable[list[res.AuditEvent]]] | None = None,
    ) -> None:
        self._store = store
        self._local_events = local_events
        """The region's break-glass events not in the primary's log yet (None: no region)."""

    async def list(self, req: svc.ListAuditEventsRequest) -> svc.ListAuditEventsResponse:
        """Events newest first, by model (``parent``), actor and ``[start_time, end_time)``."""
        if any(f.name == "model" for f, _ in req.ListFields()):
            raise InvalidArgumentError.field(
                "model", "is replaced by parent: give models/{model} in parent",
                reason=ErrorReason.FIELD_REPLACED,
            )
        model_id = names.parse_model("parent", req.parent) if req.parent else ""
        v = validation.Violations()
        size = validation.page_size(v, req.page_size)
        validation.text(v, "actor", req.actor, validation.MAX_ACTOR)
        for field in ("start_time", "end_time"):
            if req.HasField(field):
                validation.timestamp(v, field, getattr(req, field))
        v.raise_if_any()
        start_ns = req.start_time.ToNanoseconds() if req.HasField("start_time") else 0
        end_ns = req.end_time.ToNanoseconds() if req.HasField("end_time") else 0
        v.check(start_ns >= 0, "start_time", "must not be before 1970")
        v.check(end_ns >= 0, "end_time", "must not be before 1970")
        if start_ns and end_ns:
            v.check(start_ns < end_ns, "end_time", "must be after start_time")
        v.raise_if_any()
        start = keys.audit_bound(start_ns) if start_ns else keys.AUDIT_START
        end = keys.audit_bound(end_ns) if end_ns else keys.AUDIT_END

        def decoded(e: Entry) -> res.AuditEvent:
            return records.decode(e, res.AuditEvent)

        def accept(e: Entry) -> bool:
            event = decoded(e)
            return (not model_id or event.model == model_id) and (
                not req.actor or event.actor == req.actor
            )

        page = await records.list_page(
            self._store, start, end, page_size=size, token=req.page_token, reverse=True,
            accept=accept if (model_id or req.actor) else None,
        )
        listed = [(e.key, decoded(e)) for e in page.entries]
        token = page.next_token
        if self._local_events is not None:
            # Newest first, like the page: a local event belongs on this page if its key lies
            # in the part of the range the page covered.
            after = records.decode_token(req.page_token, start, end)
            low = (records.decode_token(token, start, end) or start) if token else start
            high = after if after is not None else end
            seen = {k for k, _ in listed}
            for event in await self._local_events():
                key = keys.AUDIT_START + event.name.removeprefix("auditEvents/")
                if low <= key < high and key not in seen and (
                        not model_id or event.model == model_id) and (
                        not req.actor or event.actor == req.actor):
                    listed.append((key, event))
            listed.sort(key=lambda item: item[0], reverse=True)
            if len(listed) > size:
                listed = listed[:size]
                token = records.encode_token(listed[-1][0])
        return svc.ListAuditEventsResponse(
            audit_events=[event for _, event in listed],
            next_page_token=token,
            revision=page.revision,
        )
