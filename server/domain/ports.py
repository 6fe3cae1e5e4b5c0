"""The storage port: what the domain needs from a key-value store with revisions.

The domain speaks etcd's model (keys, values, ``mod_revision``, one global revision, guarded
transactions) without importing an etcd client. ``modelreg.server.store.etcd.EtcdStore``
implements it for real; ``modelreg.server.store.memory.MemoryStore`` implements it in memory
for domain unit tests only.
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
    """Revision of the last write to this key: the etag of the resource it holds."""


@dataclass(frozen=True)
class Snapshot:
    """Keys as read at one revision. A key read but absent maps to ``None``."""

    entries: Mapping[str, Entry | None]
    revision: int
    """The store revision the read reflects (0 if unknown, e.g. served from a cold cache)."""
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
    """On success, the revision of the transaction: every key written has it as mod_revision."""
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
        ``refresh`` taken in the same transaction.
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


@dataclass(frozen=True)
class Change:
    """One key changed by a transaction: its new value, or ``None`` if deleted."""

    key: str
    value: bytes | None


@dataclass(frozen=True)
class Batch:
    """Every change one etcd transaction made to a watched range."""

    revision: int
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
