"""The watcher SDK without a modelreg server: artifact fetching, and hot swap against fakes.

The watcher tests run an in-process gRPC server on 127.0.0.1 port 0 with fake WatchService,
ModelService and FleetService servicers (fakes at the port only), so stream cuts, resumption
and fleet reports are observable exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from modelreg.client import (
    AsyncModelWatcher,
    DigestMismatchError,
    ThreadedModelWatcher,
)
from modelreg.client.artifacts import (
    ArtifactFetchError,
    ArtifactWriter,
    FetchCancelledError,
    UnsupportedSchemeError,
    fetch_artifact,
)
from modelreg.client.watcher import Backoff, LoadedModel, default_node_id
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc as fs_grpc
from modelreg.v1 import model_service_pb2 as ms
from modelreg.v1 import model_service_pb2_grpc as ms_grpc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc as ws_grpc

MODEL = "fraud"
STAGE = f"models/{MODEL}/stages/production"
FAST = Backoff(0.01, 0.05)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(directory: Path, name: str, data: bytes) -> str:
    path = directory / name
    path.write_bytes(data)
    return path.as_uri()


# ------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Serve ``tmp_path/www`` over HTTP on 127.0.0.1, port 0, from a thread."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that hangs up early (size overflow) is expected here

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


class TestFetchArtifact:
    def test_file_uri(self, tmp_path: Path) -> None:
        """A file:// artifact is copied to cache/{sha256} once its digest and size match."""
        data = b"weights" * 1000
        uri = write_artifact(tmp_path, "m.bin", data)
        path = fetch_artifact(uri, tmp_path / "cache", sha256=sha(data), size_bytes=len(data))
        assert path == tmp_path / "cache" / sha(data)
        assert path.read_bytes() == data
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [sha(data)]

    def test_http_uri(self, tmp_path: Path, http_root: tuple[str, Path]) -> None:
        """An http:// artifact is downloaded from a real local HTTP server and verified."""
        base, root = http_root
        data = bytes(range(256)) * 5000  # > one chunk
        (root / "m.bin").write_bytes(data)
        path = fetch_artifact(
            f"{base}/m.bin", tmp_path / "cache", sha256=sha(data), size_bytes=len(data)
        )
        assert path.read_bytes() == data

    def test_http_error_status(self, tmp_path: Path, http_root: tuple[str, Path]) -> None:
        """An HTTP 404 is an ArtifactFetchError and leaves nothing in the cache."""
        base, _ = http_root
        with pytest.raises(ArtifactFetchError, match="404"):
            fetch_artifact(f"{base}/missing", tmp_path / "c", sha256="0" * 64, size_bytes=1)
        assert list((tmp_path / "c").iterdir()) == []

    def test_digest_mismatch_deletes_the_file(self, tmp_path: Path) -> None:
        """Bytes whose sha256 differs raise DigestMismatchError and no file is kept."""
        data = b"tampered"
        uri = write_artifact(tmp_path, "m.bin", data)
        wanted = sha(b"original")
        with pytest.raises(DigestMismatchError) as info:
            fetch_artifact(uri, tmp_path / "cache", sha256=wanted, size_bytes=len(data))
        assert info.value.expected_sha256 == wanted
        assert info.value.actual_sha256 == sha(data)
        assert list((tmp_path / "cache").iterdir()) == []

    def test_size_mismatch_short(self, tmp_path: Path) -> None:
        """Fewer bytes than registered is a mismatch, even before the digest is compared."""
        data = b"short"
        uri = write_artifact(tmp_path, "m.bin", data)
        with pytest.raises(DigestMismatchError, match="size") as info:
            fetch_artifact(uri, tmp_path / "cache", sha256=sha(data), size_bytes=len(data) + 1)
        assert info.value.actual_size == len(data)
        assert list((tmp_path / "cache").iterdir()) == []

    def test_size_mismatch_long_stops_early(
        self, tmp_path: Path, http_root: tuple[str, Path]
    ) -> None:
        """A transfer larger than the registered size is cut off as soon as it overflows."""
        base, root = http_root
        (root / "big.bin").write_bytes(b"x" * (3 << 20))
        with pytest.raises(DigestMismatchError) as info:
            fetch_artifact(f"{base}/big.bin", tmp_path / "c", sha256="0" * 64, size_bytes=10)
        assert info.value.actual_size <= 1 << 20 + 10
        assert list((tmp_path / "c").iterdir()) == []

    def test_unknown_scheme(self, tmp_path: Path) -> None:
        """A scheme without a fetcher raises UnsupportedSchemeError naming the known ones."""
        with pytest.raises(UnsupportedSchemeError, match=r"'s3'.*file, http, https"):
            fetch_artifact("s3://bucket/key", tmp_path, sha256="0" * 64, size_bytes=1)

    def test_pluggable_scheme(self, tmp_path: Path) -> None:
        """A fetcher registered for a scheme writes into the verified sink it is given."""
        data = b"from memory"
        seen: list[str] = []

        def fetch_mem(uri: str, out: ArtifactWriter) -> None:
            seen.append(uri)
            out.write(data[:4])
            out.write(data[4:])

        path = fetch_artifact(
            "mem://bucket/m", tmp_path, sha256=sha(data), size_bytes=len(data),
            fetchers={"mem": fetch_mem},
        )  # fmt: skip
        assert seen == ["mem://bucket/m"]
        assert path.read_bytes() == data

    def test_failing_fetcher_is_wrapped(self, tmp_path: Path) -> None:
        """An exception in a fetcher becomes ArtifactFetchError and removes the partial file."""

        def broken(uri: str, out: ArtifactWriter) -> None:
            out.write(b"part")
            raise ConnectionResetError("peer went away")

        with pytest.raises(ArtifactFetchError, match="peer went away"):
            fetch_artifact(
                "mem://x", tmp_path, sha256="0" * 64, size_bytes=8, fetchers={"mem": broken}
            )
        assert list(tmp_path.iterdir()) == []

    def test_cache_hit_is_verified(self, tmp_path: Path) -> None:
        """A cached artifact is reused without fetching, and replaced if it was corrupted."""
        data = b"model"
        calls: list[str] = []

        def fetch_mem(uri: str, out: ArtifactWriter) -> None:
            calls.append(uri)
            out.write(data)

        kw: dict[str, Any] = {"sha256": sha(data), "size_bytes": len(data)}
        path = fetch_artifact("mem://m", tmp_path, fetchers={"mem": fetch_mem}, **kw)
        fetch_artifact("mem://m", tmp_path, fetchers={"mem": fetch_mem}, **kw)
        assert len(calls) == 1
        path.write_bytes(b"mode!")  # same size, other bytes
        assert fetch_artifact("mem://m", tmp_path, fetchers={"mem": fetch_mem}, **kw) == path
        assert len(calls) == 2 and path.read_bytes() == data

    def test_cancel(self, tmp_path: Path) -> None:
        """A set cancel event stops the transfer at its next write and keeps nothing."""
        cancel = threading.Event()

        def slow(uri: str, out: ArtifactWriter) -> None:
            out.write(b"a")
            cancel.set()
            out.write(b"b")

        with pytest.raises(FetchCancelledError):
            fetch_artifact(
                "mem://x", tmp_path, sha256="0" * 64, size_bytes=2, fetchers={"mem": slow},
                cancel=cancel,
            )  # fmt: skip
        assert list(tmp_path.iterdir()) == []


class TestHelpers:
    def test_default_node_id_is_a_valid_slug(self) -> None:
        """The default node id is a lowercase slug of at most 63 characters ending in the pid."""
        node_id = default_node_id()
        assert len(node_id) <= 63 and node_id == node_id.lower()
        assert all(c.isalnum() or c == "-" for c in node_id)
        assert node_id[0].isalpha() and node_id.endswith(f"-{__import__('os').getpid()}")

    def test_bad_node_id_is_refused(self) -> None:
        """A node id that the server would refuse is refused at construction."""
        with pytest.raises(ValueError, match="node_id"):
            AsyncModelWatcher(MODEL, "production", Path.read_bytes, node_id="Bad_Node")

    def test_backoff_is_jittered_and_capped(self) -> None:
        """Delays grow exponentially within [bound/2, bound] and never exceed the cap."""
        b = Backoff(1.0, 8.0)
        for attempt, bound in [(0, 1.0), (1, 2.0), (3, 8.0), (50, 8.0)]:
            assert all(bound / 2 <= b.delay(attempt) <= bound for _ in range(50))


# ------------------------------------------------------------------------------------------
# Watcher against fake servicers
# ------------------------------------------------------------------------------------------


class FakeControlPlane(
    ws_grpc.WatchServiceServicer, ms_grpc.ModelServiceServicer, fs_grpc.FleetServiceServicer
):
    """One stage pointer with a revision history, versions, and recorded fleet reports."""

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = artifacts
        self.revision = 10
        self.pointer = 0
        self.history: list[ws.WatchStagesResponse] = []
        self.versions: dict[int, res.ModelVersion] = {}
        self.requests: list[ws.WatchStagesRequest] = []
        self.reports: list[fs.ReportNodeRequest] = []
        self.cut: grpc.StatusCode | None = None
        self.compacted = False
        self.changed = asyncio.Condition()
        self.fields: dict[str, Any] = {}  # the pointer's other fields (pending_version...)
        self.skew = 0.0  # the servers' clock minus this machine's, in seconds
        self.version_reads: list[int] = []

    def server_now(self) -> float:
        """The fake servers' clock (Unix seconds)."""
        return time.time() + self.skew

    def stamped(self, message: ws.WatchStagesResponse) -> ws.WatchStagesResponse:
        copy = ws.WatchStagesResponse()
        copy.CopyFrom(message)
        copy.server_time.FromNanoseconds(int(self.server_now() * 1e9))
        return copy

    def register(self, version: int, data: bytes, *, digest: str | None = None) -> None:
        uri = write_artifact(self.artifacts, f"v{version}.bin", data)
        self.versions[version] = res.ModelVersion(
            name=f"models/{MODEL}/versions/{version}", version=version, artifact_uri=uri,
            sha256=digest or sha(data), size_bytes=len(data),
        )  # fmt: skip

    async def promote(self, version: int) -> None:
        await self.move(version)

    async def move(self, version: int, **fields: Any) -> None:
        """Write the pointer: ``version`` and the given fields, nothing else.

        Fields: pending_version, rollout, activation_time (Unix seconds, servers' clock)...
        """
        if "activation_time" in fields:
            fields["activation_time"] = timestamp_pb2.Timestamp(
                seconds=int(fields["activation_time"]),
                nanos=int(fields["activation_time"] % 1 * 1e9),
            )  # fmt: skip
        previous, self.pointer, self.fields = self.pointer, version, fields
        self.revision += 1
        change = ws.StageChange(
            stage=res.StagePointer(name=STAGE, version=version, **fields), from_version=previous
        )
        message = ws.WatchStagesResponse(
            type=ws.WATCH_MESSAGE_TYPE_CHANGES, revision=self.revision, changes=[change]
        )
        self.history.append(message)
        async with self.changed:
            self.changed.notify_all()

    async def cut_streams(self, code: grpc.StatusCode) -> None:
        self.cut = code
        async with self.changed:
            self.changed.notify_all()

    def snapshot(self, *, reset: bool = False) -> ws.WatchStagesResponse:
        pointers = (
            [res.StagePointer(name=STAGE, version=self.pointer, **self.fields)]
            if self.pointer or self.fields else []
        )
        return ws.WatchStagesResponse(
            type=ws.WATCH_MESSAGE_TYPE_SNAPSHOT, revision=self.revision, reset=reset,
            snapshot=pointers,
        )  # fmt: skip

    async def WatchStages(
        self, request: ws.WatchStagesRequest, context: Any
    ) -> AsyncIterator[ws.WatchStagesResponse]:
        self.requests.append(request)
        if request.start_revision == 0 or self.compacted:
            yield self.stamped(self.snapshot(reset=request.start_revision != 0))
            sent = self.revision
        else:
            sent = request.start_revision - 1
        while True:
            for message in self.history:
                if message.revision > sent:
                    yield self.stamped(message)
                    sent = message.revision
            async with self.changed:
                if self.cut is None and not any(m.revision > sent for m in self.history):
                    await self.changed.wait()
            if self.cut is not None:
                code, self.cut = self.cut, None
                await context.abort(code, "cut by the test")

    async def GetModelVersion(
        self, request: ms.GetModelVersionRequest, context: Any
    ) -> ms.GetModelVersionResponse:
        version = int(request.name.rsplit("/", 1)[-1])
        self.version_reads.append(version)
        if version not in self.versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        return ms.GetModelVersionResponse(model_version=self.versions[version])

    async def ReportNode(
        self, request: fs.ReportNodeRequest, context: Any
    ) -> fs.ReportNodeResponse:
        self.reports.append(request)
        return fs.ReportNodeResponse(revision=self.revision, ttl_seconds=request.ttl_seconds)


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakeControlPlane, str]]:
    """A fake control plane on an in-process grpc.aio server, with versions 1-3 registered."""
    plane = FakeControlPlane(tmp_path / "artifacts")  # type: ignore[abstract]
    plane.artifacts.mkdir()
    for v in (1, 2, 3):
        plane.register(v, f"model {v}".encode())
    server = grpc.aio.server()
    ws_grpc.add_WatchServiceServicer_to_server(plane, server)
    ms_grpc.add_ModelServiceServicer_to_server(plane, server)
    fs_grpc.add_FleetServiceServicer_to_server(plane, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield plane, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


class Loader:
    """Loads an artifact as its text, counting calls; can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail = False

    def __call__(self, path: Path) -> str:
        self.calls.append(path.name)
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        return path.read_text()


def watcher(
    target: str, loader: Callable[[Path], str], tmp_path: Path, **kw: Any
) -> AsyncModelWatcher[str]:
    return AsyncModelWatcher(
        MODEL, "production", loader, target=target, node_id="node-a", region="eu",
        cache_dir=tmp_path / "cache", reconnect_backoff=FAST, retry_backoff=FAST, **kw,
    )  # fmt: skip


async def eventually(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class TestAsyncModelWatcher:
    async def test_loads_the_snapshot_version(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """The version named by the initial snapshot is fetched, verified, loaded and current."""
        plane, target = fake
        await plane.promote(1)
        loader = Loader()
        async with watcher(target, loader, tmp_path) as w:
            loaded = await w.wait_for_version(1, timeout=5)
            assert isinstance(loaded, LoadedModel)
            assert (loaded.model, loaded.model_version.version) == ("model 1", 1)
            assert w.current is loaded and w.previous is None
            assert plane.requests[0].start_revision == 0
            assert list(plane.requests[0].models) == [MODEL]
            assert list(plane.requests[0].stages) == ["production"]

    async def test_swap_and_instant_rollback(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A promotion swaps in the new model; a rollback swaps the warm one back unloaded."""
        plane, target = fake
        await plane.promote(1)
        loader = Loader()
        swaps: list[tuple[int, int | None]] = []
        on_swap = lambda new, old: swaps.append((new.version, old and old.version))  # noqa: E731
        async with watcher(target, loader, tmp_path, on_swap=on_swap) as w:
            first = await w.wait_for_version(1, timeout=5)
            await plane.promote(2)
            second = await w.wait_for_version(2, timeout=5)
            assert w.previous is first
            await plane.promote(1)
            assert await w.wait_for_version(1, timeout=5) is first
            assert w.previous is second
            assert len(loader.calls) == 2
            assert swaps == [(1, None), (2, 1), (1, 2)]
            assert w.stats.swaps == 3 and w.stats.committed_version == 1

    async def test_corrupted_artifact_keeps_the_old_model(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A digest mismatch is retried and reported, never served, and never loaded."""
        plane, target = fake
        plane.register(4, b"evil bytes", digest=sha(b"good bytes"))
        await plane.promote(1)
        loader = Loader()
        errors: list[tuple[int, BaseException]] = []
        on_error = lambda v, e: errors.append((v, e))  # noqa: E731
        async with watcher(target, loader, tmp_path, on_error=on_error) as w:
            await w.wait_for_version(1, timeout=5)
            await plane.promote(4)
            await eventually(lambda: len(errors) >= 2)  # retried
            assert w.current is not None and w.current.version == 1
            assert all(v == 4 and isinstance(e, DigestMismatchError) for v, e in errors)
            assert loader.calls == [sha(b"model 1")]
            assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())
            assert w.stats.failed_version == 4 and "DigestMismatchError" in w.stats.last_error
            await eventually(lambda: plane.reports[-1].node.stages[0].failed_version == 4)
            served = plane.reports[-1].node.stages[0]
            assert (served.serving_version, served.stage) == (1, STAGE)
            assert "sha256 mismatch" in served.error
            await plane.promote(2)  # a newer version supersedes the broken one
            await w.wait_for_version(2, timeout=5)
            assert w.stats.failed_version == 0
            await eventually(lambda: plane.reports[-1].node.stages[0].serving_version == 2)
            assert plane.reports[-1].node.stages[0].failed_version == 0

    async def test_loader_failure_is_retried(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A loader exception keeps the old model serving and is retried until it succeeds."""
        plane, target = fake
        await plane.promote(1)
        loader = Loader()
        async with watcher(target, loader, tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            loader.fail = True
            await plane.promote(2)
            await eventually(lambda: w.stats.failures >= 3)
            assert w.current is not None and w.current.version == 1
            loader.fail = False
            await w.wait_for_version(2, timeout=5)

    async def test_unknown_version_is_a_failure(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A pointer naming a version GetModelVersion cannot find fails without a swap."""
        plane, target = fake
        await plane.promote(1)
        async with watcher(target, Loader(), tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            await plane.promote(99)
            await eventually(lambda: w.stats.failed_version == 99)
            assert "NotFoundError" in w.stats.last_error
            assert w.current is not None and w.current.version == 1

    @pytest.mark.parametrize(
        "code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE]
    )
    async def test_reconnect_resumes_after_last_revision(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path, code: grpc.StatusCode
    ) -> None:
        """A cut stream is reopened from the last revision + 1 and misses no change."""
        plane, target = fake
        await plane.promote(1)
        async with watcher(target, Loader(), tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            last = w.stats.last_revision
            assert last == plane.revision
            await plane.cut_streams(code)
            await plane.promote(2)
            await w.wait_for_version(2, timeout=5)
            assert w.stats.reconnects >= 1
            assert plane.requests[1].start_revision == last + 1

    async def test_reset_snapshot_replaces_the_pointer(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A reset snapshot on resumption is taken as the pointer's current value."""
        plane, target = fake
        await plane.promote(1)
        async with watcher(target, Loader(), tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            plane.compacted = True  # the changes below are lost to compaction
            plane.pointer, plane.revision = 3, plane.revision + 5
            await plane.cut_streams(grpc.StatusCode.UNAVAILABLE)
            await w.wait_for_version(3, timeout=5)
            assert w.stats.last_revision == plane.revision
            assert plane.requests[-1].start_revision > 0

    async def test_newer_version_supersedes_a_slow_load(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A version still loading when the pointer moves on is dropped, never served."""
        plane, target = fake
        await plane.promote(1)
        started, gate = threading.Event(), threading.Event()
        loader = Loader()

        def load(path: Path) -> str:
            if path.name == sha(b"model 2"):
                started.set()
                gate.wait(5)
            return loader(path)

        async with watcher(target, load, tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            await plane.promote(2)
            assert await asyncio.to_thread(started.wait, 5)
            await plane.promote(3)
            await w.wait_for_version(3, timeout=5)
            gate.set()
            await eventually(lambda: sha(b"model 2") in loader.calls)
            await asyncio.sleep(0.1)
            assert w.current is not None and w.current.version == 3
            assert w.previous is not None and w.previous.version == 1
            assert w.stats.swaps == 2

    async def test_idle_stream_is_reopened(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A stream silent for idle_timeout (no bookmark) is abandoned and resumed."""
        plane, target = fake
        await plane.promote(1)
        async with watcher(target, Loader(), tmp_path, idle_timeout=0.2) as w:
            await w.wait_for_version(1, timeout=5)
            await eventually(lambda: w.stats.reconnects >= 2)
            assert all(r.start_revision == plane.revision + 1 for r in plane.requests[1:])

    async def test_private_cache_keeps_two_artifacts(
        self, fake: tuple[FakeControlPlane, str]
    ) -> None:
        """Without cache_dir, only current and previous artifacts are kept, and none after stop."""
        plane, target = fake
        await plane.promote(1)
        w = AsyncModelWatcher(MODEL, "production", Loader(), target=target, report=False)
        async with w:
            for v in (1, 2, 3):
                await plane.promote(v)
                await w.wait_for_version(v, timeout=5)
            assert w.current is not None and w.previous is not None
            cache = w.current.path.parent
            assert sorted(p.name for p in cache.iterdir()) == sorted(
                [sha(b"model 2"), sha(b"model 3")]
            )
        assert not cache.exists()

    async def test_reports_on_a_lease(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """The node reports its id, region, labels and served stage with its ttl."""
        plane, target = fake
        await plane.promote(3)
        async with watcher(target, Loader(), tmp_path, labels={"zone": "a"}) as w:
            await w.wait_for_version(3, timeout=5)
            await eventually(
                lambda: any(r.node.stages[0].serving_version == 3 for r in plane.reports)
            )
            report = plane.reports[-1]
            assert (report.node.node_id, report.node.region) == ("node-a", "eu")
            assert dict(report.node.labels) == {"zone": "a"} and report.ttl_seconds == 15
            assert report.node.stages[0].prepared_version == 3
            assert report.node.stages[0].HasField("swap_time")

    async def test_stop_is_clean_and_final(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """After stop, current stays readable, waiting fails and the watcher cannot restart."""
        plane, target = fake
        await plane.promote(1)
        w = watcher(target, Loader(), tmp_path)
        await w.start()
        await w.wait_for_version(1, timeout=5)
        waiter = asyncio.create_task(w.wait_for_version(2, timeout=5))
        await asyncio.sleep(0.05)
        await w.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            await waiter
        assert w.current is not None and w.current.version == 1
        with pytest.raises(RuntimeError):
            await w.start()

    async def test_stop_before_start(self, tmp_path: Path) -> None:
        """Stopping a watcher that never started is harmless and final."""
        w = AsyncModelWatcher(MODEL, "production", Path.read_bytes, cache_dir=tmp_path)
        await w.stop()
        await w.stop()
        assert w.state.name == "CLOSED"
        with pytest.raises(RuntimeError, match="closed"):
            await w.start()

    async def test_wait_timeout(self, fake: tuple[FakeControlPlane, str], tmp_path: Path) -> None:
        """Waiting for a version that never comes raises TimeoutError."""
        _, target = fake
        async with watcher(target, Loader(), tmp_path) as w:
            with pytest.raises(TimeoutError):
                await w.wait_for_version(timeout=0.2)


class TestThreadedModelWatcher:
    async def test_swaps_seen_from_another_thread(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A thread reading current during promotions only sees fully loaded, committed models."""
        plane, target = fake
        for v in range(4, 12):
            plane.register(v, f"model {v}".encode())
        await plane.promote(1)
        seen: set[tuple[int, str]] = set()
        done = threading.Event()
        w = ThreadedModelWatcher(
            MODEL, "production", Loader(), target=target, cache_dir=tmp_path / "c",
            reconnect_backoff=FAST, report=False,
        )  # fmt: skip

        def reader() -> None:
            while not done.is_set():
                cur = w.current
                if cur is not None:
                    seen.add((cur.version, cur.model))

        with w:
            thread = threading.Thread(target=reader)
            thread.start()
            await asyncio.to_thread(w.wait_for_version, 1, 5)
            for v in range(2, 12):
                await plane.promote(v)
                if v % 3 == 0:
                    await asyncio.to_thread(w.wait_for_version, v, 5)
            assert (await asyncio.to_thread(w.wait_for_version, 11, 5)).model == "model 11"
            await eventually(lambda: (11, "model 11") in seen)
            done.set()
            thread.join()
        assert all(model == f"model {v}" for v, model in seen)
        assert {v for v, _ in seen} <= set(range(1, 12))
        assert w.state.name == "CLOSED"

    def test_unstarted(self) -> None:
        """Stopping before starting is harmless, and waiting on an unstarted watcher raises."""
        w = ThreadedModelWatcher(MODEL, "production", Path.read_bytes, target="127.0.0.1:1")
        w.stop()
        with pytest.raises(RuntimeError, match="not running"):
            w.wait_for_version(1, 0.1)

    def test_context_manager_without_server(self, tmp_path: Path) -> None:
        """Without a reachable server the watcher keeps retrying and stops promptly."""
        w = ThreadedModelWatcher(
            MODEL, "production", Path.read_bytes, target="127.0.0.1:1", reconnect_backoff=FAST,
            cache_dir=tmp_path,
        )  # fmt: skip
        with w:
            with pytest.raises(TimeoutError):
                w.wait_for_version(timeout=0.3)
            assert w.current is None
        t0 = time.monotonic()
        w.stop()
        assert time.monotonic() - t0 < 1
        with contextlib.suppress(RuntimeError):
            w.start()


# ------------------------------------------------------------------------------------------
# Two-phase rollouts against the fake control plane
# ------------------------------------------------------------------------------------------

ROLLOUT = f"{STAGE}/rollouts/1"


def served(plane: FakeControlPlane) -> fs.ServedStage:
    """What the node last reported for the stage."""
    return plane.reports[-1].node.stages[0]


class CountingFetcher:
    """Serves file:// artifacts, counting transfers (a cache hit or a warm model costs none)."""

    def __init__(self) -> None:
        self.uris: list[str] = []

    def __call__(self, uri: str, out: ArtifactWriter) -> None:
        self.uris.append(uri)
        out.write(Path(uri.removeprefix("file://")).read_bytes())


class TestRollouts:
    async def test_pending_version_is_prepared_not_served(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A rollout's pending version is fetched, verified and loaded beside the serving one,
        never served, and reported as prepared with the rollout's name.
        """
        plane, target = fake
        await plane.promote(1)
        loader = Loader()
        async with watcher(target, loader, tmp_path) as w:
            first = await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: w.prepared is not None)
            assert w.prepared is not None and w.prepared.model == "model 2"
            assert w.current is first and w.stats.swaps == 1
            assert loader.calls == [sha(b"model 1"), sha(b"model 2")]
            stats = w.stats
            assert (stats.pending_version, stats.pending_rollout) == (2, ROLLOUT)
            assert (stats.committed_version, stats.prepared_version) == (1, 2)
            await eventually(lambda: served(plane).prepared_version == 2)
            report = served(plane)
            assert (report.serving_version, report.rollout, report.failed_version) == (
                1, ROLLOUT, 0)

    async def test_commit_switches_at_the_activation_time(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """The commit moves the pointer with an activation time ahead: the prepared model
        is swapped in when the clock reaches it, not on receipt, and nothing is loaded again.
        """
        plane, target = fake
        await plane.promote(1)
        loader = Loader()
        swapped_at: list[float] = []  # the fake servers' true clock at each swap
        on_swap = lambda new, old: swapped_at.append(plane.server_now())  # noqa: E731
        async with watcher(target, loader, tmp_path, on_swap=on_swap) as w:
            await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: w.prepared is not None)
            activation = plane.server_now() + 0.5
            await plane.move(2, rollout=ROLLOUT, activation_time=activation)
            await w.wait_for_version(2, timeout=10)
            assert swapped_at[-1] >= activation
            swap = w.stats.last_swap
            assert swap is not None and (swap.version, swap.from_version) == (2, 1)
            assert (swap.source, swap.rollout) == ("prepared", ROLLOUT)
            assert swap.activation_time is not None
            assert swap.activation_time.timestamp() == pytest.approx(activation, abs=1e-3)
            assert swap.local_time >= swap.activation_time  # same machine: offset 0
            assert swap.server_time >= swap.activation_time
            assert len(loader.calls) == 2 and w.prepared is None
            assert w.stats.prepared_version == 0 and w.stats.pending_version == 0
            await eventually(lambda: served(plane).serving_version == 2)
            assert (served(plane).prepared_version, served(plane).rollout) == (2, ROLLOUT)

    @pytest.mark.parametrize("node_ahead", [1000.0, -1000.0])
    async def test_activation_uses_the_servers_clock(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path, node_ahead: float
    ) -> None:
        """A node whose clock is 1000 s off either way switches when the servers' clock
        reaches the activation time: not 1000 s late, and not on receipt either.
        """
        plane, target = fake
        plane.skew = -node_ahead
        await plane.promote(1)
        swapped_at: list[float] = []  # the fake servers' true clock at each swap
        on_swap = lambda new, old: swapped_at.append(plane.server_now())  # noqa: E731
        async with watcher(target, Loader(), tmp_path, on_swap=on_swap) as w:
            await w.wait_for_version(1, timeout=5)
            assert w.stats.clock_offset == pytest.approx(-node_ahead, abs=1.0)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: w.prepared is not None)
            activation = plane.server_now() + 0.5
            await plane.move(2, rollout=ROLLOUT, activation_time=activation)
            await w.wait_for_version(2, timeout=10)  # not 1000 s late
            assert swapped_at[-1] >= activation  # nor early
            swap = w.stats.last_swap
            assert swap is not None and swap.activation_time is not None
            assert swap.server_time >= swap.activation_time
            assert (swap.local_time - swap.activation_time).total_seconds() == pytest.approx(
                node_ahead, abs=5.0)

    async def test_past_activation_switches_on_receipt(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """An activation time already past when the server sent the move (a node that
        reconnects late, an emergency rollback) means switch at once, whatever the clocks.
        """
        plane, target = fake
        plane.skew = -1000.0  # the node is far ahead: a past time would still look past
        await plane.promote(1)
        async with watcher(target, Loader(), tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: w.prepared is not None)
            await plane.move(2, rollout=ROLLOUT, activation_time=plane.server_now() - 0.001)
            await w.wait_for_version(2, timeout=5)
            swap = w.stats.last_swap
            assert swap is not None and swap.activation_time is None

    async def test_commit_of_an_unprepared_version_prepares_then_switches(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A node that never saw the pending version (it joined after prepare) loads the
        committed one, then switches: at the activation time, or at once if it is past.
        """
        plane, target = fake
        await plane.promote(1)
        loader = Loader()
        async with watcher(target, loader, tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            activation = plane.server_now() + 0.5
            await plane.move(3, rollout=ROLLOUT, activation_time=activation)
            await w.wait_for_version(3, timeout=10)
            swap = w.stats.last_swap
            assert swap is not None and swap.source == "loaded"
            assert swap.local_time.timestamp() >= activation
            assert loader.calls[-1] == sha(b"model 3")

    async def test_abort_drops_the_prepared_model(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """Pending cleared with the pointer still on the old version: the prepared model is
        dropped, the serving one untouched, and the report shows nothing prepared.
        """
        plane, target = fake
        await plane.promote(1)
        async with watcher(target, Loader(), tmp_path) as w:
            first = await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: served(plane).prepared_version == 2)
            await plane.move(1)
            await eventually(lambda: w.prepared is None)
            assert w.current is first and w.stats.swaps == 1
            assert (w.stats.prepared_version, w.stats.pending_version) == (0, 0)
            await eventually(lambda: served(plane).prepared_version == 1)
            assert served(plane).rollout == "" and served(plane).serving_version == 1

    async def test_abort_cancels_a_prepare_in_progress(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A rollout aborted while its version is still loading leaves nothing prepared."""
        plane, target = fake
        await plane.promote(1)
        started, gate = threading.Event(), threading.Event()
        loader = Loader()

        def load(path: Path) -> str:
            if path.name == sha(b"model 2"):
                started.set()
                gate.wait(5)
            return loader(path)

        async with watcher(target, load, tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            assert await asyncio.to_thread(started.wait, 5)
            await plane.move(1)
            gate.set()
            await eventually(lambda: sha(b"model 2") in loader.calls)
            await asyncio.sleep(0.1)
            assert w.prepared is None and w.current is not None and w.current.version == 1

    async def test_failed_prepare_is_reported_retried_and_cleared_by_the_abort(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A pending version whose artifact fails its digest is reported failed with the
        rollout's name and retried while the rollout lasts; its abort clears the failure.
        """
        plane, target = fake
        plane.register(4, b"evil bytes", digest=sha(b"good bytes"))
        await plane.promote(1)
        errors: list[int] = []
        async with watcher(target, Loader(), tmp_path,
                           on_error=lambda v, e: errors.append(v)) as w:
            await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=4, pending_rollout=ROLLOUT)
            await eventually(lambda: len(errors) >= 2)
            assert set(errors) == {4} and w.prepared is None
            await eventually(lambda: served(plane).failed_version == 4)
            report = served(plane)
            assert (report.rollout, report.serving_version, report.prepared_version) == (
                ROLLOUT, 1, 1)
            assert "sha256" in report.error
            await plane.move(1)
            await eventually(lambda: served(plane).failed_version == 0)
            assert w.stats.failed_version == 0 and served(plane).rollout == ""

    async def test_rollback_to_the_warm_previous_fetches_nothing(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """An emergency rollback (activation on receipt) to the previous version swaps the
        warm model back: no version read, no transfer, no load.
        """
        plane, target = fake
        await plane.promote(1)
        fetcher, loader = CountingFetcher(), Loader()
        async with watcher(target, loader, tmp_path, fetchers={"file": fetcher}) as w:
            first = await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: w.prepared is not None)
            await plane.move(2, rollout=ROLLOUT, activation_time=plane.server_now() + 0.2)
            await w.wait_for_version(2, timeout=5)
            reads, fetches, loads = len(plane.version_reads), len(fetcher.uris), len(loader.calls)
            assert (fetches, loads) == (2, 2)
            await plane.move(1, rollout=f"{STAGE}/rollouts/2",
                             activation_time=plane.server_now())
            assert await w.wait_for_version(1, timeout=5) is first
            assert (len(plane.version_reads), len(fetcher.uris), len(loader.calls)) == (
                reads, fetches, loads)
            swap = w.stats.last_swap
            assert swap is not None and (swap.source, swap.activation_time) == ("previous", None)
            assert [s.version for s in w.stats.recent_swaps] == [1, 2, 1]

    async def test_a_new_node_serves_the_version_then_prepares_the_pending_one(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """A node starting while a rollout prepares loads and serves the pointer's version
        first, then prepares the rollout's.
        """
        plane, target = fake
        await plane.move(1, pending_version=3, pending_rollout=ROLLOUT)
        async with watcher(target, Loader(), tmp_path) as w:
            await w.wait_for_version(1, timeout=5)
            await eventually(lambda: w.prepared is not None)
            assert w.prepared is not None and w.prepared.version == 3
            assert w.current is not None and w.current.version == 1

    async def test_first_rollout_of_an_empty_stage(
        self, fake: tuple[FakeControlPlane, str], tmp_path: Path
    ) -> None:
        """An empty stage whose first version comes through a rollout: prepared, then
        served from the commit.
        """
        plane, target = fake
        async with watcher(target, Loader(), tmp_path) as w:
            await plane.move(0, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: w.prepared is not None)
            assert w.current is None
            await plane.move(2, rollout=ROLLOUT, activation_time=plane.server_now() + 0.1)
            await w.wait_for_version(2, timeout=5)
            assert w.stats.last_swap is not None and w.stats.last_swap.source == "prepared"

    async def test_private_cache_removes_a_dropped_prepared_artifact(
        self, fake: tuple[FakeControlPlane, str]
    ) -> None:
        """Without cache_dir, an aborted rollout's artifact is deleted with its model."""
        plane, target = fake
        await plane.promote(1)
        w = AsyncModelWatcher(MODEL, "production", Loader(), target=target, report=False)
        async with w:
            await w.wait_for_version(1, timeout=5)
            await plane.move(1, pending_version=2, pending_rollout=ROLLOUT)
            await eventually(lambda: w.prepared is not None)
            assert w.current is not None
            cache = w.current.path.parent
            assert (cache / sha(b"model 2")).exists()
            await plane.move(1)
            await eventually(lambda: w.prepared is None)
            assert sorted(p.name for p in cache.iterdir()) == [sha(b"model 1")]
