"""A server restarted under connected watchers: every watcher resumes and misses nothing;
one that comes back on a replaced etcd gives its watchers a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from modelreg.client.watcher import ThreadedModelWatcher
from modelreg.server.embedded_etcd import free_port
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc
from tests.helpers import MODEL, ActorStub, Toy, load_toy, make_model, register, stage, start_server
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)


class Follower:
    """A minimal watch client: resumes from its last revision + 1 after any stream error."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.last_revision = 0
        self.version = 0
        self.seen: list[int] = []
        self.reconnects = 0

    async def run(self) -> None:
        while True:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    watch = watch_service_pb2_grpc.WatchServiceStub(channel)
                    start = self.last_revision + 1 if self.last_revision else 0
                    async for message in watch.WatchStages(ws.WatchStagesRequest(
                            models=[MODEL], stages=["canary"], start_revision=start)):
                        for pointer in message.snapshot:
                            self.version = pointer.version
                        for change in message.changes:
                            self.version = change.stage.version
                            self.seen.append(change.stage.version)
                        self.last_revision = message.revision
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.reconnects += 1
                await asyncio.sleep(0.05)


class TestServerRestart:
    async def test_twenty_watchers_survive_a_restart(self, etcd_server, etcd_prefix):
        """20 watchers on a server that is stopped and started again, with promotions before,
        during (through another server) and after the outage, all end on the right version
        having seen every change exactly once.
        """
        port = free_port()
        target = f"127.0.0.1:{port}"
        first = await start_server(etcd_server.endpoint, etcd_prefix, listen=target)
        other = await start_server(etcd_server.endpoint, etcd_prefix)
        followers = [Follower(target) for _ in range(20)]
        tasks = [asyncio.create_task(f.run()) for f in followers]
        try:
            async with asyncio.timeout(20):  # every stream has its opening snapshot
                while any(f.last_revision == 0 for f in followers):
                    await asyncio.sleep(0.02)
            async with grpc.aio.insecure_channel(other.target) as channel:
                stub = ActorStub(channel, "alice")
                await make_model(stub, versions=3, custom_stages=["canary"])
                moves = [1, 2, 3, 1, 2, 3]

                async def promote(v: int) -> int:
                    moved = await stub.PromoteVersion(
                        svc.PromoteVersionRequest(name=stage("canary"), version=v))
                    return moved.revision

                async def all_at(revision: int) -> None:
                    async with asyncio.timeout(20):
                        while any(f.last_revision < revision for f in followers):
                            await asyncio.sleep(0.02)

                for v in moves[:2]:
                    await all_at(await promote(v))
                await first.stop()  # every stream breaks
                for v in moves[2:4]:
                    await promote(v)  # changes while the watchers' server is down
                first = await start_server(etcd_server.endpoint, etcd_prefix, listen=target)
                for v in moves[4:]:
                    last = await promote(v)
                await all_at(last)
            for f in followers:
                assert f.version == 3
                assert f.seen == moves, f.seen  # every change once, in order
                assert f.reconnects >= 1
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await first.stop()
            await other.stop()


class TestReplacedEtcd:
    async def test_watcher_takes_a_snapshot_from_a_server_behind_it(
            self, etcd_server, etcd_prefix, own_etcd, tmp_path):
        """A watcher whose server comes back on a fresh etcd (replaced, or restored from an old
        backup) that never reached the watcher's revision is refused OUT_OF_RANGE on resume,
        takes a snapshot instead and serves what the new etcd holds.
        """
        port = free_port()
        target = f"127.0.0.1:{port}"
        first = await start_server(etcd_server.endpoint, etcd_prefix, listen=target)
        watcher: ThreadedModelWatcher[Toy] = ThreadedModelWatcher(
            MODEL, "canary", load_toy, target=target, cache_dir=tmp_path / "cache",
            node_id="restored-node")
        second = None
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = ActorStub(channel, "alice")
                await stub.CreateModel(svc.CreateModelRequest(
                    model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"])))
                for n in (1, 2):
                    await register(stub, tmp_path, n)
                for n in (1, 2) * 6:
                    await stub.PromoteVersion(
                        svc.PromoteVersionRequest(name=stage("canary"), version=n))
            watcher.start()
            await asyncio.to_thread(watcher.wait_for_version, 2, 30)
            seen = watcher.stats.last_revision
            await first.stop()
            second = await start_server(own_etcd.endpoint, etcd_prefix, listen=target)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = ActorStub(channel, "alice")
                # The port was the first server's a moment ago: a connection attempt can still
                # land on its closing listener (grpc binds with SO_REUSEPORT) and be refused.
                await stub.CreateModel(svc.CreateModelRequest(
                    model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"])),
                    wait_for_ready=True)
                await register(stub, tmp_path, 1)
                moved = await stub.PromoteVersion(
                    svc.PromoteVersionRequest(name=stage("canary"), version=1))
            assert moved.revision + 1 < seen  # the watcher's resume point is past this etcd
            loaded = await asyncio.to_thread(watcher.wait_for_version, 1, 30)
            assert loaded.version == 1
            assert watcher.stats.last_revision < seen
        finally:
            await asyncio.to_thread(watcher.stop)
            await first.stop()
            if second is not None:
                await second.stop()
