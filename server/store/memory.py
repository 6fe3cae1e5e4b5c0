"""``ModelStore`` in memory, with etcd's revision semantics: for domain unit tests only.

Proof that a feature works comes from the tests against real etcd; this fake lets the
lifecycle and transaction logic be exercised fast and deterministically, including a cache
that lags (``lag_reads``), to show that stale reads can cost a retry but never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence

from modelreg.server.domain.ports import (
    CommitResult,
    DeleteRange,
    Entry,
    Guard,
    Page,
    Put,
    RangeUnchanged,
    Snapshot,
    Unchanged,
    Write,
)


class MemoryStore:
    """A dict with a global revision and guarded transactions."""

    def __init__(self) -> None:
        self.revision = 1
        self.data: dict[str, Entry] = {}
        self.commits = 0
        self.failed_commits = 0
        self.stale: dict[str, Entry | None] = {}
        """Answers for non-fresh reads that differ from the truth: a lagging cache."""

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

    async def commit(
        self, guards: Sequence[Guard], writes: Sequence[Write], *, refresh: Sequence[str] = ()
    ) -> CommitResult:
        """Applies writes at a new revision if every guard holds."""
        if not all(self._holds(g) for g in guards):
            self.failed_commits += 1
            return CommitResult(False, self.revision, await self.read(refresh, fresh=True))
        self.revision += 1
        self.commits += 1
        for write in writes:
            if isinstance(write, Put):
                self.data[write.key] = Entry(write.key, write.value, self.revision)
                self.stale.pop(write.key, None)
            else:
                assert isinstance(write, DeleteRange)
                for key in [k for k in self.data if write.start <= k < write.end]:
                    del self.data[key]
        return CommitResult(True, self.revision)

    async def put_ephemeral(self, key: str, value: bytes, ttl: int) -> int:
        """Puts the key; expiry is not modelled here (real leases are tested on etcd)."""
        del ttl
        self.revision += 1
        self.data[key] = Entry(key, value, self.revision)
        return self.revision

    async def delete_ephemeral(self, key: str) -> tuple[int, bool]:
        """Deletes the key if present."""
        if key not in self.data:
            return self.revision, False
        self.revision += 1
        del self.data[key]
        return self.revision, True
