"""The stage hub of a regional server: every promotion committed on the primary reaches its
streams once, in order, in primary revisions, across replicator crashes; across a resync they
get a snapshot flagged ``reset`` instead of a silent gap.
"""

from __future__ import annotations

import asyncio
import random

from aetcd import rpc

from modelreg.replication import Replicator
from modelreg.server.store.etcd import EtcdStore
from tests.domain.env import MODEL
from tests.replication.region_env import agent_argv, client, config, until
from tests.replication.regional_env import StoreEnv, Stream, hub_over, regional
from tests.replication.replica_process import Replica

STAGING = f"models/{MODEL}/stages/staging"
VERSIONS = 3
KILLS = 5


async def promote(env: StoreEnv, n: int) -> tuple[int, str, int]:
    """The n-th promotion to staging (versions in turn, so each one moves the pointer), as a
    stream should see it: (revision, stage, version).
    """
    version = n % VERSIONS + 1
    resp = await env.promote("staging", version)
    return resp.revision, STAGING, version


async def caught_up(stream: Stream, revision: int) -> None:
    """Waits until the stream delivered ``revision`` (a bound, not a measurement)."""
    await until(lambda: stream.last_revision() >= revision, timeout=60,
                what=f"the stream reaching revision {revision}")


class TestHubOverRegion:
    async def test_every_promotion_once_in_order_across_replicator_kills(self, pair35, prefix):
        """Promotions committed on the primary while the region's replicator (a child process)
        is SIGKILLed five times, each time after it applied some of them, reach a stream of the
        regional hub each exactly once, in order, at their primary revisions, with no reset.
        """
        primary, region = pair35
        env = StoreEnv(EtcdStore([primary.endpoint], prefix))
        await env.setup(VERSIONS)
        store = regional(primary, region, prefix)
        argv = agent_argv(config(primary, region, prefix))
        rng = random.Random(5)
        promoted: list[tuple[int, str, int]] = []
        seen_while_killing: list[int] = []

        async def burst(count: int) -> None:
            for _ in range(count):
                promoted.append(await promote(env, len(promoted)))
                await asyncio.sleep(0.01)

        replica = await Replica.start(argv)
        try:
            await store.wait_applied(1, timeout=60)
            async with hub_over(store) as (hub, stream):
                for _ in range(KILLS):
                    before = hub.revision
                    writes = asyncio.create_task(burst(12))
                    alive = replica.proc
                    await until(lambda: alive.returncode is not None  # noqa: B023 - used now
                                or hub.revision > before,  # noqa: B023
                                timeout=60, what="the replicator applying")
                    await asyncio.sleep(rng.uniform(0, 0.3))
                    await replica.kill()
                    await writes
                    await replica.end()
                    seen_while_killing.append(len(stream.changes()))
                    replica = await Replica.start(argv)
                await caught_up(stream, promoted[-1][0])
                resets = hub.resets
        finally:
            await replica.end()
            await store.close()
            await env.store.close()
        assert stream.changes() == promoted
        assert not stream.resets() and resets == 0
        assert seen_while_killing[0] > 0 and seen_while_killing == sorted(seen_while_killing)

    async def test_a_resync_reaches_streams_as_a_reset(self, pair, prefix):
        """Promotions made while the replicator was down and then compacted away on the primary
        reach the regional hub's stream as one snapshot flagged reset, holding the primary's
        pointer; the promotions before and after it arrive once each, in order.
        """
        primary, region = pair
        env = StoreEnv(EtcdStore([primary.endpoint], prefix))
        await env.setup(VERSIONS)
        store = regional(primary, region, prefix)
        cfg = config(primary, region, prefix)
        try:
            async with Replicator(cfg):
                await store.wait_applied(1)
            async with hub_over(store) as (hub, stream):
                async with Replicator(cfg):
                    before = [await promote(env, n) for n in range(4)]
                    await caught_up(stream, before[-1][0])
                during = [await promote(env, n) for n in range(4, 8)]
                async with client(primary) as p:
                    await p.kvstub.Compact(rpc.CompactionRequest(revision=during[-1][0],
                                                                 physical=True))
                async with Replicator(cfg):
                    await until(lambda: stream.resets(), timeout=60, what="a reset snapshot")
                    after = [await promote(env, n) for n in range(8, 12)]
                    await caught_up(stream, after[-1][0])
                resets = hub.resets
        finally:
            await store.close()
            await env.store.close()
        [reset] = stream.resets()
        at = stream.messages.index(reset)
        assert reset.reset and reset.revision >= during[-1][0]
        assert [(p.name, p.version) for p in reset.snapshot if p.name == STAGING] == [
            (STAGING, during[-1][2])]
        assert Stream(stream.hub, stream.messages[:at]).changes() == before
        assert Stream(stream.hub, stream.messages[at:]).changes() == after
        assert resets == 1
