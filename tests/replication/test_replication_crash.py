"""The replicator as a real child process, SIGKILLed again and again while the primary takes
writes: every revision is still applied exactly once and in order.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from modelreg.replication import layout
from tests.replication.region_env import (
    Writer,
    agent_argv,
    check_history,
    check_invariants,
    client,
    config,
    converged,
    reading,
    region_history,
    region_keyspace,
)
from tests.replication.replica_process import Replica

KILLS = 20
WRITES = 500


async def applied(c, prefix: bytes) -> int:
    state, _ = await region_keyspace(c, prefix)
    return state.applied if state is not None else 0


@pytest.mark.slow
class TestCrash:
    async def test_sigkilled_20_times_during_500_writes(self, pair35, prefix):
        """Killed 20 times (each time after it committed, at a random moment) during 500 mixed
        writes: the region ends identical to the primary, no commit applied a primary revision
        twice or out of order, and a reader polling throughout never saw applied go back.
        """
        primary, region = pair35
        key_prefix = prefix.encode()
        cfg = config(primary, region, prefix)
        rng = random.Random(20)
        async with client(primary) as p, client(region) as r:
            writer = Writer(p, key_prefix)
            await writer.setup()
            async with reading(r, key_prefix) as reader:
                for _ in range(KILLS):
                    replica = await Replica.start(agent_argv(cfg))
                    burst = asyncio.create_task(writer.run(WRITES // KILLS, pause=0.01))
                    try:
                        before = await applied(r, key_prefix)
                        deadline = time.monotonic() + 60
                        while await applied(r, key_prefix) <= before:
                            assert replica.proc.returncode is None, "\n".join(replica.lines)
                            assert time.monotonic() < deadline, "the replicator never commits"
                            await asyncio.sleep(0.01)
                        await asyncio.sleep(rng.uniform(0, 0.3))
                        await replica.kill()
                        await burst
                    finally:
                        burst.cancel()
                        await replica.end()
                assert writer.n == WRITES
                last = await Replica.start(agent_argv(cfg))
                try:
                    await last.wait_logged("replication.elected")
                    state, keys = await converged(p, r, key_prefix)
                    assert await last.stop() == 0
                    assert last.logged("replication.stopped")
                finally:
                    await last.end()
            check_invariants(keys, state.applied)
            applied_in_order = check_history(await region_history(r, key_prefix), key_prefix)
            assert applied_in_order[-1] == state.applied
            assert reader.reads > 0
            # It resigned on SIGTERM: a standby would not wait for the lease to lapse.
            assert await r.get(layout.leader_key(key_prefix)) is None
