"""Building blocks of the replication tests: a primary and a regional etcd, a writer of mixed
primary traffic that keeps cross-key invariants, and readers of both keyspaces.

The primary etcd runs with ``--max-txn-ops 1024`` and ``--max-request-bytes`` 8 MiB (through
etcd's ``ETCD_*`` environment variables) so that one primary Txn can hold more than a regional
Txn may (the regional etcd keeps etcd's defaults: 128 operations, 1.5 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
from aetcd import rpc

from modelreg.replication import AgentConfig, layout
from modelreg.replication.layout import Envelope, State
from modelreg.server.embedded_etcd import EmbeddedEtcd

PRIMARY_MAX_TXN_OPS = 1024
PRIMARY_MAX_REQUEST_BYTES = 8 * 1024 * 1024
BIG = 200
"""Puts in the large primary Txn: more than a regional Txn's 128 operations."""


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def start_pair(tmp: Path, binary: Path | None) -> tuple[EmbeddedEtcd, EmbeddedEtcd]:
    """A primary etcd that takes large Txns and a regional etcd with etcd's default limits."""
    primary = EmbeddedEtcd(tmp / "primary", binary=binary, name="primary")
    region = EmbeddedEtcd(tmp / "region", binary=binary, name="region")
    with _env("ETCD_MAX_TXN_OPS", str(PRIMARY_MAX_TXN_OPS)), \
            _env("ETCD_MAX_REQUEST_BYTES", str(PRIMARY_MAX_REQUEST_BYTES)):
        primary.start()
    try:
        region.start()
    except BaseException:
        primary.stop()
        raise
    return primary, region


def client(etcd: EmbeddedEtcd) -> aetcd.Client:
    """An aetcd client of one test etcd (use with ``async with``)."""
    return aetcd.Client(etcd.host, etcd.client_port, timeout=10)


def config(primary: EmbeddedEtcd, region: EmbeddedEtcd, prefix: str, **kw: Any) -> AgentConfig:
    """An agent config for the test clusters, with short timers."""
    values: dict[str, Any] = {
        "primary": (primary.endpoint,), "region_etcd": (region.endpoint,), "region": "eu",
        "prefix": prefix, "replica_id": "r1", "lease_ttl": 2, "probe_interval": 0.2,
        "idle_flush": 0.1, "status_interval": 0.5,
    }
    values.update(kw)
    return AgentConfig(**values)


def agent_argv(cfg: AgentConfig) -> list[str]:
    """The command line of a replicator child process for ``cfg``."""
    return [sys.executable, "-m", "modelreg.replication", "--primary", ",".join(cfg.primary),
            "--region-etcd", ",".join(cfg.region_etcd), "--region", cfg.region,
            "--prefix", cfg.prefix, "--replica-id", cfg.replica_id,
            "--lease-ttl", str(cfg.lease_ttl), "--probe-interval", str(cfg.probe_interval),
            "--status-interval", str(cfg.status_interval), "--log-format", "json"]


async def until(condition: Any, timeout: float = 120.0, what: str = "condition") -> None:
    """Polls ``condition()`` until it is true; ``timeout`` only guards against a hang (tests
    never assert how long anything takes).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        await asyncio.sleep(0.02)


# -- reading ---------------------------------------------------------------------------------


async def primary_keyspace(c: aetcd.Client, prefix: bytes) -> tuple[dict[bytes, Envelope], int]:
    """The primary's replicated keys (relative) and the revision they were read at."""
    resp = await c.kvstub.Range(rpc.RangeRequest(key=prefix, range_end=layout.prefix_end(prefix)))
    keys = {bytes(kv.key[len(prefix):]): Envelope(bytes(kv.value), kv.mod_revision,
                                                  kv.create_revision, kv.version)
            for kv in resp.kvs if layout.is_replicated(bytes(kv.key[len(prefix):]))}
    return keys, resp.header.revision


async def region_keyspace(
    c: aetcd.Client, prefix: bytes
) -> tuple[State | None, dict[bytes, Envelope]]:
    """A consistent read of the region, as the layout docstring says to: the state, then the
    current generation at the same regional revision.
    """
    resp = await c.kvstub.Range(rpc.RangeRequest(key=layout.state_key(prefix)))
    if not resp.kvs:
        return None, {}
    state = State.decode(bytes(resp.kvs[0].value))
    data = layout.data_prefix(prefix, state.generation)
    rows = await c.kvstub.Range(rpc.RangeRequest(
        key=data, range_end=layout.prefix_end(data), revision=resp.header.revision))
    return state, {bytes(kv.key[len(data):]): Envelope.decode(bytes(kv.value)) for kv in rows.kvs}


def digest(keys: dict[bytes, Envelope]) -> str:
    """A hash of keys, values and primary revisions."""
    h = hashlib.sha256()
    for key in sorted(keys):
        e = keys[key]
        h.update(b"%d:%s=%d,%d,%d:%s;" % (len(key), key, e.mod_revision, e.create_revision,
                                           e.version, hashlib.sha256(e.value).digest()))
    return h.hexdigest()


async def converged(primary: aetcd.Client, region: aetcd.Client, prefix: bytes,
                    timeout: float = 60.0) -> tuple[State, dict[bytes, Envelope]]:
    """Waits until the region holds exactly the primary's replicated keys (a bound, so that a
    broken replicator fails the test instead of hanging it); returns the region's view.
    """
    deadline = time.monotonic() + timeout
    while True:
        want, revision = await primary_keyspace(primary, prefix)
        state, got = await region_keyspace(region, prefix)
        if state is not None and state.applied >= revision and digest(got) == digest(want):
            return state, got
        if time.monotonic() > deadline:
            missing = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:5]
            raise AssertionError(f"region did not converge: state {state}, primary at {revision}"
                                 f"; missing {missing}, extra {extra}, different {differ}")
        await asyncio.sleep(0.05)


async def region_history(c: aetcd.Client, prefix: bytes) -> list[Any]:
    """Every event the regional etcd ever recorded under ``R + "replica/"`` (from revision 1,
    up to a sentinel written now).
    """
    root = layout.replica_root(prefix)
    sentinel = root + b"zz-test-sentinel"
    written = await c.kvstub.Put(rpc.PutRequest(key=sentinel, value=b"1"))
    call = rpc.WatchStub(c.channel).Watch(metadata=c.metadata)
    await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
        key=root, range_end=layout.prefix_end(root), start_revision=1)))
    events: list[Any] = []
    try:
        while True:
            resp = await asyncio.wait_for(call.read(), 30)
            events.extend(resp.events)
            if events and events[-1].kv.mod_revision >= written.header.revision:
                return [e for e in events if bytes(e.kv.key) != sentinel]
    finally:
        call.cancel()


def check_history(events: list[Any], prefix: bytes) -> list[int]:
    """Asserts that every commit in the region's history applied new primary revisions, in
    order, each once; returns the applied revisions in the order they were written.
    """
    state_key = layout.state_key(prefix)
    by_revision: dict[int, list[Any]] = {}
    for e in events:
        by_revision.setdefault(e.kv.mod_revision, []).append(e)
    applied: list[int] = []
    last: dict[tuple[int, bytes], int] = {}
    for revision in sorted(by_revision):
        group = by_revision[revision]
        states = [State.decode(bytes(e.kv.value)) for e in group if bytes(e.kv.key) == state_key]
        if not states:
            continue  # building a generation, garbage collection, leader or status
        state = states[0]
        before = applied[-1] if applied else 0
        assert state.applied > before, f"applied went from {before} to {state.applied}"
        applied.append(state.applied)
        if state.kind is not layout.Kind.APPLIED:
            continue
        data = layout.data_prefix(prefix, state.generation)
        for e in group:
            key = bytes(e.kv.key)
            if not key.startswith(data) or e.type == rpc.Event.DELETE:
                continue
            env = Envelope.decode(bytes(e.kv.value))
            assert before < env.mod_revision <= state.applied, (
                f"{key!r} at primary revision {env.mod_revision} in a commit of ({before}, "
                f"{state.applied}]")
            previous = last.get((state.generation, key), 0)
            assert env.mod_revision > previous, f"{key!r}: primary revision applied twice"
            last[(state.generation, key)] = env.mod_revision
    return applied


# -- writing ---------------------------------------------------------------------------------


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def _delete(key: bytes, end: bytes = b"") -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=end))


@dataclass
class Writer:
    """Mixed primary traffic under one prefix, each call one primary Txn.

    It keeps invariants that a reader can check on any consistent cut:

    * ``inv/a`` and ``inv/b`` always hold the same value;
    * the ``BIG`` keys ``big/NNN`` always hold the same value (written by one Txn);
    * ``set/manifest`` lists exactly the keys present under ``set/m/``.
    """

    c: aetcd.Client
    prefix: bytes
    rng: random.Random = field(default_factory=lambda: random.Random(8))
    members: set[int] = field(default_factory=set)
    n: int = 0
    big_every: int = 100

    async def txn(self, ops: list[Any]) -> int:
        resp = await self.c.kvstub.Txn(rpc.TxnRequest(success=ops))
        return int(resp.header.revision)

    def k(self, key: str) -> bytes:
        return self.prefix + key.encode()

    async def setup(self) -> None:
        """The invariant keys' first values (the big Txn included)."""
        await self.txn([_put(self.k("inv/a"), b"0"), _put(self.k("inv/b"), b"0")])
        await self.txn([_put(self.k("set/manifest"), b"")])
        await self.big()

    async def big(self) -> None:
        value = b"big-%d-" % self.n + os.urandom(8).hex().encode()
        await self.txn([_put(self.k(f"big/{j:03d}"), value) for j in range(BIG)])

    async def step(self) -> None:
        """One primary write of a random kind."""
        self.n += 1
        rng, n = self.rng, self.n
        roll = rng.random()
        if n % self.big_every == self.big_every // 2:
            await self.big()
        elif roll < 0.3:
            await self.txn([_put(self.k(f"k/{rng.randrange(40):02d}"), b"v%d" % n)])
        elif roll < 0.42:
            await self.txn([_delete(self.k(f"k/{rng.randrange(40):02d}"))])
        elif roll < 0.6:
            await self.txn([_put(self.k("inv/a"), b"%d" % n), _put(self.k("inv/b"), b"%d" % n)])
        elif roll < 0.78:
            gone = {m for m in self.members if rng.random() < 0.3}
            new = {rng.randrange(1000) for _ in range(rng.randrange(1, 4))} - self.members
            self.members = (self.members - gone) | new
            manifest = b",".join(b"%d" % m for m in sorted(self.members))
            await self.txn([_put(self.k("set/manifest"), manifest),
                            *(_delete(self.k(f"set/m/{m:04d}")) for m in sorted(gone)),
                            *(_put(self.k(f"set/m/{m:04d}"), b"%d" % n) for m in sorted(new))])
        elif roll < 0.86:
            await self.txn([_put(self.k(f"nodes/n{rng.randrange(5)}"), b"local %d" % n),
                            _put(self.k(f"requests/{n}"), b"local")])
        elif roll < 0.93:
            await self.txn([_put(self.k(f"r/{j}"), b"%d" % n) for j in range(rng.randrange(2, 9))])
        else:
            await self.txn([_delete(self.k("r/"), layout.prefix_end(self.k("r/")))])

    async def run(self, count: int, pause: float = 0.0) -> None:
        for _ in range(count):
            await self.step()
            if pause:
                await asyncio.sleep(pause)


def check_invariants(keys: dict[bytes, Envelope], applied: int) -> None:
    """The writer's invariants on one consistent regional read."""
    for key, env in keys.items():
        assert env.mod_revision <= applied, f"{key!r} newer ({env.mod_revision}) than {applied}"
        assert not key.startswith(layout.LOCAL_FAMILIES), f"local key {key!r} replicated"
    if b"inv/a" in keys or b"inv/b" in keys:
        assert keys[b"inv/a"].value == keys[b"inv/b"].value, "inv/a and inv/b differ"
    big = {keys[k].value for k in keys if k.startswith(b"big/")}
    assert len(big) <= 1, f"the big Txn's keys hold {len(big)} different values"
    assert sum(k.startswith(b"big/") for k in keys) in (0, BIG), "the big Txn half applied"
    if b"set/manifest" in keys:
        listed = {int(m) for m in keys[b"set/manifest"].value.split(b",") if m}
        present = {int(k[len(b"set/m/"):]) for k in keys if k.startswith(b"set/m/")}
        assert listed == present, f"manifest {sorted(listed)} but members {sorted(present)}"


@dataclass
class Reader:
    """Polls the region with consistent reads and checks every cut: invariants, and an applied
    revision that never goes back.
    """

    c: aetcd.Client
    prefix: bytes
    reads: int = 0
    seen: list[int] = field(default_factory=list)
    generations: set[int] = field(default_factory=set)

    async def run(self) -> None:
        while True:
            state, keys = await region_keyspace(self.c, self.prefix)
            if state is not None:
                assert not self.seen or state.applied >= self.seen[-1], (
                    f"a reader saw applied go back from {self.seen[-1]} to {state.applied}")
                check_invariants(keys, state.applied)
                self.seen.append(state.applied)
                self.generations.add(state.generation)
                self.reads += 1
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def reading(c: aetcd.Client, prefix: bytes) -> AsyncIterator[Reader]:
    """A :class:`Reader` polling in the background; its failure fails the block."""
    reader = Reader(c, prefix)
    task = asyncio.create_task(reader.run())
    try:
        yield reader
    finally:
        if task.done():
            task.result()  # raises the reader's assertion
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
