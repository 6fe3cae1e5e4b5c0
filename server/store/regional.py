"""``ModelStore`` of a regional server: reads from the region's replica, commits on the primary.

A region's etcd holds a copy of the primary's keyspace that the replicator
(:mod:`modelreg.replication`) keeps in the layout of :mod:`modelreg.replication.layout`, each value
wrapped with the primary's revisions of it. This store serves the domain's ports over two
connections, and only ever speaks primary revisions (the "one revision space" of the ports):

================================  ===========================================================
keys (relative to the prefix)     where they are read and written
================================  ===========================================================
replicated (all but the below)    read from the region's current generation at one cut: the
                                  revision of a read is the applied primary revision, each
                                  key's ``mod_revision`` its envelope's; written by commits on
                                  the **primary**, unchanged (guards compare primary revisions,
                                  which is what the envelopes carry)
``nodes/`` (``REGION_HELD``)      region-local, in the regional etcd at ``R + K`` with their
                                  leases (serving node reports): written by ``put_ephemeral``
                                  and read in the same cut as the replica; they have no primary
                                  revision, so they are reported as of the cut (``mod_revision``
                                  = its applied revision). Commits may not touch them.
``pins/``, ``localaudit/``        break glass: region-local too, written only through
(``REGION_HELD``)                 ``local`` (:mod:`~modelreg.server.store.regional_local`)
``requests/`` (``PRIMARY_HELD``)  idempotency records: local to the primary, where the mutation
                                  engine writes them in the mutation's own Txn, so they are
                                  read there too (a retried request finds its first answer)
================================  ===========================================================

**Read-your-writes.** A successful commit (or ephemeral write of a replicated key) returns only
once the region has applied it, bounded by ``wait_timeout``: then every server of the region
sees it. If the region does not get there in time the commit is still returned (it is durable
on the primary) and a warning is logged; a caller that must not go on without it calls
``wait_applied``, which raises. A fresh read is answered at the region's applied revision,
never below one the region reported before (applied revisions only grow); a read of
``requests/`` keys newer than the cut waits for the region to reach them, so one answer is one
revision. A failed commit returns the primary's result as is, once the region holds the
refreshed values it carries: its revision is the one the guards were checked at, which the
region reaches only with its next write of this deployment if it was another deployment's
(several may share a primary cluster; ``applied`` moves only with this one's revisions).

The change feed over the same replica is :class:`~modelreg.server.store.regional_feed.
RegionalChangeFeed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aetcd import rpc

from modelreg.replication import layout
from modelreg.replication.errors import Compacted
from modelreg.replication.etcd import Etcd
from modelreg.server.domain.errors import UnavailableError
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
from modelreg.server.store.etcd import EtcdStore
from modelreg.server.store.regional_keys import REGION_HELD, Source, segments, source
from modelreg.server.store.regional_local import RegionLocal
from modelreg.server.store.regional_replica import Cut, Replica, unavailable

log = structlog.get_logger(__name__)

CUT_ATTEMPTS = 5
"""Cuts a read takes before giving up: a new one when the regional etcd compacted the last one
meanwhile, or after waiting for the region to reach a ``requests/`` record read on the primary."""


class _Behind(Exception):
    """A primary-held key is newer than the cut: wait for the region to reach it, then redo."""

    def __init__(self, revision: int) -> None:
        super().__init__(revision)
        self.revision = revision


class RegionalStore:
    """The ``ModelStore`` of a regional server (see the module docstring)."""

    def __init__(
        self,
        primary: Sequence[str],
        region: Sequence[str],
        prefix: str,
        *,
        region_prefix: str = "",
        region_name: str = "",
        timeout: float = 5.0,
        wait_timeout: float = 10.0,
        primary_username: str | None = None,
        primary_password: str | None = None,
        region_username: str | None = None,
        region_password: str | None = None,
    ) -> None:
        """Connects lazily to both clusters.

        Args:
            primary: the primary etcd's endpoints (``HOST:PORT``), where commits go.
            region: this region's etcd endpoints, which the replicator fills.
            prefix: the deployment's key prefix on the primary (``P``).
            region_prefix: its prefix in the regional etcd (``R``); empty means ``prefix``,
                as for the replicator (``AgentConfig.region_prefix``).
            region_name: the region's name, for error messages.
            timeout: deadline of each etcd call, seconds.
            wait_timeout: how long a commit waits for the region to apply it, and the default
                bound of ``wait_for``, seconds.
            primary_username: etcd user on the primary (its password below).
            primary_password: the primary user's password.
            region_username: etcd user on the regional cluster (its password below).
            region_password: the regional user's password.
        """
        self.prefix = prefix
        self.primary = EtcdStore(primary, prefix, timeout=timeout, username=primary_username,
                                 password=primary_password)
        """The primary's store: commits and ``requests/``."""
        etcd = Etcd(region, timeout=timeout, username=region_username, password=region_password)
        self.replica = Replica(etcd, (region_prefix or prefix).encode(), region_name)
        """The regional etcd as the replicator's layout reads it (the change feed uses it)."""
        self.local = RegionLocal(self.replica)
        """The keys only this region's etcd holds: break-glass pins and their audit."""
        self.wait_timeout = wait_timeout

    @property
    def endpoint(self) -> str:
        """The regional etcd endpoint in use."""
        return self.replica.etcd.endpoint

    async def close(self) -> None:
        """Closes both connections; the store reconnects if used again."""
        await self.replica.close()
        await self.primary.close()

    async def server_version(self) -> str:
        """The etcd release of the regional member in use, "" if it is unreachable."""
        try:
            client = await self.replica.etcd.client()
            status = await client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=self.replica.etcd.timeout, metadata=client.metadata)
        except Exception:  # a probe: any failure means "unknown"
            return ""
        return str(status.version)

    # -- read-your-writes -------------------------------------------------------------------

    async def wait_applied(
        self, revision: int, *, timeout: float | None = None  # noqa: ASYNC109 - a bound, whose
    ) -> int:  # error names the revision reached (asyncio.timeout could not)
        """Returns the region's applied revision once it is at or above ``revision``.

        Raises ``UnavailableError`` after ``timeout`` seconds (default ``wait_timeout``); its
        message and its metadata (``applied_revision``, ``revision``, ``region``) name the
        revision the region had applied.
        """
        return await self.replica.wait_for(
            revision, self.wait_timeout if timeout is None else timeout)

    async def wait_for(self, revision: int, *, timeout: float) -> int:  # noqa: ASYNC109
        """The port's wait (clause 7): the applied revision, below ``revision`` at the bound.

        Raises ``UnavailableError`` only if the regional etcd cannot be read at all; a region
        that is merely behind answers with what it has, and the caller decides (the server's
        minimum-revision check turns it into REVISION_NOT_YET_APPLIED).
        """
        try:
            return await self.wait_applied(revision, timeout=timeout)
        except UnavailableError:
            return (await self.replica.cut()).applied

    async def state(self) -> layout.State:
        """The region's replication state now; ``UnavailableError`` before its first copy."""
        return (await self.replica.cut()).state

    async def status(self) -> layout.Status | None:
        """The replicator leader's last lag record (None if none was written yet)."""
        with unavailable(self.replica.etcd):
            kv, _ = await self.replica.etcd.get(layout.status_key(self.replica.prefix))
        return layout.Status.decode(bytes(kv.value)) if kv is not None else None

    async def _settle(self, revision: int) -> None:
        """After a write on the primary: wait until the region has applied it, or say why not."""
        try:
            await self.wait_applied(revision)
        except UnavailableError as err:
            log.warning("regional_store_behind_own_write", revision=revision, error=err.message)

    # -- reads ------------------------------------------------------------------------------

    async def _at_cut(self, answer: Callable[[Cut], Any]) -> Any:
        """Runs ``answer`` on a fresh cut, again on a newer one if it is compacted or behind."""
        for _ in range(CUT_ATTEMPTS):
            cut = await self.replica.cut()
            try:
                return await answer(cut)
            except Compacted:
                continue
            except _Behind as behind:
                await self.wait_applied(behind.revision)
        raise UnavailableError(f"no consistent read of the region in {CUT_ATTEMPTS} attempts "
                               "(its etcd compacted each cut, or the primary kept moving); retry")

    def _entry(self, cut: Cut, key: str, kv: Any, src: Source) -> Entry:
        if src is Source.REGION:
            return Entry(key, bytes(kv.value), cut.applied)
        envelope = self.replica.envelope(kv)
        return Entry(key, envelope.value, envelope.mod_revision)

    def _regional(self, cut: Cut, key: str, src: Source) -> bytes:
        """The regional key of ``key`` (REPLICA or REGION) as of ``cut``."""
        if src is Source.REGION:
            return self.replica.prefix + key.encode()
        return self.replica.data(cut.state.generation) + key.encode()

    def _strip(self, cut: Cut, src: Source) -> int:
        return len(self._regional(cut, "", src))

    @staticmethod
    def _check_primary(cut: Cut, entries: Sequence[Entry | None], fresh: bool) -> None:
        newest = max((e.mod_revision for e in entries if e is not None), default=0)
        if fresh and newest > cut.applied:
            raise _Behind(newest)

    async def read(self, keys: Sequence[str], *, fresh: bool) -> Snapshot:
        """Reads keys at one cut; ``fresh=False`` answers the same way, labelled as cached.

        The region is itself the cache of the primary: a non-fresh read reports revision 0,
        and a guard built from it fails on the primary if it was stale.
        """

        async def answer(cut: Cut) -> Snapshot:
            entries: dict[str, Entry | None] = {}
            held = [k for k in keys if source(k) is Source.PRIMARY]
            local = [k for k in keys if source(k) is not Source.PRIMARY]
            ranges = await asyncio.gather(*(
                self.replica.range(cut.at, self._regional(cut, k, source(k)), b"")
                for k in local))
            for key, resp in zip(local, ranges, strict=True):
                entries[key] = (self._entry(cut, key, resp.kvs[0], source(key))
                                if resp.kvs else None)
            if held:
                snap = await self.primary.read(held, fresh=fresh)
                self._check_primary(cut, list(snap.entries.values()), fresh)
                entries.update(snap.entries)
            return Snapshot({k: entries[k] for k in keys}, cut.applied if fresh else 0,
                            fresh=fresh)

        result: Snapshot = await self._at_cut(answer)
        return result

    async def scan(self, start: str, end: str, *, limit: int, reverse: bool = False) -> Page:
        """Reads part of a range at one cut, in key order (or reverse)."""

        async def answer(cut: Cut) -> Page:
            parts = segments(start, end)
            if reverse:
                parts.reverse()
            entries: list[Entry] = []
            for n, (src, lo, hi) in enumerate(parts):
                want = limit - len(entries) if limit else 0
                if limit and want == 0:
                    rest = [await self._count(cut, *part) for part in parts[n:]]
                    return Page(entries, cut.applied, any(rest))
                found, more = await self._scan_part(cut, src, lo, hi, want, reverse)
                entries += found
                if more:
                    return Page(entries, cut.applied, True)
            return Page(entries, cut.applied, False)

        result: Page = await self._at_cut(answer)
        return result

    async def _scan_part(self, cut: Cut, src: Source, lo: str, hi: str, limit: int,
                         reverse: bool) -> tuple[list[Entry], bool]:
        if src is Source.PRIMARY:
            page = await self.primary.scan(lo, hi, limit=limit, reverse=reverse)
            self._check_primary(cut, page.entries, True)
            return list(page.entries), page.more
        skip = self._strip(cut, src)
        resp = await self.replica.range(cut.at, self._regional(cut, lo, src),
                                        self._regional(cut, hi, src), limit=limit,
                                        reverse=reverse)
        return [self._entry(cut, bytes(kv.key[skip:]).decode(), kv, src)
                for kv in resp.kvs], bool(resp.more)

    async def _count(self, cut: Cut, src: Source, lo: str, hi: str) -> int:
        if src is Source.PRIMARY:
            return len((await self._scan_part(cut, src, lo, hi, 1, False))[0])
        resp = await self.replica.range(cut.at, self._regional(cut, lo, src),
                                        self._regional(cut, hi, src), count_only=True)
        return int(resp.count)

    async def last_change(self, start: str, end: str) -> tuple[int, int]:
        """The highest ``mod_revision`` in ``[start, end)`` (0 if empty) and the cut's revision.

        Replicated keys: one Range sorted by value, whose envelopes order by primary
        ``mod_revision`` (only the winner crosses the wire). Region-local keys count as of the
        cut, like their entries.
        """

        async def answer(cut: Cut) -> tuple[int, int]:
            last = 0
            for src, lo, hi in segments(start, end):
                if src is Source.PRIMARY:
                    changed, _ = await self.primary.last_change(lo, hi)
                    if changed > cut.applied:
                        raise _Behind(changed)
                    last = max(last, changed)
                elif src is Source.REGION:
                    last = max(last, cut.applied if await self._count(cut, src, lo, hi) else 0)
                else:
                    resp = await self.replica.range(
                        cut.at, self._regional(cut, lo, src), self._regional(cut, hi, src),
                        limit=1, by_value=True)
                    if resp.kvs:
                        last = max(last, self.replica.envelope(resp.kvs[0]).mod_revision)
            return last, cut.applied

        result: tuple[int, int] = await self._at_cut(answer)
        return result

    # -- writes -----------------------------------------------------------------------------

    @staticmethod
    def _refuse_region_held(guards: Sequence[Guard], writes: Sequence[Write],
                            refresh: Sequence[str]) -> None:
        """Commits run on the primary, where this region's local keys are not."""
        ranges = [(g.start, g.end) for g in guards if isinstance(g, RangeUnchanged)]
        ranges += [(w.start, w.end) for w in writes if isinstance(w, DeleteRange)]
        touched = [g.key for g in guards if isinstance(g, Unchanged)]
        touched += [w.key for w in writes if isinstance(w, Put)] + list(refresh)
        if any(source(k) is Source.REGION for k in touched) or any(
                src is Source.REGION for lo, hi in ranges for src, _, _ in segments(lo, hi)):
            raise ValueError(f"keys under {', '.join(REGION_HELD)} live in the region: a commit "
                             "(which runs on the primary) may not guard, write or refresh them")

    async def commit(
        self, guards: Sequence[Guard], writes: Sequence[Write], *, refresh: Sequence[str] = ()
    ) -> CommitResult:
        """One guarded Txn on the primary; on success, once the region has applied it."""
        self._refuse_region_held(guards, writes, refresh)
        result = await self.primary.commit(guards, writes, refresh=refresh)
        if result.succeeded:
            await self._settle(result.revision)
        elif result.fresh is not None:
            # A retry re-reads through the region: let it hold at least what the guards met.
            newest = max((e.mod_revision for e in result.fresh.entries.values() if e), default=0)
            if newest:
                await self._settle(newest)
        return result

    async def put_ephemeral(self, key: str, value: bytes, ttl: int) -> int:
        """A node report into the regional etcd; any other key on the primary, then settled.

        A region-local key returns the applied revision when it was written.
        """
        if source(key) is Source.REGION:
            return await self.replica.put_local(key.encode(), value, ttl)
        revision = await self.primary.put_ephemeral(key, value, ttl)
        await self._settle(revision)
        return revision

    async def delete_ephemeral(self, key: str) -> tuple[int, bool]:
        """Deletes a key written by ``put_ephemeral``, where it was written."""
        if source(key) is Source.REGION:
            return await self.replica.delete_local(key.encode())
        revision, existed = await self.primary.delete_ephemeral(key)
        if existed:
            await self._settle(revision)
        return revision, existed

