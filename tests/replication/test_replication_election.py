"""Two replicas per region: one applies, elected through the regional etcd; the other takes
over when the leader's lease lapses. And why a stale leader cannot do harm anyway.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest

from modelreg.replication import AgentState, Replicator, layout
from modelreg.replication.errors import LostRace, NotLeader
from modelreg.replication.etcd import Etcd
from modelreg.replication.layout import Envelope, Kind
from modelreg.replication.plan import KeyChange, Limits, Revision
from modelreg.replication.region import Region
from tests.replication.region_env import (
    Writer,
    agent_argv,
    check_history,
    client,
    config,
    converged,
    region_history,
    until,
)
from tests.replication.replica_process import Replica


def commits(metrics_url: str) -> float:
    """The replica's ``modelreg_replication_commits_total`` from its Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(r'^modelreg_replication_commits_total\{region="eu"\} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


async def start(cfg, replica_id: str) -> tuple[Replica, str]:
    argv = [*agent_argv(cfg), "--replica-id", replica_id, "--metrics-listen", "127.0.0.1:0"]
    replica = await Replica.start(argv)
    listen = (await replica.wait_logged("replication.metrics"))["listen"]
    return replica, f"http://{listen}/metrics"


def change(revision: int, key: bytes = b"k/x") -> Revision:
    return Revision(revision, (KeyChange(key, Envelope(b"v%d" % revision, revision, 2, 1)),))


class TestElection:
    @pytest.mark.slow
    async def test_one_replica_applies_and_the_other_takes_over(self, pair35, prefix):
        """Of two replicas only the elected one commits; SIGKILLed, the other is elected once
        the lease lapses, resumes where it stopped, and the region converges.
        """
        primary, region = pair35
        key_prefix = prefix.encode()
        cfg = config(primary, region, prefix)
        async with client(primary) as p, client(region) as r:
            writer = Writer(p, key_prefix)
            await writer.setup()
            a, a_url = await start(cfg, "a")
            b = None
            try:
                await a.wait_logged("replication.elected")
                b, b_url = await start(cfg, "b")
                await b.wait_logged("replication.following")
                await writer.run(40)
                await converged(p, r, key_prefix)
                assert await asyncio.to_thread(commits, a_url) > 0
                assert await asyncio.to_thread(commits, b_url) == 0
                assert not b.logged("replication.elected")
                assert (await r.get(layout.leader_key(key_prefix))).value == b"a"
                await a.kill()
                await writer.run(40)
                await b.wait_logged("replication.elected")
                state, _ = await converged(p, r, key_prefix)
                assert await asyncio.to_thread(commits, b_url) > 0
                assert (await r.get(layout.leader_key(key_prefix))).value == b"b"
            finally:
                await a.end()
                if b is not None:
                    await b.end()
            applied = check_history(await region_history(r, key_prefix), key_prefix)
            assert applied[-1] == state.applied

    async def test_a_stale_leader_fails_on_the_applied_guard(self, pair, prefix):
        """A replica that still holds the leader key but applied nothing since another writer
        moved the state on cannot commit: not the same revision again, not the next one.
        """
        _, region = pair
        key_prefix = prefix.encode()
        etcd = Etcd([region.endpoint])
        try:
            async with client(region) as r:
                await r.put(layout.leader_key(key_prefix), b"same")
            stale = Region(etcd, key_prefix, "same", Limits())
            fresh = Region(etcd, key_prefix, "same", Limits())

            async def empty():
                return
                yield

            await stale.build(3, Kind.RESYNCED, empty())
            await fresh.load()
            await fresh.apply([change(5)])
            with pytest.raises(LostRace):
                await stale.apply([change(5)])
            with pytest.raises(LostRace):
                await stale.apply([change(6)])
            assert (await stale.load()).applied == 5  # after reloading it goes on from there
            await stale.apply([change(6)])
        finally:
            await etcd.close()

    async def test_a_replica_that_lost_the_key_cannot_commit(self, pair, prefix):
        """Once the leader key names another replica, every commit of the former leader fails
        (NotLeader), even with the state it read still current.
        """
        _, region = pair
        key_prefix = prefix.encode()
        etcd = Etcd([region.endpoint])
        try:
            async with client(region) as r:
                await r.put(layout.leader_key(key_prefix), b"old")

                async def empty():
                    return
                    yield

                old = Region(etcd, key_prefix, "old", Limits())
                await old.build(3, Kind.RESYNCED, empty())
                await r.put(layout.leader_key(key_prefix), b"new")
                with pytest.raises(NotLeader):
                    await old.apply([change(5)])
                with pytest.raises(NotLeader):
                    await old.build(7, Kind.RESYNCED, empty())
                state = layout.State.decode((await r.get(layout.state_key(key_prefix))).value)
                assert state.applied == 3
        finally:
            await etcd.close()

    async def test_shutdown_hands_over_without_waiting_for_the_lease(self, pair, prefix):
        """A replica that shuts down resigns (its leader key is gone when run() returns), so
        the standby leads without waiting for its 60 s lease to lapse.
        """
        cfg_a = config(*pair, prefix, replica_id="a", lease_ttl=60)
        cfg_b = config(*pair, prefix, replica_id="b", lease_ttl=60)
        a = Replicator(cfg_a)
        running = asyncio.create_task(a.run())
        try:
            await until(lambda: a.state is AgentState.LEADING)
            async with Replicator(cfg_b) as b, client(pair[1]) as r:
                await until(lambda: b.state is AgentState.FOLLOWING)
                a.shutdown()
                await running
                assert a.state is AgentState.STOPPED
                holder = await r.get(layout.leader_key(prefix.encode()))
                assert holder is None or holder.value == b"b"
                await until(lambda: b.state is AgentState.LEADING)
        finally:
            a.shutdown()
            await running

