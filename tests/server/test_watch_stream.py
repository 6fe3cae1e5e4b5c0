"""WatchStages against a real server and etcd: snapshot, order, resume, compaction, bookmarks,
slow consumers and server restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aetcd
import grpc
import pytest

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc
from tests.helpers import MODEL, ActorStub, error_info, make_model, stage, start_server
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)

SNAPSHOT, CHANGES, BOOKMARK = (ws.WATCH_MESSAGE_TYPE_SNAPSHOT, ws.WATCH_MESSAGE_TYPE_CHANGES,
                               ws.WATCH_MESSAGE_TYPE_BOOKMARK)


async def _promote_chain(stub, versions, custom="canary") -> list[int]:
    """Promote each version to the custom stage in turn; returns the revisions."""
    revisions = []
    for v in versions:
        moved = await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage(custom), version=v))
        revisions.append(moved.revision)
    return revisions


async def _read(stream, count: int, timeout: float = 10.0) -> list[ws.WatchStagesResponse]:
    """The next ``count`` non-bookmark messages of a stream."""
    got: list[ws.WatchStagesResponse] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            message = await stream.read()
            assert message is not grpc.aio.EOF
            if message.type != BOOKMARK:
                got.append(message)
    return got


def _versions(messages) -> list[tuple[int, int]]:
    return [(m.revision, c.stage.version) for m in messages if m.type == CHANGES
            for c in m.changes]


class TestWatchStream:
    async def test_snapshot_then_changes_in_revision_order(self, stub, server):
        """A stream starts with the selected pointers, then every change in revision order;
        the promotion's pointer moves arrive as one message per transaction.
        """
        await make_model(stub, versions=4, custom_stages=["canary"])
        await _promote_chain(stub, [1])
        await make_model(stub, "other", versions=1)
        async with grpc.aio.insecure_channel(server.target) as channel:
            watch = watch_service_pb2_grpc.WatchServiceStub(channel)
            stream = watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]))
            first = (await _read(stream, 1))[0]
            assert first.type == SNAPSHOT and not first.reset
            assert [(p.name, p.version) for p in first.snapshot] == [(stage("canary"), 1)]
            revisions = await _promote_chain(stub, [2, 3, 4])
            await stub.PromoteVersion(svc.PromoteVersionRequest(name="models/other/stages/staging",
                                                                version=1))
            changes = await _read(stream, 3)
            assert _versions(changes) == list(zip(revisions, [2, 3, 4], strict=True))
            assert [c.changes[0].from_version for c in changes] == [1, 2, 3]
            assert changes[0].changes[0].stage.etag == f'"{revisions[0]}"'
            stream.cancel()

    async def test_stage_and_prefix_selection(self, stub, server):
        """Selecting by stage or model prefix delivers only matching pointers."""
        await make_model(stub, "fraud-a", versions=1)
        await make_model(stub, "fraud-b", versions=1)
        await make_model(stub, "churn", versions=1)
        async with grpc.aio.insecure_channel(server.target) as channel:
            watch = watch_service_pb2_grpc.WatchServiceStub(channel)
            stream = watch.WatchStages(ws.WatchStagesRequest(model_prefix="fraud-",
                                                             stages=["staging"]))
            assert (await _read(stream, 1))[0].snapshot == []
            for model in ("churn", "fraud-b"):
                await stub.PromoteVersion(svc.PromoteVersionRequest(
                    name=f"models/{model}/stages/staging", version=1))
            got = await _read(stream, 1)
            assert [c.stage.name for c in got[0].changes] == ["models/fraud-b/stages/staging"]
            stream.cancel()

    async def test_idle_stream_gets_bookmarks(self, stub, etcd_server, etcd_prefix):
        """An idle stream receives bookmarks carrying the current revision."""
        running = await start_server(etcd_server.endpoint, etcd_prefix, bookmark_interval=0.2)
        try:
            async with grpc.aio.insecure_channel(running.target) as channel:
                writer = ActorStub(channel, "alice")
                await make_model(writer, versions=1)
                created = await writer.GetModel(svc.GetModelRequest(name=f"models/{MODEL}"))
                watch = watch_service_pb2_grpc.WatchServiceStub(channel)
                stream = watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]))
                async with asyncio.timeout(10):
                    assert (await stream.read()).type == SNAPSHOT
                    bookmarks = []
                    while not bookmarks or bookmarks[-1] < created.revision:
                        message = await stream.read()
                        assert message.type == BOOKMARK  # nothing of this model changed
                        bookmarks.append(message.revision)
                assert bookmarks == sorted(bookmarks)
                stream.cancel()
        finally:
            await running.stop()

    async def test_every_message_carries_the_server_time(self, etcd_server, etcd_prefix):
        """Snapshot, changes and bookmarks each carry server_time, the server's clock when it
        sent them: never before the stream opened nor after the client read it, never going
        back; two streams sharing one change message each get it stamped.
        """
        running = await start_server(etcd_server.endpoint, etcd_prefix, bookmark_interval=0.2)
        try:
            async with grpc.aio.insecure_channel(running.target) as channel:
                writer = ActorStub(channel, "alice")
                await make_model(writer, versions=1, custom_stages=["canary"])
                watch = watch_service_pb2_grpc.WatchServiceStub(channel)
                opened = time.time_ns()
                streams = [watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]))
                           for _ in range(2)]
                got: list[list[tuple[int, int, int]]] = [[], []]  # (type, sent, read)
                async with asyncio.timeout(10):
                    for i, stream in enumerate(streams):
                        first = await stream.read()
                        got[i].append((first.type, first.server_time.ToNanoseconds(),
                                       time.time_ns()))
                    await _promote_chain(writer, [1])
                    for i, stream in enumerate(streams):
                        while {t for t, _, _ in got[i]} != {SNAPSHOT, CHANGES, BOOKMARK}:
                            message = await stream.read()
                            assert message.HasField("server_time")
                            got[i].append((message.type, message.server_time.ToNanoseconds(),
                                           time.time_ns()))
                for stream in streams:
                    stream.cancel()
        finally:
            await running.stop()
        for messages in got:
            assert messages[0][0] == SNAPSHOT
            sent = [s for _, s, _ in messages]
            assert sent == sorted(sent)
            assert all(opened <= s <= read for _, s, read in messages)

    async def test_resume_gives_exactly_the_missed_changes(self, stub, server, etcd_server,
                                                           etcd_prefix):
        """Resuming from a revision replays exactly the changes from it on, from the server's
        buffer and, on a fresh server with an empty buffer, from etcd's history.
        """
        await make_model(stub, versions=6, custom_stages=["canary"])
        revisions = await _promote_chain(stub, [1, 2, 3, 4, 5, 6])
        expected = list(zip(revisions[2:], [3, 4, 5, 6], strict=True))
        fresh = await start_server(etcd_server.endpoint, etcd_prefix)
        try:
            for target, next_version in ((server.target, 1), (fresh.target, 2)):
                async with grpc.aio.insecure_channel(target) as channel:
                    watch = watch_service_pb2_grpc.WatchServiceStub(channel)
                    stream = watch.WatchStages(ws.WatchStagesRequest(
                        models=[MODEL], start_revision=revisions[2]))
                    assert _versions(await _read(stream, len(expected))) == expected
                    more = await _promote_chain(stub, [next_version])
                    assert _versions(await _read(stream, 1)) == [(more[0], next_version)]
                    expected.append((more[0], next_version))
                    stream.cancel()
        finally:
            await fresh.stop()

    async def test_compacted_resume_gets_reset_snapshot(self, stub, server, etcd_server,
                                                        etcd_prefix):
        """Resuming from a revision etcd compacted away yields a snapshot flagged reset with
        the current pointers: never a silent gap.
        """
        await make_model(stub, versions=3, custom_stages=["canary"])
        revisions = await _promote_chain(stub, [1, 2, 3])
        async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
            await client.compact(revisions[-1])
        fresh = await start_server(etcd_server.endpoint, etcd_prefix)  # empty buffer: etcd only
        try:
            async with grpc.aio.insecure_channel(fresh.target) as channel:
                watch = watch_service_pb2_grpc.WatchServiceStub(channel)
                stream = watch.WatchStages(ws.WatchStagesRequest(
                    models=[MODEL], start_revision=revisions[0]))
                reset = (await _read(stream, 1))[0]
                assert reset.type == SNAPSHOT and reset.reset
                assert [p.version for p in reset.snapshot] == [3]
                assert reset.revision >= revisions[-1]
                stream.cancel()
        finally:
            await fresh.stop()

    async def test_bad_selection_is_invalid_argument(self, server):
        """A malformed selection is refused before anything is streamed."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            watch = watch_service_pb2_grpc.WatchServiceStub(channel)
            stream = watch.WatchStages(
                ws.WatchStagesRequest(models=["Bad Model"], stages=["latest"]))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["models[0]", "stages[0]"]


class TestSlowConsumer:
    async def test_slow_consumer_is_cut_off_fast_ones_keep_up(self, etcd_server, etcd_prefix):
        """A stream whose client stops reading ends RESOURCE_EXHAUSTED once its bounded queue
        overflows, while a reading stream receives every change; the hub forgets the slow one.
        """
        running = await start_server(etcd_server.endpoint, etcd_prefix, watch_queue=8)
        try:
            async with grpc.aio.insecure_channel(running.target) as channel, \
                    grpc.aio.insecure_channel(  # no window growth: unread data backs up soon
                        running.target, options=[("grpc.http2.bdp_probe", 0)]) as slow_channel:
                stub = ActorStub(channel, "alice")
                await make_model(stub, versions=2, custom_stages=["canary"])
                big = "x" * 1000  # big enough that unread messages fill the HTTP/2 window
                watch = watch_service_pb2_grpc.WatchServiceStub(channel)
                fast = watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]))
                slow = watch_service_pb2_grpc.WatchServiceStub(slow_channel).WatchStages(
                    ws.WatchStagesRequest(models=[MODEL]))
                await _read(fast, 1)
                await _read(slow, 1)
                received: list[int] = []

                async def consume() -> None:
                    while True:
                        message = await fast.read()
                        received.extend(c.stage.version for c in message.changes)

                consumer = asyncio.create_task(consume())
                moves = 3000
                for i in range(moves):
                    await stub.PromoteVersion(svc.PromoteVersionRequest(
                        name=stage("canary"), version=1 + i % 2, reason=big))
                    assert running.hub.queued_messages <= 2 * 8  # bounded by the queue size
                    if running.hub.overflowed_streams == 1:
                        break
                assert running.hub.overflowed_streams == 1, "the slow stream was never cut off"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async with asyncio.timeout(30):
                        while True:
                            await slow.read()
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_info(caught.value)[0] == "WATCH_TOO_SLOW"
                assert running.hub.streams == 1
                done = i + 1
                async with asyncio.timeout(10):
                    while len(received) < done:
                        await asyncio.sleep(0.01)
                assert received == [1 + k % 2 for k in range(done)]
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
        finally:
            await running.stop()
