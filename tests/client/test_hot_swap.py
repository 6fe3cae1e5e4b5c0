"""Hot swap through the watcher SDK against a real server: readers only ever see complete,
committed models; a corrupted artifact never replaces the serving one.
"""

from __future__ import annotations

import asyncio
import random
import threading

import grpc

from modelreg.client.watcher import ThreadedModelWatcher
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, Toy, load_toy, register, stage


class Reader(threading.Thread):
    """Reads ``watcher.current`` in a tight loop and records anything wrong."""

    def __init__(self, watcher: ThreadedModelWatcher[Toy]) -> None:
        super().__init__(daemon=True)
        self.watcher = watcher
        self.stop = threading.Event()
        self.seen: set[int] = set()
        self.problems: list[str] = []
        self.reads = 0

    def run(self) -> None:
        while not self.stop.is_set():
            loaded = self.watcher.current
            if loaded is None:
                continue
            self.reads += 1
            toy = loaded.model
            if not toy.complete or len(toy.weights) != 50:
                self.problems.append(f"half-loaded v{loaded.version}")
            if toy.version != loaded.version:
                self.problems.append(f"v{loaded.version} holds the model of v{toy.version}")
            self.seen.add(loaded.version)


class TestHotSwap:
    async def test_fifty_moves_never_show_a_partial_or_uncommitted_model(
        self, stub, server, tmp_path
    ):
        """A reader thread calling .current throughout 50 promotions and rollbacks only ever
        sees complete models of versions the pointer was committed to, ending on the last.
        """
        await stub.CreateModel(svc.CreateModelRequest(
            model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"])))
        for n in range(1, 7):
            await register(stub, tmp_path, n)
        unused = 6  # registered, never promoted: must never be seen
        watcher: ThreadedModelWatcher[Toy] = ThreadedModelWatcher(
            MODEL, "canary", load_toy, target=server.target, cache_dir=tmp_path / "cache",
            node_id="swap-node")
        committed: set[int] = set()
        first = await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("canary"),
                                                                    version=1))
        committed.add(1)
        watcher.start()
        reader = Reader(watcher)
        try:
            await asyncio.to_thread(watcher.wait_for_version, 1, 30)
            reader.start()
            rng = random.Random(3)
            current, revision = 1, first.revision
            for i in range(50):
                if i % 5 == 4:
                    try:
                        moved = await stub.RollbackStage(
                            svc.RollbackStageRequest(name=stage("canary")))
                    except grpc.aio.AioRpcError as err:  # no candidate left: fine
                        if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                            raise
                        continue
                    current, revision = moved.stage.version, moved.revision
                else:
                    target = rng.choice([v for v in range(1, unused) if v != current])
                    moved = await stub.PromoteVersion(
                        svc.PromoteVersionRequest(name=stage("canary"), version=target))
                    current, revision = target, moved.revision
                committed.add(current)
                await asyncio.sleep(rng.choice([0, 0.005, 0.02]))
            final = await asyncio.to_thread(watcher.wait_for_version, current, 30)
            assert final.version == current
            assert watcher.stats.last_revision >= revision
        finally:
            reader.stop.set()
            reader.join(5)
            await asyncio.to_thread(watcher.stop)
        assert reader.reads > 0
        assert reader.problems == []
        assert reader.seen <= committed and unused not in reader.seen

    async def test_corrupted_artifact_is_refused_and_old_model_keeps_serving(
        self, stub, server, tmp_path
    ):
        """A version whose artifact no longer matches its sha256 is refused: the watcher
        keeps serving the previous model and the fleet view shows the failure.
        """
        await stub.CreateModel(svc.CreateModelRequest(
            model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"])))
        await register(stub, tmp_path, 1)
        bad = await register(stub, tmp_path, 2)
        bad.write_text("version:2\n" + "!" * 1000)  # same size, different bytes
        await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("canary"), version=1))
        watcher: ThreadedModelWatcher[Toy] = ThreadedModelWatcher(
            MODEL, "canary", load_toy, target=server.target, cache_dir=tmp_path / "cache",
            node_id="corrupt-node")
        watcher.start()
        try:
            await asyncio.to_thread(watcher.wait_for_version, 1, 30)
            await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("canary"), version=2))
            async with asyncio.timeout(30):
                while watcher.stats.failed_version != 2:
                    await asyncio.sleep(0.05)
            assert watcher.current is not None and watcher.current.version == 1
            assert watcher.current.model.version == 1
            async with grpc.aio.insecure_channel(server.target) as channel:
                fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
                async with asyncio.timeout(30):
                    while True:
                        status = await fleet.GetRolloutStatus(
                            fs.GetRolloutStatusRequest(name=stage("canary")))
                        if status.lagging and status.lagging[0].stages[0].failed_version == 2:
                            break
                        await asyncio.sleep(0.1)
            assert status.stage.version == 2
            assert [(c.version, c.nodes) for c in status.serving] == [(1, 1)]
            error = status.lagging[0].stages[0].error.lower()
            assert "sha256" in error or "digest" in error
        finally:
            await asyncio.to_thread(watcher.stop)
