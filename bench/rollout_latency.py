"""Cross-region rollouts, three regions with injected latency, real SDK nodes in every region.

Starts the cluster ``modelreg up --regions us,eu,ap --latency L`` starts (its ``Cluster``),
then ``--nodes`` watcher-SDK nodes per region (``_rollout_nodes.py``: one child process per
region, each node with its own WatchStages stream on its region's server, its own fleet
reports, fetch, digest check and load). It measures, with every time taken on this one
machine's clock (so the nodes' swap times compare with the promote's send time directly):

* **rollout**: ``PromoteVersion`` of a new version on the governed ``production`` (all three
  regions, readiness 1.0, activation margin ``--margin``) until the last node serves it:
  prepare everywhere, the coordinator's commit, the activation time;
* **spread**: between the first and the last node to switch, per rollout;
* **emergency rollback**: ``RollbackStage`` after a rollout, until the last node serves the
  warm previous version again (target: < 2 x the inter-region round trip + 50 ms);
* **plain promotion**: the same change on an ungoverned stage (the policy removed), until the
  last node serves it (each node fetches and loads after it hears), and its spread.

Last lines::

    rollout (promote -> last node)   p50 X ms  p99 X ms  (N rollouts, M nodes, L ms one way)
    rollout spread (first -> last)   p50 X ms  p99 X ms  max X ms
    emergency rollback -> last node  p50 X ms  p99 X ms  (target < T ms)
    plain promote -> last node       p50 X ms  p99 X ms
    plain promote spread             p50 X ms  p99 X ms

Run: ``python bench/rollout_latency.py [--latency 40] [--nodes 100] [--rollouts 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from _harness import percentile
from google.protobuf import field_mask_pb2

from modelreg.server.regions_cluster import Cluster, Options
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import model_service_pb2_grpc as msg
from modelreg.v1 import resources_pb2 as res

if TYPE_CHECKING:
    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub

MODEL = "bench"
REGIONS = ("us", "eu", "ap")
META = (("x-modelreg-actor", "bench"),)
HERE = Path(__file__).parent


class Fleet:
    """The node processes and every swap they print: (node, version) -> time.time()."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.swaps: dict[tuple[str, int], tuple[float, str]] = {}
        self.nodes = 0
        self.ready = 0
        self.changed = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, cluster: Cluster, per_region: int) -> None:
        for region in REGIONS:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "_rollout_nodes.py"), cluster.regions[region].listen,
                region, str(per_region), MODEL, "production",
                stdout=asyncio.subprocess.PIPE)
            self.procs.append(proc)
            self._readers.append(asyncio.create_task(self._read(proc)))
        self.nodes = per_region * len(REGIONS)
        await self.until(lambda: self.ready == len(REGIONS), 300)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            event = json.loads(line)
            if "ready" in event:
                self.ready += 1
            else:
                self.swaps[(event["node"], event["version"])] = (event["t"], event["source"])
            self.changed.set()

    async def until(self, done: Callable[[], bool], within: float) -> None:
        async with asyncio.timeout(within):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    def forget(self, version: int) -> None:
        """Drops the swaps to ``version`` seen so far."""
        for key in [k for k in self.swaps if k[1] == version]:
            del self.swaps[key]

    def times(self, version: int) -> list[float]:
        return [t for (_, v), (t, _) in self.swaps.items() if v == version]

    async def all_serve(self, version: int, within: float = 120) -> list[float]:
        await self.until(lambda: len(self.times(version)) == self.nodes, within)
        return self.times(version)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs:
            await proc.wait()
        for reader in self._readers:
            reader.cancel()


async def register(us: ModelServiceAsyncStub, directory: Path, n: int) -> None:
    path = directory / f"model-{n}.bin"
    path.write_bytes(f"version {n}\n".encode() + os.urandom(4096))
    data = path.read_bytes()
    await us.CreateModelVersion(svc.CreateModelVersionRequest(
        parent=f"models/{MODEL}", model_version=res.ModelVersion(
            artifact_uri=path.as_uri(), sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data))), metadata=META, timeout=30)


async def set_policy(us: ModelServiceAsyncStub, margin: float | None) -> None:
    policies = {}
    if margin is not None:
        policy = res.RolloutPolicy(regions=list(REGIONS))
        policy.activation_margin.FromNanoseconds(int(margin * 1e9))
        policy.prepare_deadline.FromNanoseconds(120 * 10**9)
        policies["production"] = policy
    await us.UpdateModel(svc.UpdateModelRequest(
        model=res.RegisteredModel(name=f"models/{MODEL}", rollout_policies=policies),
        update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"])),
        metadata=META, timeout=30)


async def promote(us: ModelServiceAsyncStub, version: int) -> float:
    """Stages ``version``, then promotes it to production; the production call's send time."""
    await us.PromoteVersion(svc.PromoteVersionRequest(
        name=f"models/{MODEL}/stages/staging", version=version), metadata=META, timeout=30)
    sent = time.time()
    await us.PromoteVersion(svc.PromoteVersionRequest(
        name=f"models/{MODEL}/stages/production", version=version, reason="bench"),
        metadata=META, timeout=30)
    return sent


def line(label: str, values: list[float], extra: str = "") -> str:
    return (f"{label:<33}p50 {percentile(values, 0.5):.1f} ms  "
            f"p99 {percentile(values, 0.99):.1f} ms{extra}")


async def measure(cluster: Cluster, args: argparse.Namespace, tmp: Path) -> None:
    async with grpc.aio.insecure_channel(cluster.regions["us"].listen) as channel:
        us: ModelServiceAsyncStub = msg.ModelServiceStub(channel)
        await us.CreateModel(svc.CreateModelRequest(model_id=MODEL), metadata=META, timeout=30)
        total = 1 + args.rollouts + args.plain
        for n in range(1, total + 1):
            await register(us, tmp, n)
        await promote(us, 1)  # ungoverned yet: every node loads v1
        fleet = Fleet()
        try:
            await fleet.start(cluster, args.nodes)
            print(f"  {fleet.nodes} nodes serve v1", flush=True)
            await set_policy(us, args.margin)
            rollout, spread, rollback = [], [], []
            version = 1
            for i in range(args.rollouts):
                version += 1
                sent = await promote(us, version)
                times = await fleet.all_serve(version)
                rollout.append((max(times) - sent) * 1000)
                spread.append((max(times) - min(times)) * 1000)
                if i % 5 == 4:  # now and then an emergency rollback, then forward again
                    fleet.forget(version - 1)  # its earlier swaps: only the way back counts
                    back_sent = time.time()
                    await us.RollbackStage(svc.RollbackStageRequest(
                        name=f"models/{MODEL}/stages/production", reason="bench"),
                        metadata=META, timeout=30)
                    rollback.append((max(await fleet.all_serve(version - 1)) - back_sent) * 1000)
                if i % 10 == 9:
                    print(f"  {i + 1}/{args.rollouts} rollouts", flush=True)
            await set_policy(us, None)
            plain, plain_spread = [], []
            for _ in range(args.plain):
                version += 1
                sent = await promote(us, version)
                times = await fleet.all_serve(version)
                plain.append((max(times) - sent) * 1000)
                plain_spread.append((max(times) - min(times)) * 1000)
        finally:
            await fleet.stop()
    rtt = 2 * args.latency
    print(line("rollout (promote -> last node)", rollout,
               f"  ({len(rollout)} rollouts, {fleet.nodes} nodes, {args.latency:g} ms one way, "
               f"margin {args.margin * 1000:g} ms)"))
    print(line("rollout spread (first -> last)", spread, f"  max {max(spread):.1f} ms"))
    if rollback:
        print(line("emergency rollback -> last node", rollback,
                   f"  ({len(rollback)} rollbacks; target < {2 * rtt + 50:g} ms)"))
    print(line("plain promote -> last node", plain, f"  ({len(plain)} promotions)"))
    print(line("plain promote spread", plain_spread))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=40.0, help="one-way ms between regions")
    parser.add_argument("--nodes", type=int, default=100, help="serving nodes per region")
    parser.add_argument("--rollouts", type=int, default=50, help="governed promotions")
    parser.add_argument("--plain", type=int, default=20, help="ungoverned promotions")
    parser.add_argument("--margin", type=float, default=0.3, help="activation margin, seconds")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mr-bench-rollouts-",
                                 dir=os.environ.get("BENCH_TMPDIR")))
    cluster = Cluster(Options(REGIONS, args.latency / 1000, data_dir=base / "cluster",
                              base_port=0, grace=2.0, log_level="warning"))
    try:
        await cluster.start()
        await measure(cluster, args, base)
    finally:
        await cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
