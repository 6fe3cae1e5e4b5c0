"""How every mutation runs: read, decide, commit in one guarded transaction, retry if beaten.

A mutation is a ``decide`` coroutine that reads through a ``Reader`` and returns a ``Plan``
(writes, audit event, response). ``run_mutation`` commits the plan with a guard on every key
the decision read, so no rule is ever checked against state that changed before the commit.
The first attempt reads through the store's cache (usually no round trip); if a guard fails,
the same transaction returns the current values of the keys read, and the decision is made
again on them. Rule violations seen on cached data are re-checked on fresh data before the
caller hears of them, so a lagging cache can cost a retry but never a wrong answer.

The audit event and the idempotency record are written in the same transaction as the change:
there is no mutation without its audit event, and a ``request_id`` retried gets the first
response back instead of a second change.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from modelreg.server.domain import keys, validation
from modelreg.server.domain.errors import (
    ContentionError,
    InvalidArgumentError,
    ModelregError,
)
from modelreg.server.domain.ports import (
    Entry,
    Guard,
    ModelStore,
    Put,
    RangeUnchanged,
    Snapshot,
    Unchanged,
    Write,
)
from modelreg.v1 import resources_pb2, store_pb2

REQUEST_TTL = 24 * 3600
"""Seconds an idempotency record is kept: a retry within a day is answered, not re-applied."""

MAX_ATTEMPTS = 10
"""Decisions per request before giving up with ``ContentionError`` (each after a lost race)."""

R = TypeVar("R", bound=Message)


def etag(mod_revision: int) -> str:
    """The etag of a resource: its quoted etcd mod_revision (AIP-154 style)."""
    return f'"{mod_revision}"'


def now_timestamp(unix_nanos: int) -> timestamp_pb2.Timestamp:
    """A protobuf timestamp from nanoseconds since the epoch."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(unix_nanos)
    return ts


@dataclass(frozen=True)
class Call:
    """Who asks, and the request as sent (for idempotency)."""

    actor: str
    """Principal recorded in the audit event."""
    method: str
    """Fully qualified RPC name; a request_id is only ever replayed for the same method."""
    request: Message
    """The request message; its ``request_id`` field, if set, makes the call idempotent."""

    @property
    def request_id(self) -> str:
        """The caller's idempotency key, or ``""``."""
        return str(getattr(self.request, "request_id", ""))

    def fingerprint(self) -> bytes:
        """sha256 of the request less its request_id, to refuse an id reused for another call."""
        copy = type(self.request)()
        copy.CopyFrom(self.request)
        copy.ClearField("request_id")
        return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


@dataclass
class Plan:
    """What a decision wants written, and what the caller will be told."""

    writes: Sequence[Write]
    audit: resources_pb2.AuditEvent
    """Written in the same transaction; ``name``, ``time``, ``actor`` are filled in."""
    response: Message
    """Response message; ``revision`` and the etag of each resource in it are stamped with the
    commit revision, since every resource a mutation returns was written by it."""
    guards: list[Guard] = field(default_factory=list)
    """Guards beyond the keys read, e.g. create-only on a new key."""
    earlier_audit: list[resources_pb2.AuditEvent] = field(default_factory=list)
    """Further events of the same change, listed just before ``audit`` (e.g. the abort of a
    rollout that an emergency rollback supersedes); filled in like ``audit``."""
    audit_key: str = ""
    """Set when ``audit`` records a change made elsewhere first (a region's break glass,
    ``modelreg.server.domain.pins``): the event is written under this key as it is, keeping
    its name, actor and time, so that one event is recorded once however often it arrives
    (the decision reads the key, which guards it)."""


class Reader:
    """Reads for one decision, remembering every key and range read so all can be guarded."""

    def __init__(
        self, store: ModelStore, *, fresh: bool, known: Snapshot | None = None, now_ns: int = 0
    ) -> None:
        self._store = store
        self.fresh = fresh
        self.now = now_timestamp(now_ns)
        """When this decision is made: the time of the change and of its audit event."""
        self._seen: dict[str, Entry | None] = dict(known.entries) if known else {}
        self._ranges: list[RangeUnchanged] = []

    async def get(self, key: str) -> Entry | None:
        """One key: from what this decision already read, else from the store."""
        return (await self.get_many([key]))[0]

    async def get_many(self, wanted: Sequence[str]) -> list[Entry | None]:
        """Several keys, reading the missing ones in one round trip."""
        missing = [k for k in wanted if k not in self._seen]
        if missing:
            snap = await self._store.read(missing, fresh=self.fresh)
            self._seen.update(snap.entries)
        return [self._seen[k] for k in wanted]

    async def scan_all(
        self, start: str, end: str, *, limit: int = validation.MAX_PAGE_SIZE
    ) -> list[Entry]:
        """Every key of a range (small ranges only: a model's stages), always fresh.

        ``limit`` 0 reads the whole range, for ranges bounded by what they hold (a rollback's
        outcome records) rather than by a page size.
        """
        page = await self._store.scan(start, end, limit=limit)
        self._ranges.append(RangeUnchanged(start, end, page.revision))
        return list(page.entries)

    def keys(self) -> list[str]:
        """Every key read so far."""
        return list(self._seen)

    def guards(self) -> list[Guard]:
        """One guard per key and range read: the commit holds only if none of them changed."""
        guards: list[Guard] = [
            Unchanged(k, e.mod_revision if e else 0) for k, e in self._seen.items()
        ]
        guards.extend(self._ranges)
        return guards


Decide = Callable[[Reader], Awaitable[Plan]]


def stamp(response: R, revision: int) -> R:
    """Sets ``revision`` on the response and the etag of every resource in it."""
    for fd in response.DESCRIPTOR.fields:
        is_resource = fd.message_type is not None and "etag" in fd.message_type.fields_by_name
        if is_resource and not fd.is_repeated and response.HasField(fd.name):
            getattr(response, fd.name).etag = etag(revision)
    if "revision" in response.DESCRIPTOR.fields_by_name:
        response.revision = revision  # type: ignore[attr-defined]
    return response


def _replay(call: Call, record: Entry, response_type: type[R]) -> R:
    stored = store_pb2.StoredRequest.FromString(record.value)
    if stored.method != call.method or stored.fingerprint != call.fingerprint():
        raise InvalidArgumentError.field(
            "request_id",
            f"{call.request_id!r} was already used for a different request ({stored.method})",
        )
    return stamp(response_type.FromString(stored.response), record.mod_revision)


async def run_mutation(
    store: ModelStore,
    call: Call,
    decide: Decide,
    response_type: type[R],
    *,
    clock: Callable[[], int] = time.time_ns,
) -> R:
    """Decides and commits one mutation atomically; see the module docstring."""
    request_key = keys.request(call.request_id) if call.request_id else None
    fresh, known = False, None
    for _ in range(MAX_ATTEMPTS):
        unix_nanos = clock()
        reader = Reader(store, fresh=fresh, known=known, now_ns=unix_nanos)
        if request_key is not None:
            record = await reader.get(request_key)
            if record is not None:
                return _replay(call, record, response_type)
        try:
            plan = await decide(reader)
        except ModelregError:
            if reader.fresh:
                raise
            fresh, known = True, None  # judged on cached data: judge again on fresh data
            continue
        writes = list(plan.writes)
        # Newest first in listings: the main event gets the decision's time, earlier ones a
        # nanosecond less each, so they sort just below it.
        events = [(unix_nanos, plan.audit)] + [
            (unix_nanos - 1 - i, e) for i, e in enumerate(plan.earlier_audit)]
        if plan.audit_key:
            writes.append(Put(plan.audit_key, plan.audit.SerializeToString()))
            events = events[1:]
        for nanos, audit in events:
            audit_key = keys.audit(nanos, random.getrandbits(32))
            audit.name = "auditEvents/" + audit_key.removeprefix(keys.AUDIT_START)
            audit.actor = call.actor
            audit.request_id = call.request_id
            audit.time.CopyFrom(reader.now)
            writes.append(Put(audit_key, audit.SerializeToString()))
        if request_key is not None:
            record_value = store_pb2.StoredRequest(
                method=call.method,
                fingerprint=call.fingerprint(),
                response=plan.response.SerializeToString(),
                time=reader.now,
            )
            writes.append(Put(request_key, record_value.SerializeToString(), ttl=REQUEST_TTL))
        result = await store.commit(
            reader.guards() + plan.guards, writes, refresh=reader.keys()
        )
        if result.succeeded:
            assert isinstance(plan.response, response_type)
            return stamp(plan.response, result.revision)
        fresh, known = True, result.fresh
    raise ContentionError(
        f"gave up after {MAX_ATTEMPTS} attempts: concurrent writers kept changing what "
        f"{call.method} reads; retry later"
    )


DEFAULT_REGION = "default"
"""The one region of a deployment without a topology (the server's ``region_name``)."""


class Operations:
    """Base of the operation groups: one store, one clock, and mutations run over both."""

    def __init__(
        self,
        store: ModelStore,
        clock: Callable[[], int] = time.time_ns,
        *,
        regions: Sequence[str] = (DEFAULT_REGION,),
    ) -> None:
        self._store = store
        self._clock = clock
        self._regions = tuple(regions)
        """The deployment's regions, in topology order: rollout policies may name these, and a
        policy naming none waits for all of them."""

    async def _mutate(self, call: Call, decide: Decide, response_type: type[R]) -> R:
        return await run_mutation(self._store, call, decide, response_type, clock=self._clock)
