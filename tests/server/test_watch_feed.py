"""The watch contract that must not depend on how etcd orders progress notifications, on every
etcd build these machines offer: no progress mark ahead of history, resumptions from etcd's
history that miss nothing, and start revisions in the future.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aetcd
import grpc
import pytest

from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.ports import Batch
from modelreg.server.latency_proxy import LatencyProxy
from modelreg.server.store.etcd import EtcdStore
from modelreg.server.store.etcd_watch import EtcdChangeFeed
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc
from tests.helpers import (
    MODEL,
    ActorStub,
    error_info,
    make_model,
    reset_under_watches,
    stage,
    start_server,
)
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)

BOOKMARK = ws.WATCH_MESSAGE_TYPE_BOOKMARK



class TestChangeFeed:
    async def test_progress_never_overtakes_history(self, etcd_server, etcd_prefix):
        """A watch from an old revision, asked for progress every 30 ms from its creation on,
        announces no revision before it has delivered every change at or below it (etcd
        answers such requests ahead of the history replay: etcd issue 15220).
        """
        revisions = []
        async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
            for i in range(7):
                put = await client.put(f"{etcd_prefix}stages/m/s".encode(), str(i).encode())
                revisions.append(put.header.revision)
            for i in range(50):  # history the watch must scan past
                await client.put(f"{etcd_prefix}other/{i}".encode(), b"x")
        store = EtcdStore([etcd_server.endpoint], etcd_prefix)
        try:
            for _ in range(20):
                feed = EtcdChangeFeed(store, progress_interval=0.03)
                delivered: list[int] = []
                async with asyncio.timeout(10):
                    async for item in feed.watch("stages/", "stages0", revisions[0]):
                        if isinstance(item, Batch):
                            delivered.append(item.revision)
                            continue
                        assert delivered == [r for r in revisions if r <= item.revision]
                        if item.revision >= revisions[-1]:
                            break
                assert delivered == revisions
        finally:
            await store.close()


class TestLiveness:
    async def test_a_quiet_watch_is_not_taken_for_a_dead_one(self, etcd_server, etcd_prefix):
        """A watch waiting for a revision the store has not reached stays open through many
        probe intervals (some etcd releases leave its progress requests unanswered), then
        delivers the next change.
        """
        store = EtcdStore([etcd_server.endpoint], etcd_prefix, timeout=1)
        try:
            _, current = await store.last_change("stages/", "stages0")
            feed = EtcdChangeFeed(store, progress_interval=0.02)
            watch = feed.watch("stages/", "stages0", current + 1)
            reader = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.5)  # 25 intervals
            assert not reader.done()
            async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
                put = await client.put(f"{etcd_prefix}stages/m/s".encode(), b"1")
            async with asyncio.timeout(10):
                item = await reader
            assert isinstance(item, Batch) and item.revision == put.header.revision
            await watch.aclose()  # type: ignore[attr-defined]
        finally:
            await store.close()

    async def test_a_frozen_etcd_ends_the_watch(self, own_etcd):
        """With etcd frozen (SIGSTOP) the watch ends UNAVAILABLE within a few probe intervals
        and the etcd timeout instead of hanging.
        """
        store = EtcdStore([own_etcd.endpoint], "/frozen/", timeout=0.5)
        feed = EtcdChangeFeed(store, progress_interval=0.05)
        items: list[object] = []

        async def follow() -> None:
            async for item in feed.watch("stages/", "stages0", 1):
                items.append(item)

        reader = asyncio.ensure_future(follow())
        await asyncio.sleep(0.3)
        assert items and not reader.done()  # the proof of a quiet range, then nothing
        assert own_etcd.pid is not None
        os.kill(own_etcd.pid, signal.SIGSTOP)
        try:
            async with asyncio.timeout(15):
                with pytest.raises(UnavailableError):
                    await reader
        finally:
            os.kill(own_etcd.pid, signal.SIGCONT)
            await store.close()


    async def test_a_reset_connection_ends_the_watch_unavailable(self, etcd_server, etcd_prefix):
        """Forty resets of the connection (the latency proxy's cut) under a watch that probes
        every 10 ms: each ends the watch with ``UnavailableError``, however the reset falls
        against the probe's writes.
        """
        async with LatencyProxy(etcd_server.endpoint, name="to etcd") as proxy:
            store = EtcdStore([proxy.address], etcd_prefix, timeout=1)
            feed = EtcdChangeFeed(store, progress_interval=0.01)
            try:
                # From the current revision: the session's etcd may have compacted older ones.
                start = (await etcd_store_revision(etcd_server.endpoint, etcd_prefix)) + 1
                await reset_under_watches(
                    proxy, lambda: store.last_change("stages/", "stages0"),
                    lambda: feed.watch("stages/", "stages0", start))
            finally:
                await store.close()

async def etcd_store_revision(endpoint: str, prefix: str) -> int:
    """The current revision of etcd, read directly (not through the proxy)."""
    direct = EtcdStore([endpoint], prefix, timeout=5)
    try:
        return (await direct.read([], fresh=True)).revision
    finally:
        await direct.close()


async def _first_messages(target: str, request: ws.WatchStagesRequest, count: int
                          ) -> list[ws.WatchStagesResponse]:
    """The first ``count`` non-bookmark messages of one stream."""
    got: list[ws.WatchStagesResponse] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stream = watch_service_pb2_grpc.WatchServiceStub(channel).WatchStages(request)
        async with asyncio.timeout(20):
            while len(got) < count:
                message = await stream.read()
                assert message is not grpc.aio.EOF
                if message.type != BOOKMARK:
                    got.append(message)
        stream.cancel()
    return got


class TestResumeFromHistory:
    async def test_two_hundred_streams_resume_on_a_fresh_server(self, etcd_server, etcd_prefix):
        """200 streams resuming on a server that just started (its buffer is empty, so every
        one replays etcd's history) with a 0.1 s progress interval each get all 7 changes
        committed since their revision, in order: none ends its replay early.
        """
        writer = await start_server(etcd_server.endpoint, etcd_prefix)
        try:
            async with grpc.aio.insecure_channel(writer.target) as channel:
                stub = ActorStub(channel, "alice")
                await make_model(stub, versions=3, custom_stages=["canary"])
                first = await stub.PromoteVersion(
                    svc.PromoteVersionRequest(name=stage("canary"), version=1))
                expected = []
                for v in [2, 3, 1, 2, 3, 1, 2]:
                    moved = await stub.PromoteVersion(
                        svc.PromoteVersionRequest(name=stage("canary"), version=v))
                    expected.append((moved.revision, v))
                await make_model(stub, "busy", versions=100)  # history etcd replays past
        finally:
            await writer.stop()
        fresh = await start_server(etcd_server.endpoint, etcd_prefix, bookmark_interval=0.2)
        try:
            request = ws.WatchStagesRequest(models=[MODEL], start_revision=first.revision + 1)
            streams = await asyncio.gather(*(
                _first_messages(fresh.target, request, len(expected)) for _ in range(200)))
            for messages in streams:
                assert [(m.revision, m.changes[0].stage.version) for m in messages] == expected
                assert not any(m.reset for m in messages)
        finally:
            await fresh.stop()


class TestFutureStartRevision:
    async def test_a_revision_just_ahead_waits_for_it(self, etcd_server, server, stub):
        """A stream asking to start one past the store's revision gets nothing below it: its
        first message is the next change, and no bookmark claims a revision below its start.
        """
        await make_model(stub, versions=2, custom_stages=["canary"])
        moved = await stub.PromoteVersion(
            svc.PromoteVersionRequest(name=stage("canary"), version=1))
        start = moved.revision + 1
        async with grpc.aio.insecure_channel(server.target) as channel:
            stream = watch_service_pb2_grpc.WatchServiceStub(channel).WatchStages(
                ws.WatchStagesRequest(models=[MODEL], start_revision=start))
            await asyncio.sleep(0.3)
            later = await stub.PromoteVersion(
                svc.PromoteVersionRequest(name=stage("canary"), version=2))
            async with asyncio.timeout(20):
                while True:
                    message = await stream.read()
                    assert message.revision >= start - 1, message
                    if message.type != BOOKMARK:
                        break
            stream.cancel()
        assert message.revision == later.revision
        assert [c.stage.version for c in message.changes] == [2]

    async def test_a_revision_past_the_store_is_refused(self, etcd_server, server, stub):
        """A start revision that this deployment never handed out is OUT_OF_RANGE, naming the
        field and the store's current revision.
        """
        await make_model(stub, versions=1)
        current = (await stub.GetModel(svc.GetModelRequest(name=f"models/{MODEL}"))).revision
        async with grpc.aio.insecure_channel(server.target) as channel:
            stream = watch_service_pb2_grpc.WatchServiceStub(channel).WatchStages(
                ws.WatchStagesRequest(models=[MODEL], start_revision=current + 1000))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream.read()
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        reason, metadata, fields = error_info(caught.value)
        assert reason == "REVISION_IN_FUTURE"
        assert fields == ["start_revision"]
        assert int(metadata["revision"]) >= current
