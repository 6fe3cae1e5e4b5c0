"""The primary goes away (killed, or frozen with its connections open): the region keeps what
it has, the replicator reports the growing lag instead of hanging, and resumes where it
stopped when the primary is back.
"""

from __future__ import annotations

import os
import signal

from structlog.testing import capture_logs

from modelreg.replication import Replicator
from tests.replication.region_env import Writer, config, converged, region_keyspace, until


class TestPrimaryFaults:
    async def test_a_killed_primary_is_reported_and_resumed(self, pair, clients, prefix):
        """With the primary SIGKILLed the region still answers with what it applied, the lag
        shows the primary as gone; restarted, the primary's new writes arrive.
        """
        primary, _ = pair
        p, r = clients
        key_prefix = prefix.encode()
        writer = Writer(p, key_prefix)
        await writer.setup()
        async with Replicator(config(*pair, prefix, etcd_timeout=1.0)) as replicator:
            await writer.run(20)
            before, keys = await converged(p, r, key_prefix)
            primary.kill()
            await until(lambda: not replicator.lag().connected, what="disconnection")
            assert replicator.lag().seconds > 0
            assert await region_keyspace(r, key_prefix) == (before, keys)
            primary.start()
            await writer.run(20)
            after, _ = await converged(p, r, key_prefix)
            await until(lambda: replicator.lag().connected, what="reconnection")
        assert after.generation == before.generation  # resumed, no resync needed

    async def test_a_frozen_primary_does_not_hang_the_replicator(self, pair, clients, prefix):
        """A SIGSTOPped primary (connections open, nothing answers) is noticed by the watch's
        probe rather than waited on forever; after SIGCONT replication goes on.
        """
        primary, _ = pair
        p, r = clients
        key_prefix = prefix.encode()
        writer = Writer(p, key_prefix)
        await writer.setup()
        with capture_logs() as logs:  # for the whole block: it reconfigures in place
            async with Replicator(config(*pair, prefix, etcd_timeout=1.0)) as replicator:
                await converged(p, r, key_prefix)
                assert primary.pid is not None
                os.kill(primary.pid, signal.SIGSTOP)
                try:
                    await until(lambda: not replicator.lag().connected, what="disconnection")
                    await until(lambda: any(e["event"] == "replication.etcd_unavailable"
                                            for e in logs), what="the watch giving up")
                finally:
                    os.kill(primary.pid, signal.SIGCONT)
                await writer.run(20)
                await converged(p, r, key_prefix)
