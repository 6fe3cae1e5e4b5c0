"""WatchStages fan-out: delivery latency and server memory per stream, against raw etcd watches.

For each N in ``--streams`` it starts a private etcd (real disk, default fsync) and a fresh
``modelreg serve`` child process, creates a model with a ``canary`` stage and versions 1 and 2,
and runs two phases, each with a fresh **client process** (this file with ``--client``, driven
over JSON lines on its stdin/stdout; asyncio, one event loop, streams spread over
``--connections`` HTTP/2 connections):

* **modelreg watch** - N ``WatchStages`` streams selecting the model's ``canary`` stage, each
  counted as held once its SNAPSHOT arrived;
* **raw etcd watch** - N etcd ``Watch`` bidi streams, one ``create_request`` on the pointer key
  (``<prefix>stages/<model>/canary``) each, counted as held once etcd confirmed ``created``.

Then the parent makes ``--promotions`` PromoteVersion calls one at a time (versions 1 and 2
alternately, with the previous etag), after ``--warmup`` unmeasured ones. After each, it asks
the client for the receive time of that revision at every stream (waiting until every held
stream has it, or ``--deliver-timeout``). Delivery latency = receive time (``time.monotonic()``
in the client) - return time of the promote RPC (``time.monotonic()`` in the parent):
CLOCK_MONOTONIC is one clock for every process on Linux. A change can reach a stream before
the RPC's response reaches the parent; such samples are slightly negative and kept as they are.

Memory: VmRSS of the server (resp. etcd) process before the streams opened and once all were
held; per stream = delta / streams held. CPU: the server's, etcd's and the client's CPU seconds
over the measured promotions (utime + stime from /proc), as a share of one core.

The last lines are the figures, per N::

    N=.. modelreg watch  delivery p50 X ms  p99 X ms  max X ms  server RSS X KiB/stream  (h/N ..)
    N=.. raw etcd watch  delivery p50 X ms  p99 X ms  max X ms  etcd RSS X KiB/watch  (h/N ..)
    N=.. ratio modelreg/raw  p50 X  p99 X  max X  RSS/stream X

Run: ``python bench/watch_fanout.py [--streams 1000,10000] [--promotions 20] [--warmup 3]
[--connections 50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
from _harness import (
    PREFIX,
    RPC_TIMEOUT,
    STAGE,
    Server,
    create_model,
    interrupt_on_sigterm,
    log_tail,
    make_tmpdir,
    percentile,
    remove_tmpdir,
    serving,
    stop_group,
    wait_serving,
)
from aetcd import rpc

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import model_service_pb2_grpc, watch_service_pb2_grpc
from modelreg.v1 import watch_service_pb2 as ws

if TYPE_CHECKING:
    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub
    from modelreg.v1.watch_service_pb2_grpc import WatchServiceAsyncStub

MODEL = "bench-watch"
OPEN_BATCH = 500
"""Streams the client starts at once; it waits for their first message before the next batch."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Json = dict[str, Any]


# -- statistics and /proc ----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime (14), stime (15)


def thread_count(pid: int) -> int:
    """Threads of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def raise_fd_limit() -> int:
    """Raises the soft open-files limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def channel_options(index: int) -> list[tuple[str, Any]]:
    """Options that give every channel its own TCP connection (no shared subchannel)."""
    return [
        ("grpc.use_local_subchannel_pool", 1),
        ("bench.channel_index", index),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]


# -- the client process ------------------------------------------------------------------------


@dataclass
class ClientState:
    """What the client process's streams saw."""

    received: defaultdict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Revision -> receive times (one per stream that got a change at that revision)."""
    opened: int = 0
    """Streams that got their first message (SNAPSHOT, or etcd's ``created``)."""
    live: int = 0
    """Streams held right now."""
    errors: Counter[str] = field(default_factory=Counter)
    """How streams ended, by status code name."""
    other_messages: Counter[str] = field(default_factory=Counter)
    want: int = -1
    """The revision ``collect`` waits for: a stream that completes it sets ``complete``."""
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def got(self, revision: int, now: float) -> None:
        """One stream received the change at ``revision`` at ``now``."""
        times = self.received[revision]
        times.append(now)
        if revision == self.want and len(times) >= self.live:
            self.complete.set()


async def modelreg_stream(
    stub: WatchServiceAsyncStub, state: ClientState, first: asyncio.Event
) -> None:
    """One WatchStages stream: records the receive time of every CHANGES message."""
    request = ws.WatchStagesRequest(models=[MODEL], stages=[STAGE])
    held = False
    try:
        call = stub.WatchStages(request)
        async for message in call:
            now = time.monotonic()
            if message.type == ws.WATCH_MESSAGE_TYPE_CHANGES:
                state.got(message.revision, now)
            elif message.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT and not held:
                held = True
                state.opened += 1
                state.live += 1
                first.set()
            else:
                state.other_messages[ws.WatchMessageType.Name(message.type)] += 1
        state.errors["EOF"] += 1
    except grpc.aio.AioRpcError as err:
        state.errors[err.code().name] += 1
    finally:
        if held:
            state.live -= 1
        first.set()


async def etcd_stream(stub: rpc.WatchStub, key: bytes, state: ClientState,
                      first: asyncio.Event) -> None:
    """One etcd Watch stream with one watch on ``key``: records each event revision's time."""
    held = False
    call = stub.Watch()
    try:
        await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=key)))
        while True:
            resp = await call.read()
            now = time.monotonic()
            if resp is grpc.aio.EOF:
                state.errors["EOF"] += 1
                return
            if resp.created and not held:
                held = True
                state.opened += 1
                state.live += 1
                first.set()
            if resp.canceled:
                state.errors["CANCELED:" + resp.cancel_reason] += 1
                return
            for revision in {e.kv.mod_revision for e in resp.events}:
                state.got(revision, now)
    except grpc.aio.AioRpcError as err:
        state.errors[err.code().name] += 1
    finally:
        call.cancel()
        if held:
            state.live -= 1
        first.set()


class Client:
    """The client role: holds the streams and answers the parent's commands."""

    def __init__(self) -> None:
        self.state = ClientState()
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def open(self, cmd: Json) -> Json:
        """Opens ``n`` streams of ``side`` over ``connections`` channels, in batches."""
        n: int = cmd["n"]
        side: str = cmd["side"]
        connections: int = max(1, min(cmd["connections"], n))
        deadline = time.monotonic() + cmd["timeout"]
        self.channels = [grpc.aio.insecure_channel(cmd["target"], options=channel_options(i))
                         for i in range(connections)]
        stubs: list[Any]
        if side == "modelreg":
            stubs = [watch_service_pb2_grpc.WatchServiceStub(c) for c in self.channels]
        else:
            stubs = [rpc.WatchStub(c) for c in self.channels]
        key = cmd["key"].encode()
        started = time.monotonic()
        timed_out = False
        for base in range(0, n, OPEN_BATCH):
            firsts = []
            for i in range(base, min(n, base + OPEN_BATCH)):
                first = asyncio.Event()
                firsts.append(first)
                stub = stubs[i % connections]
                coro = (modelreg_stream(stub, self.state, first) if side == "modelreg"
                        else etcd_stream(stub, key, self.state, first))
                self.tasks.append(asyncio.create_task(coro))
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            waits = [asyncio.create_task(f.wait()) for f in firsts]
            _, pending = await asyncio.wait(waits, timeout=left)
            for task in pending:
                task.cancel()
            if pending:
                timed_out = True
                break
        return {"opened": self.state.opened, "live": self.state.live, "started": len(self.tasks),
                "open_s": time.monotonic() - started, "timed_out": timed_out,
                "errors": dict(self.state.errors)}

    async def collect(self, cmd: Json) -> Json:
        """Receive times of ``revision`` once every live stream has it (or at the timeout)."""
        revision: int = cmd["revision"]
        deadline = time.monotonic() + cmd["timeout"]
        state = self.state
        state.want = revision
        state.complete.clear()
        times = state.received[revision]
        # Streams can end while we wait (live drops): re-check at least twice a second.
        while len(times) < state.live and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.complete.wait(), min(0.5, left))
        state.want = -1
        out = list(times)
        del self.state.received[revision]
        for old in [r for r in self.state.received if r < revision]:
            del self.state.received[old]  # stragglers of earlier revisions: not counted twice
        return {"times": out, "live": self.state.live, "errors": dict(self.state.errors),
                "other": dict(self.state.other_messages)}

    async def close(self) -> Json:
        """Cancels every stream and closes the channels."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}


def send(out: IO[str], message: Json) -> None:
    """One JSON line to the parent."""
    out.write(json.dumps(message) + "\n")
    out.flush()


async def client_main() -> int:
    """Runs commands from stdin (JSON lines) until ``close`` or EOF; answers on stdout."""
    raise_fd_limit()
    client = Client()
    out = sys.stdout
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            await client.close()
            return 0
        cmd: Json = json.loads(line)
        if cmd["cmd"] == "open":
            send(out, await client.open(cmd))
        elif cmd["cmd"] == "collect":
            send(out, await client.collect(cmd))
        elif cmd["cmd"] == "cpu":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            send(out, {"cpu_s": usage.ru_utime + usage.ru_stime})
        elif cmd["cmd"] == "close":
            send(out, await client.close())
            return 0
        else:
            raise ValueError(f"unknown command {cmd!r}")


class ClientProcess:
    """The parent's handle on one client child process."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--client"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True,
            )

    async def call(self, **cmd: Any) -> Json:
        """Sends one command, waits for its answer."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"client process exited with {self.proc.returncode}:\n"
                               f"{log_tail(self.log)}")
        answer: Json = json.loads(line)
        return answer

    def stop(self) -> None:
        """Closes its stdin (it closes its streams and exits); SIGKILLs its group after 10 s."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        stop_group(self.proc, None)


# -- promotions --------------------------------------------------------------------------------


class Promoter:
    """Moves the model's canary pointer between versions 1 and 2, with the last etag."""

    def __init__(self, stub: ModelServiceAsyncStub) -> None:
        self._stub = stub
        self._name = f"models/{MODEL}/stages/{STAGE}"
        self._etag = ""
        self._version = 0

    async def __call__(self) -> tuple[int, float]:
        """One PromoteVersion; returns (revision of the change, monotonic return time)."""
        self._version = 2 if self._version == 1 else 1
        resp = await self._stub.PromoteVersion(
            svc.PromoteVersionRequest(name=self._name, version=self._version, etag=self._etag),
            timeout=RPC_TIMEOUT,
        )
        returned = time.monotonic()
        self._etag = resp.stage.etag
        return int(resp.stage.etag.strip('"')), returned


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Side:
    """Figures of one side (modelreg or raw etcd) at one N."""

    label: str
    n: int
    held: int = 0
    open_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    """Receive time - return time of the promote RPC, per stream and promotion."""
    from_send_ms: list[float] = field(default_factory=list)
    """Receive time - send time of the promote RPC: an upper bound of commit-to-delivery."""
    per_promotion_max_ms: list[float] = field(default_factory=list)
    missing: int = 0
    """Samples expected (streams held x promotions) but not received in time."""
    rss_before_kib: int = 0
    rss_held_kib: int = 0
    rss_after_kib: int = 0
    server_cpu: float = 0.0
    etcd_cpu: float = 0.0
    client_cpu: float = 0.0
    """CPU seconds per wall second during the measured promotions."""
    promote_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)
    threads: int = 0

    @property
    def rss_per_stream_kib(self) -> float:
        """RSS growth of the serving process per stream held."""
        return (self.rss_held_kib - self.rss_before_kib) / self.held if self.held else float("nan")

    def pct(self, q: float) -> float:
        """Delivery latency quantile in ms."""
        return percentile(self.latencies_ms, q)


async def measure_side(args: argparse.Namespace, run: Server, side: str, n: int,
                       promote: Promoter) -> Side:
    """Opens N streams of one side in a fresh client process, then times the promotions."""
    label = "modelreg watch" if side == "modelreg" else "raw etcd watch"
    result = Side(label, n)
    etcd_pid = run.etcd.pid
    assert etcd_pid is not None
    watched_pid = run.proc.pid if side == "modelreg" else etcd_pid
    client = ClientProcess(run.log.parent / f"client-{side}-{n}.log")
    try:
        await asyncio.sleep(1.0)  # let the previous phase's frees settle
        result.rss_before_kib = rss_kib(watched_pid)
        target = run.listen if side == "modelreg" else f"{run.etcd.host}:{run.etcd.client_port}"
        opened = await client.call(
            cmd="open", side=side, n=n, connections=args.connections, target=target,
            key=f"{PREFIX}stages/{MODEL}/{STAGE}", timeout=args.open_timeout,
        )
        result.held = opened["live"]
        result.open_s = opened["open_s"]
        await asyncio.sleep(1.0)
        result.rss_held_kib = rss_kib(watched_pid)
        result.threads = thread_count(watched_pid)
        print(f"  {label}: {opened['live']}/{n} held ({opened['opened']} opened, "
              f"{opened['started']} started) in {opened['open_s']:.1f} s"
              f"{', TIMED OUT' if opened['timed_out'] else ''}; errors {opened['errors']}; "
              f"RSS {result.rss_before_kib} -> {result.rss_held_kib} KiB", flush=True)
        if result.held == 0:
            return result

        async def one(measured: bool) -> None:
            started = time.monotonic()
            revision, returned = await promote()
            answer = await client.call(cmd="collect", revision=revision,
                                       timeout=args.deliver_timeout)
            if not measured:
                return
            result.promote_ms.append((returned - started) * 1000)
            lat = [(t - returned) * 1000 for t in answer["times"]]
            result.latencies_ms.extend(lat)
            result.from_send_ms.extend((t - started) * 1000 for t in answer["times"])
            result.per_promotion_max_ms.append(max(lat) if lat else float("nan"))
            result.missing += max(0, answer["live"] - len(lat))
            result.errors = answer["errors"]
            result.other = answer["other"]

        for _ in range(args.warmup):
            await one(False)
        cpu0 = (cpu_seconds(run.proc.pid), cpu_seconds(etcd_pid),
                (await client.call(cmd="cpu"))["cpu_s"])
        wall0 = time.monotonic()
        for _ in range(args.promotions):
            await one(True)
        wall = time.monotonic() - wall0
        cpu1 = (cpu_seconds(run.proc.pid), cpu_seconds(etcd_pid),
                (await client.call(cmd="cpu"))["cpu_s"])
        result.server_cpu, result.etcd_cpu, result.client_cpu = (
            (b - a) / wall for a, b in zip(cpu0, cpu1, strict=True))
        result.rss_after_kib = rss_kib(watched_pid)
        if run.proc.poll() is not None:
            raise RuntimeError(f"modelreg serve exited with {run.proc.returncode}")
        await client.call(cmd="close")
        return result
    finally:
        client.stop()


async def measure_n(args: argparse.Namespace, run: Server, n: int) -> tuple[Side, Side]:
    """Both phases at one N against one fresh server."""
    channel = grpc.aio.insecure_channel(run.listen)
    try:
        await wait_serving(channel, run.proc, run.log)
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        await create_model(stub, MODEL)
        promote = Promoter(stub)
        for _ in range(3):
            await promote()
        print(f"N={n}: etcd {run.etcd.endpoint} pid {run.etcd.pid}, "
              f"server {run.listen} pid {run.proc.pid}", flush=True)
        ours = await measure_side(args, run, "modelreg", n, promote)
        raw = await measure_side(args, run, "etcd", n, promote)
        return ours, raw
    finally:
        await channel.close()


def run_n(args: argparse.Namespace, n: int, root: Path) -> tuple[Side, Side]:
    """Starts etcd and a server for one N, measures, and stops both on every exit path."""
    tmp = root / f"n{n}"
    tmp.mkdir()
    with serving(tmp, ["--bookmark-interval", str(args.bookmark_interval)]) as run:
        try:
            return asyncio.run(measure_n(args, run, n))
        except Exception:
            print(f"server log tail:\n{log_tail(run.log)}", file=sys.stderr)
            raise


def report(results: list[tuple[Side, Side]], args: argparse.Namespace) -> None:
    """Prints the table, then the figure lines last."""
    print()
    print(f"{'':24} {'held':>11} {'open s':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} "
          f"{'mean':>8} {'miss':>5} {'RSS0 MiB':>8} {'RSSn MiB':>8} {'KiB/str':>7} "
          f"{'srv cpu':>7} {'etcd cpu':>8} {'cli cpu':>7} {'promote':>7} {'<0':>5} "
          f"{'s-p50':>7} {'s-p99':>7}")
    for pair in results:
        for s in pair:
            name = f"N={s.n} {s.label}"
            lat = s.latencies_ms or [float("nan")]
            print(f"{name:24} {f'{s.held}/{s.n}':>11} {s.open_s:>6.1f} {s.pct(.5):>8.1f} "
                  f"{s.pct(.9):>8.1f} {s.pct(.99):>8.1f} {max(lat):>8.1f} "
                  f"{statistics.fmean(lat):>8.1f} {s.missing:>5} "
                  f"{s.rss_before_kib / 1024:>8.1f} {s.rss_held_kib / 1024:>8.1f} "
                  f"{s.rss_per_stream_kib:>7.1f} {s.server_cpu:>7.0%} {s.etcd_cpu:>8.0%} "
                  f"{s.client_cpu:>7.0%} {statistics.median(s.promote_ms or [0]):>7.1f} "
                  f"{sum(1 for x in s.latencies_ms if x < 0):>5} "
                  f"{percentile(s.from_send_ms, .5):>7.1f} {percentile(s.from_send_ms, .99):>7.1f}")
    print(f"(delivery latencies in ms over held streams x {args.promotions} promotions; "
          f"'miss' = samples not delivered within {args.deliver_timeout:g} s; cpu = CPU "
          f"seconds per wall second during the promotions (100% = one core); 'promote' = "
          f"median PromoteVersion ms; '<0' = samples that arrived before the promote RPC "
          f"returned; s-p50/s-p99 = delivery measured from the promote RPC's send instead, an "
          f"upper bound of commit-to-delivery; {args.connections} connections per client)")
    for pair in results:
        for s in pair:
            worst = ", ".join(f"{v:.0f}" for v in s.per_promotion_max_ms)
            extra = (f"; stream ends {s.errors}" if s.errors else "") + (
                f"; other messages {s.other}" if s.other else "")
            print(f"N={s.n} {s.label}: last stream per promotion (ms): {worst}; "
                  f"RSS after promotions {s.rss_after_kib / 1024:.1f} MiB; "
                  f"{s.threads} threads{extra}")
    print()
    for ours, raw in results:
        n = ours.n
        print(f"N={n} modelreg watch  delivery p50 {ours.pct(.5):.1f} ms  "
              f"p99 {ours.pct(.99):.1f} ms  max {max(ours.latencies_ms or [float('nan')]):.1f} ms"
              f"  server RSS {ours.rss_per_stream_kib:.1f} KiB/stream  "
              f"({ours.held}/{n} streams held)")
        print(f"N={n} raw etcd watch  delivery p50 {raw.pct(.5):.1f} ms  "
              f"p99 {raw.pct(.99):.1f} ms  max {max(raw.latencies_ms or [float('nan')]):.1f} ms"
              f"  etcd RSS {raw.rss_per_stream_kib:.1f} KiB/watch  "
              f"({raw.held}/{n} watches held)")
        ours_max = max(ours.latencies_ms or [float("nan")])
        raw_max = max(raw.latencies_ms or [float("nan")])
        print(f"N={n} ratio modelreg/raw  p50 {ours.pct(.5) / raw.pct(.5):.2f}  "
              f"p99 {ours.pct(.99) / raw.pct(.99):.2f}  max {ours_max / raw_max:.2f}  "
              f"RSS/stream {ours.rss_per_stream_kib / raw.rss_per_stream_kib:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", default="1000,10000",
                        help="comma-separated stream counts N, one run each")
    parser.add_argument("--promotions", type=int, default=20,
                        help="measured promotions per N and side")
    parser.add_argument("--warmup", type=int, default=3,
                        help="unmeasured promotions per N and side, after the streams opened")
    parser.add_argument("--connections", type=int, default=50,
                        help="gRPC channels (HTTP/2 connections) the streams are spread over")
    parser.add_argument("--bookmark-interval", type=float, default=10.0,
                        help="modelreg serve --bookmark-interval")
    parser.add_argument("--open-timeout", type=float, default=300.0,
                        help="seconds to wait for all streams of a side to be held")
    parser.add_argument("--deliver-timeout", type=float, default=30.0,
                        help="seconds to wait for a promotion to reach every held stream")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (etcd data, server and client logs)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.stream_counts = [int(s) for s in args.streams.split(",") if s.strip()]
    except ValueError:
        parser.error("--streams must be comma-separated integers")
    if (not args.stream_counts or min(args.stream_counts) < 1 or args.promotions < 1
            or args.warmup < 0 or args.connections < 1):
        parser.error("--streams, --promotions, --connections must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark (or, with ``--client``, the client role); returns the exit code."""
    args = parse_args(argv)
    if args.client:
        return asyncio.run(client_main())
    # SIGTERM cleans up like Ctrl-C does: the finally blocks stop clients, server and etcd.
    interrupt_on_sigterm()
    limit = raise_fd_limit()
    tmp = make_tmpdir()
    print(f"open files limit {limit}; {os.cpu_count()} CPUs; temp dir {tmp}", flush=True)
    results: list[tuple[Side, Side]] = []
    try:
        for n in args.stream_counts:
            results.append(run_n(args, n, tmp))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        remove_tmpdir(tmp, args.keep)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
