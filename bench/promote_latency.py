"""PromoteVersion latency and throughput against raw etcd compare-and-swap, in one run.

Starts a private etcd (real disk, default fsync) and a ``modelreg serve`` child process, then
measures, on the same etcd and in alternating rounds so drift hits both sides alike:

* **raw etcd CAS txn** - one etcd ``Txn`` per operation, sent with aetcd's ``kvstub``: one
  compare (the pointer key's ``mod_revision`` equals the one the previous Txn produced) and three
  puts of the sizes the server writes for a promotion (pointer, a new history key, a new audit
  key; sizes read back from what the server actually wrote). One round trip, one fsync.
* **modelreg promote** - ``PromoteVersion`` over one asyncio gRPC channel, alternating versions
  1 and 2 on a ``canary`` stage, each carrying the etag of the previous response (a real CAS).

Latency is sequential (one operation in flight); throughput runs ``--concurrency`` workers, each
on its own key / model so they never conflict. The last three lines are the figures::

    raw etcd CAS txn     p50 X.XX ms  p99 X.XX ms  throughput N ops/s (C concurrent)
    modelreg promote     p50 X.XX ms  p99 X.XX ms  throughput N ops/s (C concurrent)
    ratio promote/raw    p50 X.XX  p99 X.XX  throughput X.XX

Run: ``python bench/promote_latency.py [--n 2000] [--concurrency 16] [--warmup 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aetcd
import grpc
from _harness import (
    PREFIX,
    RPC_TIMEOUT,
    STAGE,
    Server,
    create_model,
    interrupt_on_sigterm,
    make_tmpdir,
    percentile,
    remove_tmpdir,
    serving,
    wait_serving,
)
from aetcd import rpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import model_service_pb2_grpc

if TYPE_CHECKING:
    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub

RAW_PREFIX = "/rawbench/"
LATENCY_MODEL = "bench-latency"
DEFAULT_SIZES = (200, 150, 250)
"""Fallback (pointer, history, audit) value sizes if the server's cannot be read back."""

Op = Callable[[], Awaitable[None]]


# -- statistics ------------------------------------------------------------------------------


@dataclass
class Result:
    """Figures of one side of the comparison."""

    latencies_ms: list[float]
    throughput: float
    concurrent_p50_ms: float
    concurrent_p99_ms: float

    @property
    def p50(self) -> float:
        """Median sequential latency in ms."""
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        """99th-percentile sequential latency in ms."""
        return percentile(self.latencies_ms, 0.99)


async def sequential(op: Op, count: int) -> list[float]:
    """Runs ``op`` ``count`` times one after another; per-call wall time in ms."""
    out: list[float] = []
    for _ in range(count):
        start = time.perf_counter_ns()
        await op()
        out.append((time.perf_counter_ns() - start) / 1e6)
    return out


async def concurrent(ops: Sequence[Op], per_worker: int) -> tuple[float, list[float]]:
    """Runs each worker's ``op`` ``per_worker`` times, all workers at once.

    Returns:
        (operations per second over the whole wall time, per-call latencies in ms)

    """
    latencies: list[float] = []

    async def worker(op: Op) -> None:
        latencies.extend(await sequential(op, per_worker))

    start = time.perf_counter()
    await asyncio.gather(*(worker(op) for op in ops))
    elapsed = time.perf_counter() - start
    return len(ops) * per_worker / elapsed, latencies


# -- raw etcd --------------------------------------------------------------------------------


class RawCas:
    """One key moved by single-round-trip CAS Txns shaped like a promotion's."""

    def __init__(self, client: aetcd.Client, name: str, sizes: tuple[int, int, int]) -> None:
        self._client = client
        self._pointer = f"{RAW_PREFIX}stages/{name}/{STAGE}".encode()
        self._history = f"{RAW_PREFIX}history/{name}/{STAGE}/"
        self._sizes = sizes
        self._mod_revision = 0
        self._generation = 0

    async def __call__(self) -> None:
        """One CAS: compare the pointer's mod_revision, put pointer + history + audit."""
        pointer_size, history_size, audit_size = self._sizes
        self._generation += 1
        audit_key = f"{RAW_PREFIX}audit/{time.time_ns():020d}-{random.getrandbits(32):08x}"
        txn = rpc.TxnRequest(
            compare=[rpc.Compare(
                key=self._pointer, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL,
                mod_revision=self._mod_revision,
            )],
            success=[
                rpc.RequestOp(request_put=rpc.PutRequest(
                    key=self._pointer, value=os.urandom(pointer_size))),
                rpc.RequestOp(request_put=rpc.PutRequest(
                    key=f"{self._history}{self._generation:012d}".encode(),
                    value=os.urandom(history_size))),
                rpc.RequestOp(request_put=rpc.PutRequest(
                    key=audit_key.encode(), value=os.urandom(audit_size))),
            ],
        )
        resp = await self._client.kvstub.Txn(
            txn, timeout=RPC_TIMEOUT, metadata=self._client.metadata
        )
        if not resp.succeeded:
            raise RuntimeError(f"raw CAS on {self._pointer!r} lost: nobody else writes it")
        self._mod_revision = resp.header.revision


# -- modelreg --------------------------------------------------------------------------------


class Promoter:
    """Moves one model's canary pointer between versions 1 and 2, with the last etag."""

    def __init__(self, stub: ModelServiceAsyncStub, model_id: str) -> None:
        self._stub = stub
        self._name = f"models/{model_id}/stages/{STAGE}"
        self._etag = ""
        self._version = 0

    async def __call__(self) -> None:
        """One PromoteVersion to the other version, carrying the previous response's etag."""
        self._version = 2 if self._version == 1 else 1
        resp = await self._stub.PromoteVersion(
            svc.PromoteVersionRequest(name=self._name, version=self._version, etag=self._etag),
            timeout=RPC_TIMEOUT,
        )
        self._etag = resp.stage.etag


async def promotion_sizes(client: aetcd.Client, model_id: str) -> tuple[int, int, int]:
    """Value sizes of the pointer, latest history entry and latest audit event in etcd."""
    pointer = await client.get(f"{PREFIX}stages/{model_id}/{STAGE}".encode())
    history_prefix = f"{PREFIX}history/{model_id}/{STAGE}/".encode()
    history = list(await client.get_prefix(history_prefix))
    audit = list(await client.get_prefix(f"{PREFIX}audit/".encode()))
    if pointer is None or not history or not audit:
        return DEFAULT_SIZES
    return len(pointer.value), len(history[-1].value), len(audit[-1].value)


# -- the benchmark ---------------------------------------------------------------------------


async def measure(args: argparse.Namespace, server: Server) -> tuple[Result, Result]:
    """Sets up models and keys, then measures both sides in alternating rounds."""
    concurrency: int = args.concurrency
    rounds: int = args.rounds
    etcd, listen, proc = server.etcd, server.listen, server.proc
    channel = grpc.aio.insecure_channel(listen)
    client = aetcd.Client(etcd.host, etcd.client_port, timeout=None)
    await client.connect()
    try:
        await wait_serving(channel, proc, server.log)
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        await create_model(stub, LATENCY_MODEL)
        throughput_models = [f"bench-tp-{i}" for i in range(concurrency)]
        for model_id in throughput_models:
            await create_model(stub, model_id)

        promote = Promoter(stub, LATENCY_MODEL)
        await sequential(promote, 3)
        sizes = await promotion_sizes(client, LATENCY_MODEL)
        raw = RawCas(client, "latency", sizes)
        print(f"etcd {etcd.endpoint} (data in {etcd.data_dir}), server {listen} pid {proc.pid}")
        print(f"raw baseline: 1 Txn = 1 compare (pointer mod_revision) + 3 puts of "
              f"{sizes[0]}+{sizes[1]}+{sizes[2]} = {sum(sizes)} bytes "
              f"(pointer, new history key, new audit key; sizes as the server wrote them)")
        print("promote: PromoteVersion, versions 1<->2 on 'canary', etag of previous response")

        # Warm-up: both paths, excluded from every figure.
        await sequential(raw, args.warmup)
        await sequential(promote, args.warmup)

        raw_lat: list[float] = []
        promote_lat: list[float] = []
        per_round = max(1, args.n // rounds)
        for i in range(rounds):
            # Alternate which side goes first, so neither always follows the other.
            first, second = (raw, raw_lat), (promote, promote_lat)
            for op, sink in (first, second) if i % 2 == 0 else (second, first):
                sink.extend(await sequential(op, per_round))

        # Context, not compared: one Python gRPC round trip to the same server, no etcd.
        health_stub = health_pb2_grpc.HealthStub(channel)

        async def check() -> None:
            await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)

        await sequential(check, args.warmup)
        hop = await sequential(check, max(1, args.n // 2))
        print(f"grpc health Check on the server (Python gRPC hop, no etcd): "
              f"p50 {percentile(hop, 0.5):.2f} ms  p99 {percentile(hop, 0.99):.2f} ms")

        raw_ops: list[Op] = [RawCas(client, f"tp-{i}", sizes) for i in range(concurrency)]
        promote_ops: list[Op] = [Promoter(stub, m) for m in throughput_models]
        per_worker = max(1, args.n // concurrency)
        warm = max(1, args.warmup // concurrency)
        await concurrent(raw_ops, warm)
        await concurrent(promote_ops, warm)
        raw_tps: list[float] = []
        promote_tps: list[float] = []
        raw_clat: list[float] = []
        promote_clat: list[float] = []
        tp_rounds = 2  # equal op counts: the harmonic mean of rates is total ops / total time
        for i in range(tp_rounds):
            order = [(raw_ops, raw_tps, raw_clat), (promote_ops, promote_tps, promote_clat)]
            for ops, tps, clat in order if i % 2 == 0 else order[::-1]:
                tps_value, lat = await concurrent(ops, max(1, per_worker // tp_rounds))
                tps.append(tps_value)
                clat.extend(lat)
        return (
            Result(raw_lat, statistics.harmonic_mean(raw_tps),
                   percentile(raw_clat, 0.5), percentile(raw_clat, 0.99)),
            Result(promote_lat, statistics.harmonic_mean(promote_tps),
                   percentile(promote_clat, 0.5), percentile(promote_clat, 0.99)),
        )
    finally:
        await channel.close()
        await client.close()


def report(raw: Result, promote: Result, concurrency: int) -> None:
    """Prints the table, then the three figure lines last."""
    print()
    print(f"{'':20} {'n':>6} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}   "
          f"{'conc p50':>8} {'conc p99':>8} {'ops/s':>8}")
    for label, r in (("raw etcd CAS txn", raw), ("modelreg promote", promote)):
        lat = r.latencies_ms
        print(f"{label:20} {len(lat):>6} {statistics.fmean(lat):>8.2f} {r.p50:>8.2f} "
              f"{percentile(lat, 0.9):>8.2f} {r.p99:>8.2f} {max(lat):>8.2f}   "
              f"{r.concurrent_p50_ms:>8.2f} {r.concurrent_p99_ms:>8.2f} {r.throughput:>8.0f}")
    print("(latencies in ms; sequential unless 'conc': "
          f"{concurrency} concurrent workers, each on its own key/model)")
    print()
    for label, r in (("raw etcd CAS txn", raw), ("modelreg promote", promote)):
        print(f"{label:20} p50 {r.p50:.2f} ms  p99 {r.p99:.2f} ms  "
              f"throughput {r.throughput:.0f} ops/s ({concurrency} concurrent)")
    print(f"{'ratio promote/raw':20} p50 {promote.p50 / raw.p50:.2f}  "
          f"p99 {promote.p99 / raw.p99:.2f}  throughput {promote.throughput / raw.throughput:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000,
                        help="measured operations per side, sequential and concurrent")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="workers for the throughput figure")
    parser.add_argument("--warmup", type=int, default=200,
                        help="unmeasured operations per side before measuring")
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating raw/promote rounds the sequential n is split into")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (etcd data, server log)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--n, --concurrency, --rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code."""
    args = parse_args(argv)
    # SIGTERM cleans up like Ctrl-C does: leaving `serving` stops the server and etcd.
    interrupt_on_sigterm()
    tmp = make_tmpdir()
    try:
        with serving(tmp) as server:
            raw, promote = asyncio.run(measure(args, server))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        remove_tmpdir(tmp, args.keep)
    report(raw, promote, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
