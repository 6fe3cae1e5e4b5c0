"""``ModelStore`` and ``ChangeFeed`` in memory, with etcd's revision semantics: for unit tests.

Proof that a feature works comes from the tests against real etcd; this fake lets the
lifecycle and transaction logic be exercised fast and deterministically, including a cache
that lags (``lag_reads``), to show that stale reads can cost a retry but never correctness.
It keeps the revision contract of ``modelreg.server.domain.ports`` as etcd does, and
``tests/server/test_store_contract.py`` runs the same clauses against both: a commit that
changes nothing creates no revision, a commit needs a write and writes each key once, every
transaction is one ``Batch`` of the change feed, and compaction drops the deletions at the
compaction revision (etcd drops their tombstones). TTLs do not expire here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from modelreg.server.domain.ports import (
    Batch,
    Change,
    CommitResult,
    CompactedError,
    DeleteRange,
    Entry,
    Guard,
    Page,
    Progress,
    Put,
    RangeUnchanged,
    Snapshot,
    Unchanged,
    Write,
)


class MemoryStore:
    """A dict with a global revision, guarded transactions and a change log."""

    def __init__(self) -> None:
        self.revision = 1  # a new etcd cluster is at revision 1
        self.data: dict[str, Entry] = {}
        self.commits = 0
        self.failed_commits = 0
        self.stale: dict[str, Entry | None] = {}
        """Answers for non-fresh reads that differ from the truth: a lagging cache."""
        self.log: list[Batch] = []
        """Every change since ``compacted``, one batch per revision, for ``watch``."""
        self.compacted = 0
        """The last compaction revision: history before it is gone."""
        self._changed = asyncio.Event()

    async def read(self, keys: Sequence[str], *, fresh: bool) -> Snapshot:
        """Reads keys; non-fresh reads see ``stale`` where it has the key."""
        if not fresh:
            return Snapshot(
                {k: self.stale[k] if k in self.stale else self.data.get(k) for k in keys},
                0,
                fresh=False,
            )
        return Snapshot({k: self.data.get(k) for k in keys}, self.revision, fresh=True)

    async def scan(self, start: str, end: str, *, limit: int, reverse: bool = False) -> Page:
        """Reads part of a range in key order."""
        keys = sorted((k for k in self.data if start <= k < end), reverse=reverse)
        limit = limit or len(keys)
        return Page([self.data[k] for k in keys[:limit]], self.revision, len(keys) > limit)

    def _holds(self, guard: Guard) -> bool:
        if isinstance(guard, Unchanged):
            entry = self.data.get(guard.key)
            return (entry.mod_revision if entry else 0) == guard.mod_revision
        assert isinstance(guard, RangeUnchanged)
        return all(
            e.mod_revision <= guard.revision
            for k, e in self.data.items()
            if guard.start <= k < guard.end
        )

    @staticmethod
    def _check(writes: Sequence[Write]) -> None:
        """Refuses what etcd refuses: no writes (a read-only Txn), or a key written twice."""
        if not writes:
            raise ValueError("a commit needs at least one write")
        puts = [w.key for w in writes if isinstance(w, Put)]
        ranges = [w for w in writes if isinstance(w, DeleteRange)]
        if len(set(puts)) < len(puts) or any(r.start <= k < r.end for k in puts for r in ranges):
            raise ValueError("a commit writes each key at most once")

    async def commit(
        self, guards: Sequence[Guard], writes: Sequence[Write], *, refresh: Sequence[str] = ()
    ) -> CommitResult:
        """Applies writes at a new revision if every guard holds (none if nothing changed)."""
        self._check(writes)
        if not all(self._holds(g) for g in guards):
            self.failed_commits += 1
            return CommitResult(False, self.revision, await self.read(refresh, fresh=True))
        self.commits += 1
        revision = self.revision + 1
        changes: list[Change] = []
        for write in writes:
            if isinstance(write, Put):
                self.data[write.key] = Entry(write.key, write.value, revision)
                self.stale.pop(write.key, None)
                changes.append(Change(write.key, write.value))
            else:
                assert isinstance(write, DeleteRange)
                for key in sorted(k for k in self.data if write.start <= k < write.end):
                    del self.data[key]
                    changes.append(Change(key, None))
        self._record(revision, changes)
        return CommitResult(True, self.revision)

    async def put_ephemeral(self, key: str, value: bytes, ttl: int) -> int:
        """Puts the key; expiry is not modelled here (real leases are tested on etcd)."""
        del ttl
        revision = self.revision + 1
        self.data[key] = Entry(key, value, revision)
        self._record(revision, [Change(key, value)])
        return revision

    async def delete_ephemeral(self, key: str) -> tuple[int, bool]:
        """Deletes the key if present."""
        if key not in self.data:
            return self.revision, False
        revision = self.revision + 1
        del self.data[key]
        self._record(revision, [Change(key, None)])
        return revision, True

    async def wait_for(self, revision: int, *, timeout: float) -> int:  # noqa: ASYNC109
        """The current revision once it reaches ``revision``, or after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while self.revision < revision:
                    await self._changed.wait()
        except TimeoutError:
            pass
        return self.revision

    def _record(self, revision: int, changes: list[Change]) -> None:
        """Moves to ``revision`` if anything changed (as etcd does) and wakes the watches."""
        if not changes:
            return
        self.revision = revision
        self.log.append(Batch(revision, tuple(changes)))
        self._changed.set()
        self._changed = asyncio.Event()

    def compact(self, revision: int) -> None:
        """Forgets history before ``revision``, and the deletions at it, as etcd's compaction."""
        self.compacted = max(self.compacted, revision)
        kept = [b for b in self.log if b.revision >= self.compacted]
        if kept and kept[0].revision == self.compacted:
            puts = tuple(c for c in kept[0].changes if c.value is not None)
            kept[0:1] = [Batch(self.compacted, puts)] if puts else []
        self.log = kept

    # -- ChangeFeed -------------------------------------------------------------------------

    async def watch(
        self, start: str, end: str, from_revision: int
    ) -> AsyncIterator[Batch | Progress]:
        """Changes of ``[start, end)`` from ``from_revision`` on.

        Then a ``Progress`` at the current revision whenever every change up to it has been
        yielded and it moved past what was announced, as ``EtcdChangeFeed`` does on evidence.
        """
        seen = yielded = from_revision - 1  # last revision looked at / last batch yielded
        announced = 0
        while True:
            if seen + 1 < self.compacted:
                raise CompactedError(self.compacted)
            pending = [b for b in self.log if b.revision > seen]
            for batch in pending:
                seen = batch.revision
                picked = tuple(c for c in batch.changes if start <= c.key < end)
                if picked:
                    yielded = batch.revision
                    yield Batch(batch.revision, picked)
            if pending:
                continue  # the consumer may have committed more while we yielded
            if self.revision > max(announced, yielded):
                announced = self.revision
                yield Progress(announced)
            else:
                await self._changed.wait()

    async def latest(self, start: str, end: str) -> tuple[int, int]:
        """The last change of ``[start, end)`` (0 if the range is empty) and the revision."""
        in_range = [e.mod_revision for k, e in self.data.items() if start <= k < end]
        return max(in_range, default=0), self.revision
