"""The API fuzzer shared by ``tests/server/test_fuzz_api.py`` and ``bench/fuzz_api.py`` (long).

Requests are generated from the ``modelreg.v1`` service descriptors, so a new RPC or field is
fuzzed without touching this file: every field gets valid, boundary and hostile values (huge,
empty, Unicode, control characters, trailing newlines, Unicode digits, unknown enum numbers,
out-of-range integers and timestamps), and a share of the cases are raw wire bytes that are no
valid message at all (truncated, corrupt, invalid UTF-8). Each case goes to a real server over
a real channel, and three invariants are checked:

1. the answer is never UNKNOWN or INTERNAL;
2. a refused request leaves etcd's keys byte-for-byte unchanged (keys on a lease may expire);
3. the server stays SERVING (health check every ``HEALTH_EVERY`` cases and at the end).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aetcd
import grpc
from google.protobuf import descriptor, message_factory, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from modelreg.v1 import (
    fleet_service_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    rollout_service_pb2,
    watch_service_pb2,
)

MODEL = "fuzz-model"
FORBIDDEN = frozenset({"UNKNOWN", "INTERNAL"})
HEALTH_EVERY = 25
RPC_TIMEOUT = 10.0
SERVER_MAX_RECEIVE = 4 * 1024 * 1024
"""grpc's default limit on a request: above it RESOURCE_EXHAUSTED is the transport's answer."""
MAX_DEPTH = 3
T = TypeVar("T")


@dataclass(frozen=True)
class Method:
    """One RPC of a modelreg service, from its descriptor."""

    path: str
    request: descriptor.Descriptor
    streaming: bool


def methods() -> list[Method]:
    """Every RPC of ModelService, WatchService, FleetService and RolloutService."""
    found = []
    for module in (model_service_pb2, watch_service_pb2, fleet_service_pb2, rollout_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                found.append(Method(f"/{service.full_name}/{m.name}", m.input_type,
                                    m.server_streaming))
    return found


# -- values ----------------------------------------------------------------------------------

SHA = "ab" * 32
MEANINGFUL = [
    "", MODEL, f"models/{MODEL}", f"models/{MODEL}/versions/1", f"models/{MODEL}/versions/2",
    f"models/{MODEL}/stages/staging", f"models/{MODEL}/stages/production",
    f"models/{MODEL}/stages/canary", "models/other", "staging", "production", "canary", "latest",
    "node-1", "eu-west-1", SHA, "file:///models/m.bin", "s3://bucket/key", '"1"', '"0"',
    "description", "tags", "sunset_time", "custom_stages", "bW9kZWxzL2Z1eno=", "req-1",
    "rollout_policies", f"models/{MODEL}/stages/production/rollouts/1", "default",
]
NAMES = [f"models/{MODEL}", f"models/{MODEL}/versions/1", f"models/{MODEL}/versions/2",
         f"models/{MODEL}/stages/staging", f"models/{MODEL}/stages/production",
         f"models/{MODEL}/stages/canary", "models/m-new",
         f"models/{MODEL}/stages/production/rollouts/1",
         f"models/{MODEL}/stages/staging/rollouts/1", f"models/{MODEL}/stages/canary/rollouts/2"]
TAME = {
    "name": NAMES, "parent": NAMES, "stage": NAMES, "model_id": [MODEL, "m-new"],
    "model": [MODEL, ""], "models": [MODEL], "stages": ["staging", "production", "canary"],
    "custom_stages": ["canary", "shadow"], "sha256": [SHA], "dataset_sha256": ["", SHA],
    "artifact_uri": ["file:///models/m.bin"], "etag": [""], "page_token": [""],
    "request_id": ["", "req-1", "req-2"], "node_id": ["node-1", "node-2"],
    "region": ["", "eu-west-1"], "reason": ["", "because"], "model_prefix": ["", "fuzz"],
    "regions": ["default"],
}
"""Valid values by field name, for tame requests; other string fields get ``MEANINGFUL``."""
HOSTILE = [
    lambda s: s + "\n", lambda s: s + "\r\n", lambda s: "\n" + s, lambda s: s + "\x00",
    lambda s: s + "\u0661", lambda s: s + "\u00b2", lambda s: s.upper(), lambda s: s + " ",
    lambda s: s + "\u202e\u200b", lambda s: s + "/", lambda s: s.replace("1", "\u0661"),
    lambda s: s + "\ud7ff\U0010ffff", lambda s: s * 200, lambda s: s + "x" * 5000,
]
HUGE = [1000, 8193, 70_000, 300_000]


def strings() -> st.SearchStrategy[str]:
    """Valid names and values, their hostile variants, arbitrary text, and huge strings."""
    meaningful = st.sampled_from(MEANINGFUL)
    return st.one_of(
        # Repeated so that most strings are meaningful and some requests get past validation.
        meaningful, meaningful, meaningful, meaningful,
        st.builds(lambda s, f: f(s), meaningful, st.sampled_from(HOSTILE)),
        st.text(max_size=24),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "\u00e9", "\n", "9", "\u0661"]),
                  st.sampled_from(HUGE)),
    )


INT_EDGES = [0, 1, 2, -1, 5, 300, 1000, 1001, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]
TIME_EDGES = [0, 1, -1, -62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800,
              2**62, -(2**62), 1_900_000_000]
NANO_EDGES = [0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31)]
_INT_RANGES = {
    descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    descriptor.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(kind: int) -> st.SearchStrategy[int]:
    lo, hi = _INT_RANGES.get(kind, (-(2**63), 2**63 - 1))
    edges = [i for i in INT_EDGES if lo <= i <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(0, 20))


def timestamps(tame: bool) -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    """Valid instants and (unless ``tame``) every kind of out-of-range pair."""
    seconds, nanos = st.integers(0, 2_000_000_000), st.integers(0, 999_999_999)
    if not tame:
        seconds = st.one_of(st.sampled_from(TIME_EDGES), st.integers(-(2**63), 2**63 - 1))
        nanos = st.one_of(st.sampled_from(NANO_EDGES), st.integers(-(2**31), 2**31 - 1))
    return st.builds(lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n), seconds, nanos)


def _scalar(f: descriptor.FieldDescriptor, tame: bool) -> st.SearchStrategy[Any]:
    t = f.type
    if t == f.TYPE_STRING:
        return st.sampled_from(TAME.get(f.name, MEANINGFUL)) if tame else strings()
    if t == f.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == f.TYPE_BOOL:
        return st.booleans()
    if t in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
        if tame:
            return st.floats(0, 1)
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == f.TYPE_DOUBLE
                         else 32)
    if t == f.TYPE_ENUM:
        known = st.sampled_from([v.number for v in f.enum_type.values])
        return known if tame else st.one_of(known, st.integers(-(2**31), 2**31 - 1))
    return st.integers(0, 3) if tame else _ints(t)


def messages(
    d: descriptor.Descriptor, *, tame: bool = False, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of type ``d`` with any subset of fields set to generated values.

    ``tame`` messages take only meaningful names and small, in-range values, so that many of
    them pass validation and reach the lifecycle rules and etcd; the others are hostile.
    """
    if d.full_name == "google.protobuf.Timestamp":
        return timestamps(tame)
    if d.full_name == "google.protobuf.FieldMask":
        masks = ["description", "tags", "sunset_time", "custom_stages", "rollout_policies"]
        paths = st.lists(st.sampled_from(masks) if tame else strings(), max_size=4)
        return paths.map(lambda p: _new(d, paths=p))
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in d.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key, value = (f.message_type.fields_by_name[n] for n in ("key", "value"))
            few = st.dictionaries(_scalar(key, tame), _value(value, tame, depth), max_size=3)
            many = st.dictionaries(_scalar(key, tame), _value(value, tame, depth),
                                   min_size=60, max_size=70)
            optional[f.name] = few if tame else st.one_of(few, many)
        elif f.is_repeated:
            optional[f.name] = st.lists(_value(f, tame, depth), max_size=2 if tame else 4)
        elif f.message_type is None or depth < MAX_DEPTH:
            optional[f.name] = _value(f, tame, depth)
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(d, values))


def _value(f: descriptor.FieldDescriptor, tame: bool, depth: int) -> st.SearchStrategy[Any]:
    if f.message_type is not None:
        return messages(f.message_type, tame=tame, depth=depth + 1)
    return _scalar(f, tame)


def _new(d: descriptor.Descriptor, **fields: Any) -> Message:
    cls: type[Message] = message_factory.GetMessageClass(d)
    return cls(**fields)


def _build(d: descriptor.Descriptor, values: dict[str, Any]) -> Message:
    msg = _new(d)
    for name, value in values.items():
        f = d.fields_by_name[name]
        target = getattr(msg, name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            for v in value:
                if isinstance(v, Message):
                    target.add().CopyFrom(v)
                else:
                    target.append(v)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# -- raw wire bytes --------------------------------------------------------------------------


def _corrupt(data: bytes, how: int, at: int) -> bytes:
    if not data:
        return b"\xff" * (how % 8 + 1)
    i = at % len(data)
    if how == 0:
        return data[:i]  # truncated
    if how == 1:
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]  # one byte flipped
    if how == 2:
        return data + b"\x0a\x02\xff\xfe"  # field 1, length 2, not UTF-8
    return data + b"\x0a\x7f" + data[:3]  # a length running past the end


@dataclass(frozen=True)
class Case:
    """One request to send: a method and the bytes on the wire."""

    method: Method
    payload: bytes
    kind: str
    """``message`` (a generated request) or ``bytes`` (raw, most likely undecodable)."""

    def describe(self) -> str:
        """Method, kind and a bounded hex prefix of the payload, for findings."""
        shown = self.payload[:120].hex()
        return f"{self.method.path} {self.kind} {len(self.payload)}B {shown}"


def cases() -> st.SearchStrategy[Case]:
    """Any RPC with a generated request (mostly) or raw bytes."""
    def for_method(m: Method) -> st.SearchStrategy[Case]:
        generated = st.one_of(messages(m.request, tame=True), messages(m.request)).map(
            lambda msg: msg.SerializeToString())
        raw = st.one_of(
            st.binary(max_size=48),
            st.builds(_corrupt, generated, st.integers(0, 3), st.integers(0, 2**16)),
        )
        return st.one_of(
            generated.map(lambda b: Case(m, b, "message")),
            raw.map(lambda b: Case(m, b, "bytes")),
        )

    return st.sampled_from(methods()).flatmap(for_method)


# -- running cases ---------------------------------------------------------------------------

Snapshot = dict[bytes, tuple[bytes, int, int]]


@dataclass
class Fuzzer:
    """Sends cases to a server at ``target`` over etcd under ``prefix``; checks invariants."""

    target: str
    etcd_host: str
    etcd_port: int
    prefix: str
    codes: Counter[str] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    sent: int = 0
    first_message_timeout: float = 3.0
    """Seconds to wait for a watch stream's first message (or error) before cancelling it;
    a watch from a future revision legitimately sends nothing until a change or bookmark."""
    _channel: grpc.aio.Channel | None = None
    _etcd: aetcd.Client | None = None
    _last: Snapshot | None = None

    async def open(self) -> None:
        """Connects to the server and etcd and creates the model the valid names point at."""
        self._channel = grpc.aio.insecure_channel(self.target)
        self._etcd = aetcd.Client(self.etcd_host, self.etcd_port, timeout=10)
        await self.prepare()

    async def close(self) -> None:
        """Closes the channel and the etcd client."""
        if self._channel is not None:
            await self._channel.close()
        if self._etcd is not None:
            await self._etcd.close()

    async def prepare(self) -> None:
        """(Re)creates ``fuzz-model`` with a canary stage and two versions, if a case deleted it."""
        assert self._channel is not None
        stub = model_service_pb2_grpc.ModelServiceStub(self._channel)
        with_actor = (("x-modelreg-actor", "fuzzer"),)
        try:
            await stub.CreateModel(model_service_pb2.CreateModelRequest(
                model_id=MODEL, model={"custom_stages": ["canary"]}), metadata=with_actor)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            return
        for i in (1, 2):
            await stub.CreateModelVersion(model_service_pb2.CreateModelVersionRequest(
                parent=f"models/{MODEL}", model_version={
                    "artifact_uri": f"file:///models/{i}.bin", "sha256": SHA, "size_bytes": 1}),
                metadata=with_actor)

    async def _snapshot(self) -> Snapshot:
        assert self._etcd is not None
        return {kv.key: (kv.value, kv.mod_revision, kv.lease)
                for kv in await self._etcd.get_prefix(self.prefix.encode())}

    async def _send(self, case: Case) -> str:
        assert self._channel is not None
        metadata = (("x-modelreg-actor", "fuzzer"),)
        try:
            if case.method.streaming:
                call = self._channel.unary_stream(case.method.path)(
                    case.payload, timeout=RPC_TIMEOUT, metadata=metadata)
                try:
                    await asyncio.wait_for(call.read(), self.first_message_timeout)
                except TimeoutError:
                    return "NO_FIRST_MESSAGE"
                finally:
                    call.cancel()
            else:
                await self._channel.unary_unary(case.method.path)(
                    case.payload, timeout=RPC_TIMEOUT, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return "OK"

    async def run(self, case: Case) -> str | None:
        """Sends one case; returns a description of the broken invariant, if any."""
        # After a refusal etcd is as before (else that is the finding): reuse the snapshot.
        before = self._last if self._last is not None else await self._snapshot()
        self._last = None
        code = await self._send(case)
        self.sent += 1
        self.codes[code] += 1
        problem = None
        if code in FORBIDDEN:
            problem = f"answered {code}"
        elif code == "RESOURCE_EXHAUSTED" and len(case.payload) <= SERVER_MAX_RECEIVE:
            problem = "RESOURCE_EXHAUSTED for a request under 4 MiB (status trailers too big?)"
        elif code != "OK":
            after = await self._snapshot()
            changed = [k for k, v in after.items() if before.get(k, (b"", 0, 0))[:2] != v[:2]]
            lost = [k for k, v in before.items() if k not in after and not v[2]]
            if changed or lost:
                problem = f"refused with {code} but etcd changed: {(changed + lost)[:3]}"
            else:
                self._last = after
        if problem is None and self.sent % HEALTH_EVERY == 0:
            problem = await self.check_serving()
        if self.sent % (HEALTH_EVERY * 4) == 0:
            await self.prepare()
            self._last = None
        if problem is not None:
            finding = f"{problem}: {case.describe()}"
            self.findings.append(finding)
            return finding
        return None

    async def check_serving(self) -> str | None:
        """None when the server's health service says SERVING."""
        assert self._channel is not None
        health = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return f"health check failed: {err.code().name}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"server not SERVING: {reply.status}"
        return None


class LoopThread:
    """An event loop in a thread, for the fuzzer (and an in-process server).

    Hypothesis drives synchronous functions only: it generates cases in the caller's thread
    while the asyncio work runs here.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` in the loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        """Stops the loop and joins the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
