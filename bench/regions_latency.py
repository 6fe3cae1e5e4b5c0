"""Three regions, injected latency: promote-to-watch across regions, and forwarding's cost.

Starts the cluster ``modelreg up --regions us,eu,ap --latency L`` starts (its ``Cluster``: per
region an etcd, a server and, outside the primary ``us``, a replicator; a latency proxy on every
inter-region link), then measures, with one asyncio gRPC channel per server:

* **us -> ap watch**: a ``WatchStages`` stream on ap's server follows one stage; each promotion
  is sent to us's server (the primary) and timed from its send to the stream's change message
  carrying its revision. The change travels us etcd -> (link) -> ap's replicator -> ap etcd ->
  ap's server -> the stream.
* **promote direct / via eu**: ``PromoteVersion`` sent to us's server, and the same to eu's
  server, which forwards it over its link to us. Alternating, so drift hits both alike; the
  forwarded figure includes one round trip over the link (2 x L).

Last lines::

    us -> ap watch       p50 X.XX ms  p99 X.XX ms  (N promotions, L ms one way)
    promote direct (us)  p50 X.XX ms  p99 X.XX ms
    promote via eu       p50 X.XX ms  p99 X.XX ms  (forwarding adds X.XX ms at p50)

Run: ``python bench/regions_latency.py [--latency 40] [--n 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from _harness import percentile

from modelreg.server.regions_cluster import Cluster, Options
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import model_service_pb2_grpc as msg
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc as wsg

if TYPE_CHECKING:
    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub

MODEL = "bench"
META = (("x-modelreg-actor", "bench"),)


async def setup(us: ModelServiceAsyncStub) -> None:
    """A model with a ``canary`` stage and two versions to move it between."""
    await us.CreateModel(svc.CreateModelRequest(
        model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"])), metadata=META)
    for n in (1, 2):
        await us.CreateModelVersion(svc.CreateModelVersionRequest(
            parent=f"models/{MODEL}", model_version=res.ModelVersion(
                artifact_uri=f"s3://bench/{n}", sha256="ab" * 32, size_bytes=10)), metadata=META)


async def promote(stub: ModelServiceAsyncStub, version: int) -> int:
    """Moves canary to ``version``; returns the commit's revision."""
    resp = await stub.PromoteVersion(svc.PromoteVersionRequest(
        name=f"models/{MODEL}/stages/canary", version=version, reason="bench"),
        metadata=META, timeout=30)
    return int(resp.revision)


async def measure(cluster: Cluster, n: int, latency_ms: float) -> None:
    addr = {name: region.listen for name, region in cluster.regions.items()}
    async with grpc.aio.insecure_channel(addr["us"]) as c_us, \
            grpc.aio.insecure_channel(addr["eu"]) as c_eu, \
            grpc.aio.insecure_channel(addr["ap"]) as c_ap:
        us: ModelServiceAsyncStub = msg.ModelServiceStub(c_us)
        eu: ModelServiceAsyncStub = msg.ModelServiceStub(c_eu)
        await setup(us)
        stream = wsg.WatchServiceStub(c_ap).WatchStages(ws.WatchStagesRequest(
            models=[MODEL], stages=["canary"]), metadata=META)
        arrived: dict[int, float] = {}
        got = asyncio.Event()

        async def follow() -> None:
            async for message in stream:
                if message.type == ws.WATCH_MESSAGE_TYPE_CHANGES:
                    arrived[int(message.revision)] = time.perf_counter()
                    got.set()

        follower = asyncio.create_task(follow())
        watch, direct, forwarded = [], [], []
        version = 2
        try:
            for i in range(n):
                version = 3 - version
                sent = time.perf_counter()
                revision = await promote(us, version)
                direct.append((time.perf_counter() - sent) * 1000)
                while revision not in arrived:
                    got.clear()
                    await asyncio.wait_for(got.wait(), 30)
                watch.append((arrived[revision] - sent) * 1000)
                version = 3 - version
                sent = time.perf_counter()
                await promote(eu, version)
                forwarded.append((time.perf_counter() - sent) * 1000)
                if i % 50 == 49:
                    print(f"  {i + 1}/{n} rounds", flush=True)
        finally:
            follower.cancel()
            stream.cancel()
    p50_direct, p50_forwarded = percentile(direct, 0.5), percentile(forwarded, 0.5)
    print(f"us -> ap watch       p50 {percentile(watch, 0.5):.2f} ms  "
          f"p99 {percentile(watch, 0.99):.2f} ms  ({n} promotions, {latency_ms:g} ms one way)")
    print(f"promote direct (us)  p50 {p50_direct:.2f} ms  p99 {percentile(direct, 0.99):.2f} ms")
    print(f"promote via eu       p50 {p50_forwarded:.2f} ms  "
          f"p99 {percentile(forwarded, 0.99):.2f} ms  "
          f"(forwarding adds {p50_forwarded - p50_direct:.2f} ms at p50)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=40.0, help="one-way ms between regions")
    parser.add_argument("--n", type=int, default=200, help="rounds (one of each promotion)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mr-bench-regions-", dir=os.environ.get("BENCH_TMPDIR")))
    cluster = Cluster(Options(("us", "eu", "ap"), args.latency / 1000, data_dir=base,
                              base_port=0, grace=2.0, log_level="warning"))
    try:
        await cluster.start()
        await measure(cluster, args.n, args.latency)
    finally:
        await cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
