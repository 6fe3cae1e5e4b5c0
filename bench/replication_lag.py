"""Replication lag: from a commit on the primary to the region having applied it.

Starts two private etcds (the primary and a region; real disk, default fsync) and a replicator
child process (``python -m modelreg.replication``), then writes promotion-shaped Txns to the
primary at a steady rate (pointer, history entry and audit event: three puts of about the sizes
the server writes, over ``MODELS`` models in turn) and watches the region's state key. A
write's lag is the time from its Txn's response to the first regional state whose applied
revision covers it. ``--latency 40`` puts the latency proxy (``modelreg.server.latency_proxy``,
the one ``modelreg up --regions`` uses) between the replicator and the primary's etcd, delaying
each direction by that many milliseconds, as a replicator in another region would see it. The
writer is sequential, so the rate it reaches is bounded by the primary's commit latency.

Last lines::

    replication lag      p50 X.XX ms  p99 X.XX ms  at N writes/s (M writes)
    regional commits     K for M primary revisions (R revisions per commit)

Run: ``python bench/replication_lag.py [--rate 100] [--seconds 20] [--warmup 2] [--latency 0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aetcd
from _harness import percentile
from aetcd import rpc

from modelreg.replication import layout
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.server.latency_proxy import LatencyProxy

PREFIX = "/bench/"
SIZES = (180, 260, 420)
"""Bytes of the pointer, history and audit values a promotion writes (about)."""
MODELS = 20
"""Models promoted in turn. One key never appears twice in a regional commit (a regional watch
must see each of its changes), so a single pointer moved at a high rate would cost one regional
Txn per revision; promotions spread over models batch."""


def start_etcd(base: Path, name: str) -> EmbeddedEtcd:
    etcd = EmbeddedEtcd(base / name, name=name)
    etcd.start()
    return etcd


async def watch_applied(region: aetcd.Client, seen: list[tuple[float, int]],
                        ready: asyncio.Event) -> None:
    """Records (arrival time, applied revision) for every state the region commits."""
    key = layout.state_key(PREFIX.encode())
    call = rpc.WatchStub(region.channel).Watch(metadata=region.metadata)
    await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=key)))
    try:
        while True:
            resp = await call.read()
            now = time.perf_counter()
            ready.set()
            for event in resp.events:
                seen.append((now, layout.State.decode(bytes(event.kv.value)).applied))
    finally:
        call.cancel()


async def write(primary: aetcd.Client, n: int) -> int:
    p = PREFIX.encode()
    model = b"m%02d" % (n % MODELS)
    ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=p + key, value=os.urandom(size)))
           for key, size in ((b"stages/%s/canary" % model, SIZES[0]),
                             (b"history/%s/canary/%012d" % (model, n), SIZES[1]),
                             (b"audit/%020d-%08x" % (time.time_ns(), n), SIZES[2]))]
    resp = await primary.kvstub.Txn(rpc.TxnRequest(success=ops))
    return int(resp.header.revision)


async def measure(primary: aetcd.Client, region: aetcd.Client, rate: float, seconds: float,
                  warmup: float) -> None:
    seen: list[tuple[float, int]] = []
    ready = asyncio.Event()
    watcher = asyncio.create_task(watch_applied(region, seen, ready))
    await asyncio.wait_for(ready.wait(), 30)
    commits: list[tuple[float, int]] = []
    start = time.perf_counter()
    n = 0
    while (elapsed := time.perf_counter() - start) < warmup + seconds:
        revision = await write(primary, n)
        if elapsed >= warmup:
            commits.append((time.perf_counter(), revision))
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    last = commits[-1][1]
    deadline = time.monotonic() + 60
    while not seen or seen[-1][1] < last:
        if time.monotonic() > deadline:
            raise SystemExit("the region did not catch up within 60 s")
        await asyncio.sleep(0.01)
    watcher.cancel()
    lags, i = [], 0
    for committed, revision in commits:
        while seen[i][1] < revision:
            i += 1
        lags.append(max(0.0, seen[i][0] - committed) * 1000)
    states = sum(1 for _, applied in seen if commits[0][1] <= applied <= last)
    print(f"replication lag      p50 {percentile(lags, 0.5):.2f} ms  "
          f"p99 {percentile(lags, 0.99):.2f} ms  at {rate:g} writes/s ({len(commits)} writes)")
    print(f"regional commits     {states} for {len(commits)} primary revisions "
          f"({len(commits) / max(states, 1):.2f} revisions per commit)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="primary writes per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="one-way milliseconds between the replicator and the primary")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="mr-bench-repl-", dir=os.environ.get("BENCH_TMPDIR")))
    primary = start_etcd(base, "primary")
    region = start_etcd(base, "region")
    try:
        async with LatencyProxy(primary.endpoint, args.latency / 1000, name="us->bench") as link:
            replicator = subprocess.Popen(  # noqa: ASYNC220 - once, before anything is measured
                [sys.executable, "-m", "modelreg.replication", "--primary", link.address,
                 "--region-etcd", region.endpoint, "--region", "bench", "--prefix", PREFIX,
                 "--replica-id", "bench", "--log-level", "error"],
                stdin=subprocess.DEVNULL)
            try:
                print(f"injected latency     {args.latency:g} ms one way "
                      "(replicator <-> primary)")
                async with aetcd.Client(primary.host, primary.client_port) as p, \
                        aetcd.Client(region.host, region.client_port) as r:
                    await measure(p, r, args.rate, args.seconds, args.warmup)
            finally:
                # Before the proxy closes, so the replicator has nothing to complain about.
                replicator.terminate()
                try:
                    replicator.wait(10)
                except subprocess.TimeoutExpired:
                    replicator.kill()
                    replicator.wait()
    finally:
        region.stop()
        primary.stop()
        shutil.rmtree(base, ignore_errors=True)

if __name__ == "__main__":
    asyncio.run(main())
