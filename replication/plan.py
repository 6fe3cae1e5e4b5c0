"""Which primary revisions go into the next regional commit (pure: no I/O).

A regional commit is one etcd Txn: the changes of one or more consecutive primary revisions,
plus the new :class:`~modelreg.replication.layout.State`. It has to respect the regional etcd's
limits (``--max-txn-ops``, 128 by default, and ``--max-request-bytes``, 1.5 MiB) and the layout's
promises to readers:

* a key appears at most once per commit (etcd refuses duplicates, and folding two changes of a
  key into one would hide a primary revision from regional watchers);
* a commit ends after a primary revision that deletes (a delete carries no envelope, so readers
  attribute it to the commit's applied revision, which must therefore be that revision).

A single primary revision too large for one commit is reported as such (``0``): the replicator
then builds a new generation for it (``Kind.SWITCHED``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from modelreg.replication.layout import ENVELOPE_OVERHEAD, Envelope

OP_OVERHEAD = 32
"""Bytes of protobuf framing counted per operation, on top of its key and value."""


@dataclass(frozen=True)
class Limits:
    """What one regional Txn may hold."""

    max_ops: int = 128
    """etcd's ``--max-txn-ops`` on the regional cluster."""
    max_bytes: int = 1_000_000
    """Bytes of keys and values per Txn: below etcd's 1.5 MiB ``--max-request-bytes``, leaving
    room for the guards and the state."""


@dataclass(frozen=True)
class KeyChange:
    """One key's change in a primary revision."""

    key: bytes
    """The key relative to the primary prefix ``P``."""
    envelope: Envelope | None
    """The new value with its primary revisions; None when the key was deleted."""


@dataclass(frozen=True)
class Revision:
    """The replicated changes of one primary revision, in the primary's order.

    Possibly none: a revision that touched only region-local keys still moves the applied
    revision.
    """

    revision: int
    changes: tuple[KeyChange, ...]
    received: float = 0.0
    """When the replicator heard of it (its event loop's clock): the start of its lag."""

    @property
    def deletes(self) -> bool:
        """Whether it deletes a replicated key."""
        return any(c.envelope is None for c in self.changes)


def change_bytes(change: KeyChange, key_overhead: int) -> int:
    """Bytes a change costs in a regional request.

    ``key_overhead`` is the regional key's extra length: the generation's data prefix.
    """
    size = len(change.key) + key_overhead + OP_OVERHEAD
    if change.envelope is not None:
        size += len(change.envelope.value) + ENVELOPE_OVERHEAD
    return size


def next_commit(pending: Sequence[Revision], limits: Limits, key_overhead: int) -> int:
    """How many of the ``pending`` revisions (in order) the next commit takes.

    0 means the first one alone exceeds the limits. One operation is kept for the state.
    """
    ops, size, n = 1, 0, 0
    keys: set[bytes] = set()
    for revision in pending:
        these = {c.key for c in revision.changes}
        cost = sum(change_bytes(c, key_overhead) for c in revision.changes)
        if (ops + len(revision.changes) > limits.max_ops or size + cost > limits.max_bytes
                or not keys.isdisjoint(these)):
            break
        ops, size, n = ops + len(revision.changes), size + cost, n + 1
        keys |= these
        if revision.deletes:
            break
    return n


def chunks(
    items: Iterable[tuple[bytes, bytes]], limits: Limits
) -> Iterator[list[tuple[bytes, bytes]]]:
    """Key-value puts cut into groups that each fit one Txn.

    One operation is kept spare; a single item over the byte budget goes alone (etcd decides).
    """
    group: list[tuple[bytes, bytes]] = []
    size = 0
    for key, value in items:
        cost = len(key) + len(value) + OP_OVERHEAD
        if group and (len(group) + 1 >= limits.max_ops or size + cost > limits.max_bytes):
            yield group
            group, size = [], 0
        group.append((key, value))
        size += cost
    if group:
        yield group
