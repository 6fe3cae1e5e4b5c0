"""The replicated keyspace of a regional etcd: where each thing lives and how it is encoded.

Pure (no etcd client, no I/O): the replicator (:mod:`modelreg.replication.agent`) writes this
layout and a regional store adapter reads it, so both sides agree on one page. All keys and
values are bytes. ``P`` is the deployment prefix on the primary (``--prefix``, e.g.
``/modelreg/``); ``R`` is the regional deployment prefix (``--region-prefix``, by default ``P``).

=========================================  ====================================================
regional key                               value
=========================================  ====================================================
``R + "replica/state"``                    :class:`State`: current generation, applied primary
                                           revision, what the last write was
``R + "replica/g/{gen:016x}/" + K``        :class:`Envelope` of the primary key ``P + K`` (its
                                           value, ``mod_revision``, ``create_revision``,
                                           ``version``) as of the applied revision
``R + "replica/g/{gen:016x}"``             a generation under construction (its builder's
                                           token); deleted by the switch to that generation
``R + "replica/leader"``                   id of the replica that applies, on its lease
``R + "replica/status"``                   :class:`Status`: the leader's lag figures, renewed
                                           every few seconds
``R + K`` for ``K`` in ``LOCAL_FAMILIES``  region-local keys (serving node reports, break-glass
                                           pins and their audit events): never replicated,
                                           written by the regional servers
=========================================  ====================================================

Only the replicator writes under ``R + "replica/"``. ``K`` keeps the primary's key schema
(``modelreg.server.domain.keys``): a reader maps a range ``[P + a, P + b)`` to
``[data_prefix(R, gen) + a, data_prefix(R, gen) + b)``.

**Reading.** (1) Range ``state_key(R)``; its response header gives a regional revision ``r``.
No state yet means the region has not finished its first copy: answer ``UNAVAILABLE``. (2)
Range the data under ``data_prefix(R, state.generation)`` *with* ``revision=r``: the pair is one
consistent cut, because a generation is never changed in place except by the same Txn that
rewrites the state. (3) Report ``state.applied`` as the revision of the answer: it is the
primary's revision, and every key's etag is its envelope's ``mod_revision``. (Use two Ranges, not
a read-only Txn: etcd 3.5.0-3.5.4 can panic on a cancelled read-only Txn, etcd issue 14110.)

**Watching** (watch ``[R + "replica/", prefix_end(R + "replica/"))`` and group events by regional
revision). A regional revision that puts the state key is one replicator commit; ignore every
other revision (builds of a new generation, garbage collection, leader and status keys). Decode
the state and, by its ``kind``:

* ``APPLIED``: the data events of the current generation in that regional revision are primary
  changes, in place. Puts carry their primary revision in the envelope (several consecutive
  primary revisions may share one regional revision: regroup puts by ``mod_revision``); every
  delete belongs to ``state.applied``, the last primary revision of the commit (the replicator
  ends a commit after any primary revision that deletes). No key appears twice in one commit,
  so no primary change is ever folded into another.
* ``SWITCHED``: one primary revision too large for one regional Txn. The new generation equals
  the previous one (``state.previous_generation``) plus exactly the changes of ``state.applied``:
  its puts are the keys whose envelope ``mod_revision == state.applied``, its deletes the keys of
  the previous generation absent from the new one (read both generations at the switch's
  regional revision: the previous one is deleted only by a later Txn).
* ``RESYNCED``: the new generation is a snapshot of the primary at ``state.applied`` (after a
  compaction, or the region's first copy); the changes in between are not known one by one, so
  a watch stream resuming across it starts over from a snapshot flagged as a reset.

**Progress.** Once a watcher has handled the regional revision that wrote a state, it has seen
every primary change up to ``state.applied``: that is its bookmark, with no need of etcd's
progress notifications; and a read that asks for a minimum primary revision waits for a state
with ``applied`` at or above it (watch ``state_key(R)``). ``applied`` moves past every primary
revision that touched ``P`` (those that changed only region-local keys too, within
``idle_flush``), but not past revisions of other deployments sharing the primary cluster: a
minimum revision taken from such a revision is reached only with this deployment's next write.

Generations only grow; a switch never skips a primary revision a reader could see, and an old
generation is deleted only after the switch, so a read at a revision before the switch still
finds it (until the regional etcd compacts that revision).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

LOCAL_FAMILIES: tuple[bytes, ...] = (b"nodes/", b"requests/", b"pins/", b"localaudit/")
"""Key families under ``P`` that never leave their region: serving node reports and idempotency
records live on leases that cannot cross clusters, and a region's node reports describe that
region only (a request record matters only where the mutation committed, the primary). A
region's break-glass pins and their audit events are its own by definition: written with the
primary unreachable, in the region's etcd (they reach the primary as reported audit events)."""

REPLICA = b"replica/"
"""The replicator's own subtree under ``R``; every other key under ``R`` is region-local."""

GENERATION_DIGITS = 16
"""Generations are fixed-width hex, so one generation's range never covers another's."""


def is_replicated(key: bytes) -> bool:
    """Whether the primary key ``P + key`` (``key`` relative to ``P``) is copied to regions."""
    return not key.startswith(LOCAL_FAMILIES)


def prefix_end(prefix: bytes) -> bytes:
    """The end of the range of keys starting with ``prefix`` (etcd's ``range_end``)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # etcd: every key from the start


def replicated_ranges(primary_prefix: bytes) -> list[tuple[bytes, bytes]]:
    """The ``[start, end)`` ranges of the primary to replicate: ``P`` minus local families.

    In key order: what a snapshot reads.
    """
    ranges: list[tuple[bytes, bytes]] = []
    start = primary_prefix
    for family in sorted(LOCAL_FAMILIES):
        local = primary_prefix + family
        if start < local:
            ranges.append((start, local))
        start = max(start, prefix_end(local))
    end = prefix_end(primary_prefix)
    if start < end:
        ranges.append((start, end))
    return ranges


# -- keys ------------------------------------------------------------------------------------


def replica_root(region_prefix: bytes) -> bytes:
    """``R + "replica/"``: everything the replicator writes."""
    return region_prefix + REPLICA


def state_key(region_prefix: bytes) -> bytes:
    """The key of the region's :class:`State`."""
    return region_prefix + REPLICA + b"state"


def leader_key(region_prefix: bytes) -> bytes:
    """The election key: the applying replica's id, on its lease."""
    return region_prefix + REPLICA + b"leader"


def status_key(region_prefix: bytes) -> bytes:
    """The key of the leader's :class:`Status`."""
    return region_prefix + REPLICA + b"status"


def generations_root(region_prefix: bytes) -> bytes:
    """The prefix of every generation."""
    return region_prefix + REPLICA + b"g/"


def generation_key(region_prefix: bytes, generation: int) -> bytes:
    """The build marker of a generation; as a prefix, it covers the marker and all its data."""
    return generations_root(region_prefix) + b"%0*x" % (GENERATION_DIGITS, generation)


def data_prefix(region_prefix: bytes, generation: int) -> bytes:
    """The prefix of a generation's copies of the primary keys."""
    return generation_key(region_prefix, generation) + b"/"


def regional_key(region_prefix: bytes, generation: int, key: bytes) -> bytes:
    """Where the primary key ``P + key`` lives in ``generation``."""
    return data_prefix(region_prefix, generation) + key


def primary_key(region_prefix: bytes, generation: int, regional: bytes) -> bytes:
    """The inverse of :func:`regional_key`: ``key`` relative to ``P``."""
    head = data_prefix(region_prefix, generation)
    if not regional.startswith(head):
        raise ValueError(f"{regional!r} is not a key of generation {generation}")
    return regional[len(head):]


def other_generations(region_prefix: bytes, generation: int) -> list[tuple[bytes, bytes]]:
    """The ``[start, end)`` ranges holding every generation except ``generation``."""
    root = generations_root(region_prefix)
    own = generation_key(region_prefix, generation)
    return [(root, own), (prefix_end(own), prefix_end(root))]


# -- values ----------------------------------------------------------------------------------

_ENVELOPE = struct.Struct(">Bqqq")
_ENVELOPE_FORMAT = 1


@dataclass(frozen=True)
class Envelope:
    """A primary key's value with the primary's revisions of it: the regional value.

    Encoded as a 25-byte header (format byte 1, then ``mod_revision``, ``create_revision`` and
    ``version`` as big-endian signed 64-bit integers) followed by the primary's value bytes,
    unchanged. (A fixed header rather than a protobuf message: it costs no schema, and the lead
    may move it into ``protos/`` later without changing the layout around it.)
    """

    value: bytes
    """The primary's value, byte for byte."""
    mod_revision: int
    """The primary revision of the key's last change: its etag in every region."""
    create_revision: int
    """The primary revision that created the key."""
    version: int
    """How many times the key was written since it was created (etcd's ``version``)."""

    def encode(self) -> bytes:
        """The regional value."""
        header = _ENVELOPE.pack(
            _ENVELOPE_FORMAT, self.mod_revision, self.create_revision, self.version
        )
        return header + self.value

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        """Parses a regional value; ``ValueError`` if it is none."""
        if len(data) < _ENVELOPE.size or data[0] != _ENVELOPE_FORMAT:
            raise ValueError("not a replicated value (bad envelope header)")
        _, mod, create, version = _ENVELOPE.unpack_from(data)
        return cls(bytes(data[_ENVELOPE.size:]), mod, create, version)


ENVELOPE_OVERHEAD = _ENVELOPE.size
"""Bytes an envelope adds to a value."""


class Kind(enum.IntEnum):
    """What the commit that wrote a :class:`State` did (see the module docstring)."""

    APPLIED = 1
    """Primary revisions applied in place to the current generation."""
    SWITCHED = 2
    """A new generation: the previous one plus exactly the changes of the applied revision."""
    RESYNCED = 3
    """A new generation copied from a primary snapshot at the applied revision."""


_STATE = struct.Struct(">BQqBQ")
_STATE_FORMAT = 1


@dataclass(frozen=True)
class State:
    """The region's replication state: the current generation and the applied revision.

    Encoded as 26 bytes: format byte 1, ``generation`` (unsigned 64-bit), ``applied``
    (signed 64-bit), ``kind`` (one byte), ``previous_generation`` (unsigned 64-bit), big-endian.

    Every replicator commit compares the stored bytes with what it last read and writes the
    next state in the same Txn: a primary revision is applied exactly once, and a replica that
    lost its leadership without knowing it fails its next commit.
    """

    generation: int
    """The generation readers read (``data_prefix(R, generation)``)."""
    applied: int
    """The primary revision every replicated key is up to date with; the revision a regional
    read reports."""
    kind: Kind
    """What the commit that wrote this state did."""
    previous_generation: int
    """The generation before a switch; equal to ``generation`` after ``APPLIED``."""

    def encode(self) -> bytes:
        """The stored bytes (the replicator's guard compares them)."""
        return _STATE.pack(_STATE_FORMAT, self.generation, self.applied, int(self.kind),
                           self.previous_generation)

    @classmethod
    def decode(cls, data: bytes) -> State:
        """Parses the stored bytes; ``ValueError`` if they are no state."""
        if len(data) != _STATE.size or data[0] != _STATE_FORMAT:
            raise ValueError("not a replication state")
        _, generation, applied, kind, previous = _STATE.unpack(data)
        return cls(generation, applied, Kind(kind), previous)


_STATUS = struct.Struct(">BqqqqI")
_STATUS_FORMAT = 1


@dataclass(frozen=True)
class Status:
    """The leader's lag figures, renewed every few seconds.

    A regional server answers "how stale is this region" from it without talking to the
    replicator process. Encoded as a 37-byte header (format
    byte 1; ``applied``, ``primary_revision``, ``lag_ms``, ``written_ms`` as signed 64-bit and
    ``interval_ms`` as unsigned 32-bit, big-endian) followed by the UTF-8 ``replica`` id.
    """

    replica: str
    """The id of the replica that wrote it (the leader at that time)."""
    applied: int
    """The applied primary revision when written."""
    primary_revision: int
    """The newest primary revision the replicator had heard of."""
    lag_ms: int
    """Replication lag in milliseconds as the replicator measured it."""
    written_ms: int
    """When it was written, Unix time in milliseconds (the replicator's clock)."""
    interval_ms: int
    """How often the leader renews it."""

    def encode(self) -> bytes:
        """The stored bytes."""
        return _STATUS.pack(_STATUS_FORMAT, self.applied, self.primary_revision, self.lag_ms,
                            self.written_ms, self.interval_ms) + self.replica.encode()

    @classmethod
    def decode(cls, data: bytes) -> Status:
        """Parses the stored bytes; ``ValueError`` if they are no status."""
        if len(data) < _STATUS.size or data[0] != _STATUS_FORMAT:
            raise ValueError("not a replication status")
        _, applied, head, lag, written, interval = _STATUS.unpack_from(data)
        return cls(data[_STATUS.size:].decode(), applied, head, lag, written, interval)

    def seconds_behind(self, now_ms: int) -> float:
        """The region's lag in seconds at ``now_ms`` (Unix milliseconds).

        The measured lag, plus the age of this record once it is overdue (two intervals),
        since then nobody is applying. The clocks of the two hosts are assumed close.
        """
        age = max(0, now_ms - self.written_ms)
        overdue = age > 2 * self.interval_ms
        return (self.lag_ms + (age if overdue else 0)) / 1000
