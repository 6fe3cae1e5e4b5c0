"""The audit trail: every mutation's event, listed newest first with filters."""

from __future__ import annotations

from modelreg.server.domain import keys, names, records, validation
from modelreg.server.domain.errors import InvalidArgumentError
from modelreg.server.domain.ports import Entry, ModelStore
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1.errors_pb2 import ErrorReason


class AuditLog:
    """Reads the audit events that mutations write in their own transactions."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store

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
        return svc.ListAuditEventsResponse(
            audit_events=[decoded(e) for e in page.entries],
            next_page_token=page.next_token,
            revision=page.revision,
        )
