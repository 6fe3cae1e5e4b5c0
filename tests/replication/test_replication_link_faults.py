"""The replicator's link to the primary cut and healed again and again, through the latency
proxy of ``modelreg up --regions``: after every heal the region catches up with a write made
during the cut, whether the cut reset the connections or held them in a black hole, and however
long it lasted. A replicator that stops (or whose watch neither fails nor delivers) fails here
with its log.

The replicator is a real child process reaching the primary's etcd only through the proxy,
which runs in the test's event loop; the test writes to the primary directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aetcd
import pytest
from aetcd import rpc

from modelreg.replication import AgentConfig
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.latency_proxy import CutMode, LatencyProxy
from tests.replication.region_env import agent_argv, client, region_keyspace
from tests.replication.replica_process import Replica

pytestmark = pytest.mark.slow

CONVERGE = 30.0
"""Seconds a region may take to catch up after a heal: a bound against a hang, not a measure."""
KEEPALIVE_BOUND = 40.0
"""Seconds from a black hole's cut until the channel dials again: the keepalive gives up on the
held connection within 15 s (a ping after 10 s of silence, 5 s for its ack), grpc's default
ping timeout after 60 s (a bound far from both, not a measure)."""


@dataclass
class Link:
    """A replicator reaching the primary through a proxy, and clients of both etcds."""

    proxy: LatencyProxy
    replica: Replica
    primary: aetcd.Client
    region: aetcd.Client
    prefix: bytes
    writes: int = 0

    async def write(self) -> int:
        """One replicated key written on the primary (not through the proxy); its revision."""
        self.writes += 1
        resp = await self.primary.kvstub.Put(rpc.PutRequest(
            key=self.prefix + b"k/%d" % (self.writes % 7), value=b"%d" % self.writes))
        return int(resp.header.revision)

    async def applied(self) -> int:
        state, _ = await region_keyspace(self.region, self.prefix)
        return state.applied if state is not None else 0

    def log(self) -> str:
        return "\n".join(self.replica.lines[-30:])

    def running(self, what: str) -> None:
        code = self.replica.proc.returncode
        assert code is None, f"{what}: the replicator exited {code}; its log ends:\n{self.log()}"

    async def reaches(self, revision: int, what: str) -> None:
        """Until the region applied ``revision``; fails with the replicator's log."""
        deadline = time.monotonic() + CONVERGE
        while (applied := await self.applied()) < revision:
            self.running(what)
            assert time.monotonic() < deadline, (
                f"{what}: the region stays at {applied}, the primary wrote {revision} "
                f"({self.proxy!r}); the replicator's log ends:\n{self.log()}")
            await asyncio.sleep(0.02)

    async def until(self, condition: Callable[[], bool], what: str,
                    bound: float = 120.0) -> None:
        """Until ``condition()`` (``bound`` seconds at most); the replicator must keep running."""
        deadline = time.monotonic() + bound
        while not condition():
            self.running(what)
            assert time.monotonic() < deadline, f"{what} never happened:\n{self.log()}"
            await asyncio.sleep(0.05)

    def failures(self) -> int:
        """Watches or calls to the primary the replicator gave up on so far."""
        return len(self.replica.logged("replication.etcd_unavailable"))


@contextlib.asynccontextmanager
async def linked(pair: tuple[EmbeddedEtcd, EmbeddedEtcd], prefix: str,
                 **settings: Any) -> AsyncIterator[Link]:
    """The pair's replicator, caught up, through a proxy with 2 ms links.

    With the settings ``modelreg up --regions`` gives it (``regions_plan.replicator_command``:
    the probe interval, etcd timeout and keepalive at their defaults) unless ``settings`` says.
    """
    primary, region = pair
    async with LatencyProxy(primary.endpoint, 0.002, name="eu->primary etcd") as proxy, \
            client(primary) as p, client(region) as r:
        cfg = AgentConfig(primary=(proxy.address,), region_etcd=(region.endpoint,),
                          region="eu", prefix=prefix, replica_id="eu-1", **settings)
        replica = await Replica.start(agent_argv(cfg))
        try:
            link = Link(proxy, replica, p, r, prefix.encode())
            await link.reaches(await link.write(), "the first copy")
            yield link
        finally:
            await replica.end()


class TestLinkFaults:
    @pytest.mark.parametrize("mode", ["reset", "blackhole"])
    async def test_the_region_catches_up_after_every_heal(self, pair, prefix, mode: CutMode):
        """Ten cuts (none, under a second, or a few seconds: shorter than the watch's
        liveness timeout), each with a write on the primary while the link is down: after
        each heal the region applies it.
        """
        rng = random.Random(10)
        async with linked(pair, prefix) as link:
            for n in range(10):
                link.proxy.cut(mode)
                revision = await link.write()
                await asyncio.sleep(rng.choice([0.0, rng.uniform(0, 1), rng.uniform(1, 4)]))
                link.proxy.heal()
                await link.reaches(revision, f"after cut {n + 1} ({mode})")

    async def test_a_reset_while_the_watch_probes_does_not_stop_the_replicator(
        self, pair, prefix
    ):
        """Fifty short resets with a watch that probes every 10 ms, so that some reset lands
        between a probe's timed-out read and its progress request: that write to a stream
        already ended raised grpc.aio's ``InvalidStateError`` instead of the stream's error,
        and the replicator exited (in the launcher's tests, where nothing restarts it, the
        region never caught up after the heal). It must retry like any stream failure.
        """
        rng = random.Random(50)
        async with linked(pair, prefix, probe_interval=0.01) as link:
            for n in range(50):
                await asyncio.sleep(rng.uniform(0, 0.05))
                link.proxy.cut("reset")
                revision = await link.write()
                await asyncio.sleep(rng.uniform(0, 0.1))
                link.proxy.heal()
                await link.reaches(revision, f"after reset {n + 1}")

    async def test_a_black_hole_longer_than_the_liveness_timeout(self, pair, prefix):
        """A black hole that outlasts the watch's liveness probe, the etcd call deadline and the
        channel's keepalive: the replicator gives up on the silent watch and keeps retrying
        while the link stays down, its channel abandons the held connection and dials again;
        after the heal the region catches up.

        The channel gives up on the held connection within ``KEEPALIVE_BOUND``: without
        ``grpc.http2.ping_timeout_ms`` in its options grpc waited 60 s for the ack of a ping
        sent as the link went dark, whatever ``keepalive_timeout_ms`` said.
        """
        async with linked(pair, prefix) as link:
            failures, accepted = link.failures(), link.proxy.accepted
            link.proxy.cut("blackhole")
            revision = await link.write()
            await link.until(lambda: link.proxy.accepted > accepted,
                             "a new connection after the keepalive gave up on the held one",
                             bound=KEEPALIVE_BOUND)
            await link.until(lambda: link.failures() >= failures + 2, "giving up on the watch")
            assert await link.applied() < revision  # nothing came through the black hole
            link.proxy.heal()
            await link.reaches(revision, "after a long black hole")
