"""The storage ports: what the domain needs from a key-value store with revisions.

The domain speaks etcd's model (keys, values, ``mod_revision``, one global revision, guarded
transactions) without importing an etcd client. ``modelreg.server.store.etcd.EtcdStore`` and
``etcd_watch.EtcdChangeFeed`` implement the ports for real; ``modelreg.server.store.memory
.MemoryStore`` implements both in memory for domain unit tests only.

What a revision is (the contract every adapter keeps)
-----------------------------------------------------

A deployment has one revision space: the revisions of the cluster where writes commit (one
etcd cluster today; with regions, the primary's). Every revision a port hands out is a
revision of that cluster, never a counter of the adapter or of a replica. That covers
``Entry.mod_revision`` (the domain's etags are these numbers, quoted), ``Snapshot.revision``,
``Page.revision``, ``CommitResult.revision``, ``Batch.revision``, ``Progress.revision`` and
``ChangeFeed.latest``. Every revision a port accepts (``Unchanged.mod_revision``,
``RangeUnchanged.revision``, ``from_revision``) is one too. So a revision or etag obtained
from any server of the deployment means the same thing to every other. Concretely:

1. **A commit's revision is its writes' revision.** A successful commit returns revision R.
   Every key it wrote then has ``mod_revision`` R, and a later fresh read (through any store
   of the deployment) shows the value with ``mod_revision`` R, read at a revision >= R.
2. **Revisions only grow.** Each successful commit that changes something gets a revision
   above every revision handed out before it. A commit that changes nothing (it only deletes
   absent keys) creates no revision and returns the current one. A fresh read, scan or
   ``latest`` never reports a revision below one this store has already returned, so a
   write is seen by the next read through the same store (read-your-writes).
3. **A read carries the revision it was read at.** All entries of a fresh ``Snapshot`` (or
   ``Page``) are as of its ``revision``: each ``mod_revision`` is <= it, and no later write
   is visible. A cached read (``fresh=False``) reports revision 0 and may be stale, but its
   entries still carry mod_revisions of that cluster, so a guard built from them fails when
   they are stale and never lets a wrong commit through.
4. **Guards compare against the committing cluster.** ``Unchanged(key, m)`` holds if and only
   if the key's ``mod_revision`` is ``m`` when the transaction commits (0: the key is absent).
   A stale etag therefore fails: nothing is written, no revision is created, and the result
   carries the current value of each ``refresh`` key, read in the same transaction.
5. **The change feed replays exactly.** ``watch(start, end, R)`` yields one ``Batch`` per
   revision >= R at which a key in the range changed, in revision order. Each batch holds
   exactly that revision's changes in the range (deletions as ``None``). Nothing below R is
   yielded, nothing twice. ``Progress(P)`` comes only after every change up to P. ``latest``
   gives the range's highest ``mod_revision`` and the revision it was read at.
6. **Compaction.** If R is below the compaction revision C, ``watch`` raises
   ``CompactedError(C)``, and the caller reloads a snapshot instead of skipping changes. From
   R = C exactly, etcd replays only the puts made at C: compaction drops the tombstones of
   deletions made at C, and no error says so. The stage hub is safe because stage pointers are
   never deleted (``keys``). A feed over keys that are deleted must treat R = C as compacted.

7. **Waiting for a revision.** ``wait_for(R)`` returns as soon as fresh reads are at or past
   R, with the revision they are at: at once for a revision the committing cluster handed
   out, through any store of it; otherwise when a commit (or, in a region, the replica)
   reaches R; or, at its bound, with the revision reached, below R.

An adapter that serves reads from somewhere else (a regional replica,
``modelreg.server.store.regional``) keeps all of this: it reports the primary revisions its
replica applied, never the replica's own revisions, and commits on the primary. After each of
its successful commits it waits (bounded) until the replica has applied it, so clauses 1 and 2
hold for what is written through the stores of one region; a revision learned elsewhere (from
the primary's servers, another region, a client) is waited for with ``wait_for`` (clause 7). A
failed commit's revision is the primary's, which the replica may not have applied yet.
``tests/server/test_store_contract.py`` checks these clauses against etcd (every build the
tests know) and against the fake; a new adapter gets a class there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Entry:
    """One key as the store holds it."""

    key: str
    """Key relative to the deployment's prefix."""
    value: bytes
    mod_revision: int
    """Revision of the commit that last wrote this key, in the committing cluster's revision
    space: the etag of the resource it holds."""


@dataclass(frozen=True)
class Snapshot:
    """Keys as read at one revision. A key read but absent maps to ``None``."""

    entries: Mapping[str, Entry | None]
    revision: int
    """The revision the read reflects: every entry is as of it (0 if unknown, when served
    from the server's cache)."""
    fresh: bool
    """True when read from the store itself; False when served from the server's cache."""

    def get(self, key: str) -> Entry | None:
        """The entry under ``key``; ``KeyError`` if the key was not part of the read."""
        return self.entries[key]

    def mod_revision(self, key: str) -> int:
        """The key's mod_revision, 0 when absent (etcd's convention for compares)."""
        entry = self.entries[key]
        return entry.mod_revision if entry is not None else 0


@dataclass(frozen=True)
class Page:
    """Part of a key range, in key order (or reverse key order)."""

    entries: Sequence[Entry]
    revision: int
    """The revision the page was read at."""
    more: bool
    """True when the range holds keys past the last one returned."""


@dataclass(frozen=True)
class Unchanged:
    """Guard: the key's mod_revision is still ``mod_revision`` (0: the key still does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class RangeUnchanged:
    """Guard: no key in ``[start, end)`` was created or written after ``revision``."""

    start: str
    end: str
    revision: int


Guard = Unchanged | RangeUnchanged


@dataclass(frozen=True)
class Put:
    """Write ``value`` under ``key``."""

    key: str
    value: bytes
    ttl: int = 0
    """Seconds after which the store may delete the key (at least this long); 0 keeps it."""


@dataclass(frozen=True)
class DeleteRange:
    """Delete every key in ``[start, end)``."""

    start: str
    end: str


Write = Put | DeleteRange


@dataclass(frozen=True)
class CommitResult:
    """Outcome of a guarded transaction."""

    succeeded: bool
    revision: int
    """On success, the revision of the transaction: every key written has it as mod_revision
    (the current revision if the transaction changed nothing). On failure, the revision the
    guards were checked at, at which ``fresh`` was read."""
    fresh: Snapshot | None = field(default=None)
    """On failure, the current state of every key the caller asked to refresh, read in the same
    round trip, so a retry needs no extra read."""


class ModelStore(Protocol):
    """A revisioned key-value store with guarded multi-key transactions (etcd's contract)."""

    async def read(self, keys: Sequence[str], *, fresh: bool) -> Snapshot:
        """Reads ``keys`` at one revision.

        With ``fresh=False`` the store may answer from a cache that can lag behind; callers
        must then guard every key they rely on, so a stale answer can only fail a commit,
        never let a wrong one through.
        """
        ...

    async def scan(self, start: str, end: str, *, limit: int, reverse: bool = False) -> Page:
        """Reads up to ``limit`` keys (0: all) of ``[start, end)`` at one revision, fresh."""
        ...

    async def commit(
        self, guards: Sequence[Guard], writes: Sequence[Write], *, refresh: Sequence[str] = ()
    ) -> CommitResult:
        """Applies ``writes`` atomically if every guard holds, in one round trip.

        If a guard fails nothing is written, and the result carries a fresh read of
        ``refresh`` taken in the same transaction. ``writes`` must not be empty (etcd would
        run a read-only Txn) and must write each key at most once (etcd refuses a key put
        twice, or put and deleted, in one Txn); adapters raise rather than guess.
        """
        ...

    async def put_ephemeral(self, key: str, value: bytes, ttl: int) -> int:
        """Writes a key that vanishes ``ttl`` seconds after the last write to it.

        For presence (serving nodes): no guard, no audit. Returns the revision.
        """
        ...

    async def delete_ephemeral(self, key: str) -> tuple[int, bool]:
        """Deletes a key written by ``put_ephemeral`` now, rather than when its lease expires.

        Returns the revision and whether the key existed.
        """
        ...

    async def wait_for(self, revision: int, *, timeout: float) -> int:  # noqa: ASYNC109
        """Waits until fresh reads reflect every change up to ``revision``, for ``timeout`` s.

        Returns the revision fresh reads are at now (what a fresh ``read([])`` reports): at
        least ``revision`` when it was reached, below it when ``timeout`` passed first (the
        caller then says how far the store got). Returns at once when the store is at or past
        ``revision`` already (always for ``revision`` <= 0). A store over the committing
        cluster is past every revision it handed out, so it waits only for one it has not
        reached yet (another writer's); a regional store waits for its replica to apply it.
        This is read-your-writes across regions (``x-modelreg-min-revision``). (A bound
        rather than ``asyncio.timeout`` around it, because the revision reached is the answer
        either way.)

        Raises:
            UnavailableError: The store cannot be reached.

        """
        ...


@dataclass(frozen=True)
class Change:
    """One key changed by a transaction: its new value, or ``None`` if deleted."""

    key: str
    value: bytes | None


@dataclass(frozen=True)
class Batch:
    """Every change one etcd transaction made to a watched range."""

    revision: int
    """The transaction's revision: the ``mod_revision`` of each key it put."""
    changes: tuple[Change, ...]


@dataclass(frozen=True)
class Progress:
    """Proof that every change up to ``revision`` has been delivered.

    Not a bare etcd progress notification, which older etcd releases send ahead of events
    still queued (etcd issue 15220): an adapter yields it only on evidence.
    """

    revision: int


class CompactedError(Exception):
    """The revision to watch from was compacted away; reload a snapshot instead."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revisions before {compact_revision} were compacted")
        self.compact_revision = compact_revision


class ChangeFeed(Protocol):
    """Ordered changes of a key range, from a revision on (etcd's watch)."""

    def watch(self, start: str, end: str, from_revision: int) -> AsyncIterator[Batch | Progress]:
        """Yields batches in revision order and progress marks, until cancelled.

        Raises ``CompactedError`` if ``from_revision`` is no longer in the store's history and
        ``UnavailableError`` if the store cannot be reached or stops answering.
        """
        ...

    async def latest(self, start: str, end: str) -> tuple[int, int]:
        """The revision of the last change in ``[start, end)`` and the revision it was read at.

        A follower that has applied the change at the first number has seen every change of
        the range up to the second (the range's keys are never deleted), so it may take the
        second as its own revision: the proof behind ``Progress`` and fresh snapshots.
        """
        ...


@dataclass(frozen=True)
class ReplicationLag:
    """How far a region's store is behind the committing cluster, as its replicator measured."""

    revisions: int
    """Revisions of the committing cluster heard of but not applied."""
    seconds: float
    """Seconds behind; includes the age of the figures once they are overdue."""
    primary_revision: int
    """The newest revision of the committing cluster the replicator had heard of."""
    written_ms: int
    """When the figures were written, Unix milliseconds (the replicator's clock); 0: now."""
    current: bool
    """Whether the figures are renewed on time (a replicator is applying)."""


class LagSource(Protocol):
    """A region's replication lag (the replicator's status record, or zero in the primary)."""

    async def lag(self) -> ReplicationLag | None:
        """The latest figures, or None when none are known (no replicator has reported).

        Raises:
            UnavailableError: The store holding the figures cannot be reached.

        """
        ...


@dataclass(frozen=True)
class LocalChange:
    """A region-local key as its region's etcd holds it (or deleted: ``value`` None).

    ``position`` orders the region's own writes: an opaque number that is no revision of the
    deployment. It stays inside the server (a watch of the region-local keys resumes from it)
    and never reaches a client, whose revisions are the primary's only.
    """

    key: str
    value: bytes | None
    position: int


@dataclass(frozen=True)
class LocalRead:
    """Region-local keys of a range, read at one position of the region's etcd."""

    entries: Sequence[LocalChange]
    position: int
    """The position of the read: every change of the range up to it is in ``entries``."""
    applied: int
    """The primary revision the region had applied at the read."""


class LocalStore(Protocol):
    """The keys only a region's own etcd holds: its break-glass pins and their audit events.

    Written by the region's servers, never replicated, and reachable with the primary down:
    a guarded Txn in the regional etcd, as every mutation is, but compared on values (a
    region-local key has no primary revision to compare).
    """

    region: str
    """The region (``eu``) whose etcd this is."""

    async def read_local(self, start: str, end: str) -> LocalRead:
        """Every region-local key of ``[start, end)``, in key order, at one position.

        Raises:
            UnavailableError: The region's etcd cannot be read (or holds no replica yet).

        """
        ...

    async def commit_local(
        self, expect: Mapping[str, bytes | None], writes: Sequence[Put]
    ) -> int | None:
        """Puts ``writes`` if every key of ``expect`` still holds that value (None: absent).

        One Txn in the region's etcd. Returns the primary revision the region had applied at
        the commit, or None when a guard failed (nothing written).
        """
        ...

    def watch_local(
        self, start: str, end: str, from_position: int
    ) -> AsyncIterator[list[LocalChange]]:
        """The changes of ``[start, end)`` after ``from_position``, one list per Txn, in order.

        Raises ``CompactedError`` when the region's etcd no longer has them (read again) and
        ``UnavailableError`` when it cannot be reached or stops answering.
        """
        ...
