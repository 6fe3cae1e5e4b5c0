"""The revision contract of the storage ports (``modelreg.server.domain.ports``), clause by
clause, against every implementation: ``EtcdStore``/``EtcdChangeFeed`` on a real etcd of each
build, the regional store (``RegionalStore``/``RegionalChangeFeed``, reading a regional etcd
that a real replicator fills from a primary etcd) on a pair of each build, and the in-memory
fake the domain tests run on.

The tests live in ``StoreContract``; each ``TestX`` subclass supplies its implementation
through the ``impl`` fixture. The regional store's revisions and etags must be the primary's,
which is what these clauses pin.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aetcd
import grpc
import pytest
from aetcd import rpc

from modelreg.replication import Replicator, State, layout
from modelreg.server.domain.ports import (
    Batch,
    Change,
    ChangeFeed,
    CompactedError,
    DeleteRange,
    ModelStore,
    Progress,
    Put,
    RangeUnchanged,
    Unchanged,
)
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.store.etcd import EtcdStore
from modelreg.server.store.etcd_watch import EtcdChangeFeed
from modelreg.server.store.memory import MemoryStore
from modelreg.server.store.regional import RegionalStore
from modelreg.server.store.regional_feed import RegionalChangeFeed
from tests.conftest import ETCD_BUILDS, etcd_binary
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)
from tests.replication.region_env import client, config, start_pair

W, W_END = "w/", "w0"
"""The watched range of the feed tests; keys outside it start with ``x/``."""


@dataclass
class Impl:
    """One implementation of the ports, as a deployment would wire it."""

    store: ModelStore
    feed: ChangeFeed
    peer: ModelStore
    """Another store of the same deployment (another server process's view of the cluster)."""
    compact: Callable[[int], Awaitable[None]]
    """Compacts the cluster's history before a revision."""


async def current(store: ModelStore) -> int:
    """The store's current revision (a fresh read of no keys)."""
    return (await store.read([], fresh=True)).revision


async def put(store: ModelStore, *pairs: tuple[str, bytes]) -> int:
    """Commits unguarded puts in one transaction; returns its revision."""
    result = await store.commit([], [Put(k, v) for k, v in pairs])
    assert result.succeeded
    return result.revision


async def follow(feed: ChangeFeed, from_revision: int,
                 until: Callable[[Batch | Progress], bool]) -> list[Batch | Progress]:
    """What ``feed`` yields for ``[W, W_END)`` from ``from_revision``, up to ``until``."""
    items: list[Batch | Progress] = []
    watch = feed.watch(W, W_END, from_revision)
    try:
        async with asyncio.timeout(10):
            async for item in watch:
                items.append(item)
                if until(item):
                    break
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    return items


def batches(items: list[Batch | Progress]) -> list[Batch]:
    """The batches among a feed's items."""
    return [i for i in items if isinstance(i, Batch)]


class StoreContract:
    """The clauses of the ports' docstring; subclasses provide ``impl``."""

    async def test_a_commit_revision_is_the_mod_revision_of_what_it_wrote(self, impl):
        """Every key a commit writes has the commit's revision as mod_revision, and a fresh
        read through any store of the deployment sees it at a revision at or above it.
        """
        revision = await put(impl.store, ("a", b"1"), ("b", b"2"))
        for store in (impl.store, impl.peer):
            snap = await store.read(["a", "b"], fresh=True)
            assert snap.fresh and snap.revision >= revision
            assert [snap.get(k).mod_revision for k in ("a", "b")] == [revision, revision]
            assert [snap.get(k).value for k in ("a", "b")] == [b"1", b"2"]
        ephemeral = await impl.store.put_ephemeral("e", b"node", 30)
        assert ephemeral > revision
        assert (await impl.peer.read(["e"], fresh=True)).get("e").mod_revision == ephemeral

    async def test_revisions_only_grow(self, impl):
        """Successful commits get ever higher revisions, and no read, scan, failed commit or
        latest() reports a revision below one already handed out.
        """
        seen = [await current(impl.store)]
        for i in range(3):
            seen.append(await put(impl.store, ("k", str(i).encode())))
            assert seen[-1] > seen[-2]
            seen.append((await impl.peer.read(["k"], fresh=True)).revision)
            seen.append((await impl.store.scan("k", "l", limit=0)).revision)
            failed = await impl.store.commit([Unchanged("k", 1)], [Put("k", b"no")])
            assert not failed.succeeded
            seen.append(failed.revision)
            seen.append((await impl.feed.latest("k", "l"))[1])
        assert seen == sorted(seen)

    async def test_a_commit_that_changes_nothing_creates_no_revision(self, impl):
        """Deleting absent keys succeeds at the current revision without creating a new one."""
        before = await put(impl.store, ("a", b"1"))
        result = await impl.store.commit([], [DeleteRange("nothing/", "nothing0")])
        assert result.succeeded and result.revision == before == await current(impl.store)

    async def test_a_commit_needs_a_write_and_writes_each_key_once(self, impl):
        """A commit without writes, or writing one key twice, is refused and writes nothing."""
        before = await put(impl.store, ("a", b"1"))
        with pytest.raises(ValueError, match="at least one write"):
            await impl.store.commit([Unchanged("a", before)], [])
        for writes in ([Put("b", b"1"), Put("b", b"2")], [Put("b", b"1"), DeleteRange("b", "c")]):
            # etcd refuses with INVALID_ARGUMENT ("duplicate key given in txn request").
            with pytest.raises((ValueError, grpc.RpcError)):
                await impl.store.commit([], writes)
        assert await current(impl.store) == before
        assert (await impl.store.read(["b"], fresh=True)).get("b") is None

    async def test_a_stale_etag_fails_the_commit_and_writes_nothing(self, impl):
        """A guard on a superseded mod_revision fails: nothing is written, no revision is
        created, and the refreshed keys come back as of the failure's revision.
        """
        old = await put(impl.store, ("a", b"1"))
        new = await put(impl.peer, ("a", b"2"))
        result = await impl.store.commit([Unchanged("a", old)], [Put("a", b"3"), Put("b", b"3")],
                                         refresh=["a", "b"])
        assert not result.succeeded and result.revision == new == await current(impl.store)
        assert result.fresh is not None and result.fresh.revision == new
        assert result.fresh.get("a").mod_revision == new and result.fresh.get("a").value == b"2"
        assert result.fresh.get("b") is None
        create_only = await impl.store.commit([Unchanged("a", 0)], [Put("a", b"4")])
        assert not create_only.succeeded

    async def test_an_etag_from_one_store_guards_a_commit_through_another(self, impl):
        """The mod_revision read through one store is the etag another store of the same
        deployment compares against: the current one passes, and the commit reads back at it.
        """
        await put(impl.store, ("a", b"1"))
        etag = (await impl.store.read(["a"], fresh=True)).get("a").mod_revision
        result = await impl.peer.commit([Unchanged("a", etag), Unchanged("new", 0)],
                                        [Put("a", b"2"), Put("new", b"n")])
        assert result.succeeded and result.revision > etag
        snap = await impl.store.read(["a", "new"], fresh=True)
        assert snap.get("a").mod_revision == snap.get("new").mod_revision == result.revision

    async def test_a_range_guard_fails_on_any_write_after_its_revision(self, impl):
        """A range guard at revision R holds until a key of the range is written or created
        after R, and then fails.
        """
        await put(impl.store, ("r/1", b"1"))
        page = await impl.store.scan("r/", "r0", limit=0)
        guard = RangeUnchanged("r/", "r0", page.revision)
        assert (await impl.store.commit([guard], [Put("x/1", b"1")])).succeeded
        await put(impl.peer, ("r/2", b"created"))
        assert not (await impl.store.commit([guard], [Put("x/1", b"2")])).succeeded

    async def test_a_read_carries_the_revision_it_was_read_at(self, impl):
        """A fresh read or scan reports the revision it reflects: its entries' mod_revisions
        are at or below it, and writes to other keys move it on but not their mod_revision.
        """
        first = await put(impl.store, ("a", b"1"))
        later = await put(impl.peer, ("b", b"1"))
        snap = await impl.store.read(["a", "b", "absent"], fresh=True)
        assert snap.revision >= later
        assert snap.get("a").mod_revision == first and snap.get("b").mod_revision == later
        assert snap.get("absent") is None and snap.mod_revision("absent") == 0
        page = await impl.store.scan("a", "c", limit=1)
        assert page.revision >= later and page.more
        assert [(e.key, e.mod_revision) for e in page.entries] == [("a", first)]

    async def test_a_cached_read_can_be_stale_but_never_passes_a_wrong_commit(self, impl):
        """A cached read reports revision 0; if another server wrote meanwhile its etag is
        stale and a commit guarded on it fails, else the commit passes.
        """
        first = await put(impl.store, ("a", b"1"))
        await impl.store.read(["a"], fresh=True)  # what a server's cache learns
        second = await put(impl.peer, ("a", b"2"))
        cached = await impl.store.read(["a"], fresh=False)
        assert cached.revision == 0 and not cached.fresh
        etag = cached.get("a").mod_revision
        assert etag in (first, second)
        result = await impl.store.commit([Unchanged("a", etag)], [Put("a", b"3")])
        assert result.succeeded == (etag == second)

    async def test_the_feed_delivers_exactly_the_changes_from_a_revision_on(self, impl):
        """A watch from revision R yields one batch per transaction at R or later that changed
        the range, with exactly its changes in the range (deletions as None), then live ones.
        """
        before = await put(impl.store, ("w/1", b"0"))
        start = await put(impl.store, ("w/1", b"1"), ("x/1", b"outside"), ("w/2", b"2"))
        await put(impl.store, ("x/2", b"outside only"))
        deleted = (await impl.store.commit([], [DeleteRange("w/", "w/2"), Put("w/3", b"3")])
                   ).revision
        got = await follow(impl.feed, start, lambda i: i.revision >= deleted)
        live = await impl.store.commit([], [Put("w/4", b"4")])
        got += await follow(impl.feed, deleted + 1, lambda i: i.revision >= live.revision)
        assert before < start
        assert batches(got) == [
            Batch(start, (Change("w/1", b"1"), Change("w/2", b"2"))),
            Batch(deleted, (Change("w/1", None), Change("w/3", b"3"))),
            Batch(live.revision, (Change("w/4", b"4"),)),
        ]

    async def test_progress_comes_only_after_every_change_up_to_it(self, impl):
        """A watch announces progress to revision P only after yielding every change of the
        range at or below P, and P then covers the writes outside the range.
        """
        written = [await put(impl.store, (f"w/{i}", b"v")) for i in range(3)]
        outside = await put(impl.store, ("x/1", b"outside"))
        got = await follow(impl.feed, written[0],
                           lambda i: isinstance(i, Progress) and i.revision >= outside)
        first_progress = next(n for n, i in enumerate(got) if isinstance(i, Progress))
        assert [b.revision for b in batches(got[:first_progress])] == written
        assert got[-1].revision >= outside

    async def test_latest_names_the_last_change_of_a_range(self, impl):
        """latest() gives the highest mod_revision in the range (0 if empty) and the revision
        it was read at, which writes outside the range move on.
        """
        assert (await impl.feed.latest(W, W_END))[0] == 0
        last = await put(impl.store, ("w/1", b"1"))
        outside = await put(impl.store, ("x/1", b"1"))
        changed, read_at = await impl.feed.latest(W, W_END)
        assert changed == last and read_at >= outside

    async def test_a_compacted_start_raises_and_a_later_one_replays(self, impl):
        """A watch from below the compaction revision raises CompactedError naming it; one from
        just above it replays the changes from there on.
        """
        revisions = [await put(impl.store, ("w/1", str(i).encode())) for i in range(3)]
        await impl.compact(revisions[1])
        with pytest.raises(CompactedError) as err:
            await follow(impl.feed, revisions[0], lambda i: True)
        assert err.value.compact_revision == revisions[1]
        got = await follow(impl.feed, revisions[1] + 1, lambda i: i.revision >= revisions[2])
        assert batches(got) == [Batch(revisions[2], (Change("w/1", b"2"),))]

    async def test_wait_for_returns_once_fresh_reads_reach_a_revision(self, impl):
        """wait_for returns at once for a revision handed out through any store of the
        deployment, waits for one not committed yet until commits reach it, and at its bound
        returns the revision reached, below the one asked for.
        """
        revision = await put(impl.peer, ("w/1", b"1"))
        assert await impl.store.wait_for(revision, timeout=10) >= revision
        assert await impl.store.wait_for(0, timeout=0) >= revision
        waiting = asyncio.create_task(impl.store.wait_for(revision + 2, timeout=60))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await put(impl.peer, ("w/1", b"2"))
        await put(impl.peer, ("w/1", b"3"))
        reached = await waiting
        assert reached >= revision + 2
        assert (await impl.store.read(["w/1"], fresh=True)).get("w/1").value == b"3"
        now = await current(impl.store)
        assert now <= await impl.store.wait_for(now + 1000, timeout=0.2) < now + 1000


class TestEtcdStore(StoreContract):
    """``EtcdStore`` and ``EtcdChangeFeed`` on a real etcd, once per etcd build."""

    @pytest.fixture
    async def impl(self, etcd_server, etcd_prefix) -> AsyncIterator[Impl]:
        store = EtcdStore([etcd_server.endpoint], etcd_prefix)
        peer = EtcdStore([etcd_server.endpoint], etcd_prefix)

        async def compact(revision: int) -> None:
            async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
                await client.compact(revision, physical=True)

        try:
            yield Impl(store, EtcdChangeFeed(store, progress_interval=0.05), peer, compact)
        finally:
            await store.close()
            await peer.close()


@pytest.fixture(scope="module", params=sorted(ETCD_BUILDS), ids=lambda b: f"etcd{b}")
def region_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[EmbeddedEtcd, EmbeddedEtcd]]:
    """A primary and a regional etcd of one build, for the module (each test its own prefix)."""
    tmp: Path = tmp_path_factory.mktemp(f"pair-{request.param}")
    primary, region = start_pair(tmp, etcd_binary(request.param))
    try:
        yield primary, region
    finally:
        region.stop()
        primary.stop()


class TestRegionalStore(StoreContract):
    """``RegionalStore`` and ``RegionalChangeFeed`` over a regional etcd that a replicator fills
    from the primary: the peer is another server of the same region. Commits wait for the
    region to apply them (``wait_for``), so what one server of the region wrote, the other reads.
    """

    @pytest.fixture
    async def impl(self, region_pair) -> AsyncIterator[Impl]:
        primary, region = region_pair
        prefix = f"/c-{uuid.uuid4().hex[:8]}/"
        stores = [RegionalStore([primary.endpoint], [region.endpoint], prefix, region_name="eu")
                  for _ in range(2)]

        async def compact(revision: int) -> None:
            # The history this store replays is the region's: forget it up to the replicator
            # commit that left the region just below ``revision``.
            key = layout.state_key(prefix.encode())
            async with client(region) as c:
                at = (await c.kvstub.Range(rpc.RangeRequest(key=key))).header.revision
                while True:
                    kv = (await c.kvstub.Range(rpc.RangeRequest(key=key, revision=at))).kvs[0]
                    if State.decode(bytes(kv.value)).applied < revision:
                        break
                    at = kv.mod_revision - 1
                await c.kvstub.Compact(rpc.CompactionRequest(revision=at, physical=True))

        try:
            async with Replicator(config(primary, region, prefix)):
                await stores[0].wait_applied(1)  # the region's first copy
                yield Impl(stores[0], RegionalChangeFeed(stores[0], progress_interval=0.05),
                           stores[1], compact)
        finally:
            for store in stores:
                await store.close()


class TestMemoryStore(StoreContract):
    """The in-memory fake: one object is the whole cluster, so it is its own peer and feed."""

    @pytest.fixture
    async def impl(self) -> Impl:
        store = MemoryStore()

        async def compact(revision: int) -> None:
            store.compact(revision)

        return Impl(store, store, store, compact)
