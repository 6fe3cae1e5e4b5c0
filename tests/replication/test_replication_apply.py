"""The replicator applies every primary revision to the region, in order, with the primary's
revisions in every value: against real etcd processes, on each etcd build.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from modelreg.replication import Kind, Replicator, layout
from modelreg.replication.errors import TooLarge
from tests.replication.region_env import (
    BIG,
    Writer,
    check_history,
    check_invariants,
    config,
    converged,
    reading,
    region_history,
    until,
)


class TestApply:
    async def test_mixed_writes_end_identical_with_primary_revisions(self, pair, clients, prefix):
        """Puts, deletes, multi-key Txns, DeleteRanges and Txns of 200 puts on the primary end as
        the same keys, values and primary revisions in the region, local keys left out.
        """
        p, r = clients
        key_prefix = prefix.encode()
        writer = Writer(p, key_prefix, big_every=60)
        await writer.setup()
        async with reading(r, key_prefix) as reader, Replicator(config(*pair, prefix)):
            await writer.run(180)
            state, keys = await converged(p, r, key_prefix)
        check_invariants(keys, state.applied)
        assert sum(k.startswith(b"big/") for k in keys) == BIG
        applied = check_history(await region_history(r, key_prefix), key_prefix)
        assert applied[-1] == state.applied
        assert reader.reads > 0 and reader.generations

    async def test_a_revision_over_the_regional_limits_switches_generations(
            self, pair, clients, prefix):
        """A primary Txn of 200 puts (regional limit: 128 operations) reaches the region in one
        step: a new generation switched to in one Txn, never half visible to a reader.
        """
        p, r = clients
        key_prefix = prefix.encode()
        writer = Writer(p, key_prefix)
        await writer.setup()
        async with Replicator(config(*pair, prefix)):
            first, _ = await converged(p, r, key_prefix)
            async with reading(r, key_prefix) as reader:
                for _ in range(3):
                    await writer.big()
                    await writer.txn([])  # an empty Txn: a revision with no change at all
                state, keys = await converged(p, r, key_prefix)
        assert first.kind is Kind.RESYNCED  # the region's first copy
        assert state.generation > first.generation
        check_invariants(keys, state.applied)
        kinds = {layout.State.decode(bytes(e.kv.value)).kind
                 for e in await region_history(r, key_prefix)
                 if bytes(e.kv.key) == layout.state_key(key_prefix)}
        assert Kind.SWITCHED in kinds
        assert reader.reads > 0

    async def test_lag_and_status_once_caught_up(self, pair, clients, prefix):
        """Once the region has applied everything, the leader reports no lag, and its status
        record in the regional etcd says the same for a regional server to read.
        """
        p, r = clients
        key_prefix = prefix.encode()
        writer = Writer(p, key_prefix)
        await writer.setup()
        async with Replicator(config(*pair, prefix)) as replicator:
            await writer.run(20)
            state, _ = await converged(p, r, key_prefix)
            await until(lambda: replicator.lag().revisions == 0
                             and replicator.lag().seconds == 0, what="no lag")
            lag = replicator.lag()
            assert lag.leader and lag.connected and lag.applied_revision == state.applied
            assert lag.commits > 0 and lag.resyncs >= 1

            async def status() -> layout.Status | None:
                got = await r.get(layout.status_key(key_prefix))
                return layout.Status.decode(got.value) if got is not None else None

            deadline = time.monotonic() + 30
            while (s := await status()) is None or s.applied < state.applied:
                assert time.monotonic() < deadline, "no status record"
                await asyncio.sleep(0.05)
        assert s.replica == "r1" and s.seconds_behind(s.written_ms) == 0

    async def test_a_value_the_region_cannot_hold_stops_the_replicator(
            self, pair, clients, prefix):
        """A single value over the regional etcd's request limit cannot be replicated at all:
        the replicator stops with TooLarge (and its supervisor's alarms) instead of skipping it
        or retrying forever.
        """
        p, _ = clients
        await p.put(prefix.encode() + b"models/huge", b"x" * (3 * 1024 * 1024))
        replicator = Replicator(config(*pair, prefix))
        with pytest.raises(ExceptionGroup) as caught:
            await asyncio.wait_for(replicator.run(), 60)
        assert caught.group_contains(TooLarge)
