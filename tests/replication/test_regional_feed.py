"""The regional change feed against the primary's own: from any revision, the same batches in
the same primary revisions, whatever the replicator batched, switched or deleted; and a quiet
region is told from a dead one.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from dataclasses import replace

import pytest
from aetcd import rpc

from modelreg.replication import Kind, Replicator, layout
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import Batch, ChangeFeed, CompactedError, Progress
from modelreg.server.latency_proxy import LatencyProxy
from modelreg.server.store.etcd import EtcdStore
from modelreg.server.store.etcd_watch import EtcdChangeFeed
from modelreg.server.store.regional import RegionalStore
from modelreg.server.store.regional_feed import RegionalChangeFeed
from tests.helpers import reset_under_watches
from tests.replication.region_env import (
    BIG,
    Writer,
    client,
    config,
    converged,
    region_keyspace,
)
from tests.replication.regional_env import regional

START, END = "a", "z"
"""Every key the writer writes."""


async def replay(feed: ChangeFeed, from_revision: int, until: int) -> list[tuple[int, tuple]]:
    """The replicated changes ``feed`` yields from ``from_revision`` up to ``until``, each
    batch as (revision, its changes in key order), batches of region-local keys left out.
    """
    got: list[tuple[int, tuple]] = []
    watch = feed.watch(START, END, from_revision)
    try:
        async with asyncio.timeout(60):
            async for item in watch:
                if isinstance(item, Batch):
                    changes = tuple(sorted((c.key, c.value) for c in item.changes
                                           if layout.is_replicated(c.key.encode())))
                    if changes:
                        got.append((item.revision, changes))
                if item.revision >= until:
                    break
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    return got


class TestSameAsThePrimary:
    async def test_any_start_replays_what_the_primary_replays(self, pair, prefix):
        """After 150 mixed writes applied in batches of several revisions, in place, through
        generation switches and with deletions, a watch of the region from any revision yields
        exactly the batches a watch of the primary yields from there.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        direct = EtcdStore([primary.endpoint], prefix)
        try:
            async with client(primary) as p, client(region) as r:
                writer = Writer(p, prefix.encode(), big_every=60)
                async with Replicator(config(primary, region, prefix)):
                    await store.wait_applied(1)
                    first = (await direct.read([], fresh=True)).revision + 1
                    await writer.setup()
                    await writer.run(150)
                    state, _ = await converged(p, r, prefix.encode())
                last = state.applied
                rng = random.Random(8)
                starts = sorted({first, first + 3, last,
                                 *(rng.randrange(first, last) for _ in range(8))})
                for start in starts:
                    want = await replay(EtcdChangeFeed(direct, progress_interval=0.05),
                                        start, last)
                    got = await replay(RegionalChangeFeed(store, progress_interval=0.05),
                                       start, last)
                    assert got == want, f"from {start}"
        finally:
            await store.close()
            await direct.close()

    async def test_a_watch_moved_to_another_region_misses_nothing(self, pair, prefix):
        """A watch of region "eu" stopped half way and resumed in region "ap" (each under its
        own regional prefix, filled by its own replicator) from the next revision yields, in
        all, exactly what one watch of the primary yields: one revision space.
        """
        primary, region = pair
        names = ("eu", "ap")
        stores = {name: regional(primary, region, prefix, region_prefix=f"/{name}{prefix}")
                  for name in names}
        direct = EtcdStore([primary.endpoint], prefix)
        configs = [replace(config(primary, region, prefix, replica_id=name,
                                  region_prefix=f"/{name}{prefix}"), region=name)
                   for name in names]
        try:
            async with client(primary) as p, Replicator(configs[0]), Replicator(configs[1]):
                for store in stores.values():
                    await store.wait_applied(1)
                first = (await direct.read([], fresh=True)).revision + 1
                writer = Writer(p, prefix.encode())
                await writer.setup()
                await writer.run(80)
                last = (await direct.read([], fresh=True)).revision
                for store in stores.values():
                    await store.wait_applied(last)
                want = await replay(EtcdChangeFeed(direct, progress_interval=0.05), first, last)
                middle = want[len(want) // 2][0]
                eu = await replay(RegionalChangeFeed(stores["eu"]), first, middle)
                ap = await replay(RegionalChangeFeed(stores["ap"]), eu[-1][0] + 1, last)
        finally:
            for store in stores.values():
                await store.close()
            await direct.close()
        assert eu[-1][0] == middle
        assert eu + ap == want

    async def test_an_oversized_revision_arrives_as_one_batch(self, pair, prefix):
        """A primary Txn too large for one regional Txn (a generation switch) reaches the feed
        as one batch at its own revision, its deletions included, between its neighbours.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        key = prefix.encode()
        try:
            async with client(primary) as p, client(region) as r, \
                    Replicator(config(primary, region, prefix)):
                await store.wait_applied(1)
                before = (await p.put(key + b"w/old", b"x")).header.revision
                ops = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=key + b"w/old"))]
                ops += [rpc.RequestOp(request_put=rpc.PutRequest(
                    key=key + b"w/%03d" % i, value=b"big")) for i in range(BIG)]
                big = (await p.kvstub.Txn(rpc.TxnRequest(success=ops))).header.revision
                after = (await p.put(key + b"w/new", b"y")).header.revision
                await store.wait_applied(after)
                state, _ = await region_keyspace(r, key)
                got = await replay(RegionalChangeFeed(store, progress_interval=0.05),
                                   before, after)
        finally:
            await store.close()
        assert state.generation > 1  # the first copy, then the switch for the big Txn
        assert state.kind is Kind.APPLIED  # "w/new" was applied in place after the switch
        assert got == [
            (before, (("w/old", b"x"),)),
            (big, (*((f"w/{i:03d}", b"big") for i in range(BIG)), ("w/old", None))),
            (after, (("w/new", b"y"),)),
        ]

    async def test_a_resync_ends_the_watch_as_compacted(self, pair, prefix):
        """Writes made while the replicator was down and compacted away on the primary reach
        the region as a resync: a watch from before it ends with CompactedError naming the
        first revision after the snapshot, and one from there replays on.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        key = prefix.encode()
        cfg = config(primary, region, prefix)
        try:
            async with client(primary) as p, client(region) as r:
                async with Replicator(cfg):
                    await store.wait_applied(1)
                    start = (await p.put(key + b"w/1", b"1")).header.revision
                    await store.wait_applied(start)
                feed = RegionalChangeFeed(store, progress_interval=0.05)
                watch = feed.watch(START, END, start)
                assert isinstance(await anext(watch), Batch)
                await p.put(key + b"w/1", b"2")
                gone = (await p.put(key + b"w/2", b"3")).header.revision
                await p.kvstub.Compact(rpc.CompactionRequest(revision=gone, physical=True))
                async with Replicator(cfg):
                    with pytest.raises(CompactedError) as err:
                        async with asyncio.timeout(60):
                            async for _ in watch:
                                pass
                    state, _ = await region_keyspace(r, key)
                    later = (await p.put(key + b"w/3", b"4")).header.revision
                    await store.wait_applied(later)
                    resumed = await replay(feed, err.value.compact_revision, later)
        finally:
            await store.close()
        assert state.kind is Kind.RESYNCED and err.value.compact_revision == state.applied + 1
        assert state.applied >= gone
        assert resumed == [(later, (("w/3", b"4"),))]


class TestLiveness:
    async def test_a_quiet_region_is_not_taken_for_a_dead_one(self, pair, prefix):
        """With the replicator down the region is silent: a watch stays open through many
        probe intervals, then delivers the next change once the replicator is back.
        """
        primary, region = pair
        store = regional(primary, region, prefix, timeout=1.0)
        cfg = config(primary, region, prefix)
        try:
            async with Replicator(cfg):
                applied = await store.wait_applied(1)
            feed = RegionalChangeFeed(store, progress_interval=0.02)
            watch = feed.watch(START, END, applied + 1)
            reader = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.5)  # 25 intervals
            assert not reader.done()
            async with client(primary) as p:
                put = await p.put((prefix + "w/1").encode(), b"1")
            async with Replicator(cfg), asyncio.timeout(30):
                item = await reader
            await watch.aclose()  # type: ignore[attr-defined]
        finally:
            await store.close()
        assert isinstance(item, Batch) and item.revision == put.header.revision

    async def test_a_frozen_regional_etcd_ends_the_watch(self, pair, prefix):
        """With the regional etcd frozen (SIGSTOP), the watch ends UNAVAILABLE within a few
        probe intervals and the etcd timeout instead of hanging.
        """
        primary, region = pair
        store = regional(primary, region, prefix, timeout=0.5)
        items: list[Batch | Progress] = []
        try:
            async with Replicator(config(primary, region, prefix)):
                applied = await store.wait_applied(1)
            feed = RegionalChangeFeed(store, progress_interval=0.05)

            async def follow() -> None:
                async for item in feed.watch(START, END, applied + 1):
                    items.append(item)

            reader = asyncio.ensure_future(follow())
            await asyncio.sleep(0.3)
            assert not reader.done()
            assert region.pid is not None
            os.kill(region.pid, signal.SIGSTOP)
            try:
                async with asyncio.timeout(15):
                    with pytest.raises(UnavailableError):
                        await reader
            finally:
                os.kill(region.pid, signal.SIGCONT)
        finally:
            await store.close()
        assert items == []

    async def test_a_reset_connection_ends_the_watch_unavailable(self, pair, prefix):
        """Forty resets of the connection to the regional etcd (the latency proxy's cut) under
        a watch that probes every 10 ms: each ends the watch with ``UnavailableError``, however
        the reset falls against the probe's writes.
        """
        primary, region = pair
        direct = regional(primary, region, prefix)
        try:
            async with Replicator(config(primary, region, prefix)):
                applied = await direct.wait_applied(1)
        finally:
            await direct.close()
        async with LatencyProxy(region.endpoint, name="to the regional etcd") as proxy:
            store = RegionalStore([primary.endpoint], [proxy.address], prefix, region_name="eu",
                                  timeout=1.0)
            feed = RegionalChangeFeed(store, progress_interval=0.01)
            try:
                await reset_under_watches(proxy, store.replica.state_revision,
                                          lambda: feed.watch(START, END, applied + 1))
            finally:
                await store.close()
