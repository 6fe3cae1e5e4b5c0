"""Bad input beyond field rules: undecodable bytes, huge values, server bugs, and the outcome
(code, log line, metric) of calls the caller cancelled or let time out.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aetcd
import grpc
import pytest
from grpc_status import rpc_status
from structlog.testing import capture_logs

from modelreg.client import cli
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc, watch_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from tests.helpers import MODEL, error_info, make_model

MODEL_SERVICE = "/modelreg.v1.ModelService/"
UNDECODABLE = {
    "invalid UTF-8 in a string": b"\x0a\x02\xff\xfe",  # field 1 (model_id), bytes ff fe
    "truncated": b"\x0a\x05ab",  # field 1 claims 5 bytes, 2 follow
    "corrupt tag": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
}


async def _keys_and_values(etcd_server: Any, prefix: str) -> dict[bytes, bytes]:
    async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
        return {kv.key: kv.value for kv in await client.get_prefix(prefix.encode())}


def _count(server: Any, method: str, code: str) -> float:
    value = server.app.metrics.registry.get_sample_value(
        "modelreg_rpcs_total", {"method": method, "code": code})
    return value or 0.0


async def _until(condition: Any) -> None:
    """Polls until ``condition()`` holds; gives up (fails) after a generous 10 s."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.02)


class TestUndecodableRequests:
    @pytest.mark.parametrize("raw", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
    async def test_unary_bytes_that_do_not_parse(self, server, etcd_server, etcd_prefix, raw):
        """Bytes that are no valid request are INVALID_ARGUMENT UNDECODABLE_REQUEST, not UNKNOWN."""
        before = await _keys_and_values(etcd_server, etcd_prefix)
        async with grpc.aio.insecure_channel(server.target) as channel:
            for path in (MODEL_SERVICE + "CreateModel", "/modelreg.v1.FleetService/ReportNode"):
                call = channel.unary_unary(path)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(raw, timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
                reason, _, fields = error_info(caught.value)
                assert (reason, fields) == ("UNDECODABLE_REQUEST", ["request"])
                assert "Error parsing" not in (caught.value.details() or "")
        assert await _keys_and_values(etcd_server, etcd_prefix) == before

    async def test_watch_stream_bytes_that_do_not_parse(self, server):
        """A watch request that does not parse ends the stream INVALID_ARGUMENT, not UNKNOWN."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = channel.unary_stream("/modelreg.v1.WatchService/WatchStages")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call(UNDECODABLE["truncated"], timeout=10):
                    pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[0] == "UNDECODABLE_REQUEST"


class TestServerBugs:
    async def test_unexpected_error_is_internal_with_an_error_id(
        self, stub, etcd_server, etcd_prefix
    ):
        """A handler failure is INTERNAL with a generic message and an id the log has."""
        async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
            await client.put(f"{etcd_prefix}models/broken".encode(), b"\xff not protobuf")
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(svc.GetModelRequest(name="models/broken"))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        reason, metadata, _ = error_info(caught.value)
        assert reason == "INTERNAL"
        assert "parsing" not in (caught.value.details() or "").lower()
        assert metadata["error_id"] in (caught.value.details() or "")
        failed = [e for e in logs if e["event"] == "rpc_failed"]
        assert [e["error_id"] for e in failed] == [metadata["error_id"]]
        assert failed[0]["exc_info"] is not None

    async def test_unexpected_error_in_a_stream_is_internal(self, server, monkeypatch):
        """A watch stream that fails unexpectedly ends INTERNAL without the exception's text."""
        async def broken(*args: object) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(server.hub, "opening", broken)
        async with grpc.aio.insecure_channel(server.target) as channel:
            watch = watch_service_pb2_grpc.WatchServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in watch.WatchStages(ws.WatchStagesRequest(), timeout=10):
                    pass
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (caught.value.details() or "")
        assert error_info(caught.value)[1]["error_id"]


class TestHugeValues:
    async def test_five_kilobyte_name_is_invalid_argument(self, server):
        """A 5 KB resource name is INVALID_ARGUMENT with a short message, not RESOURCE_EXHAUSTED."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            raw = channel.unary_unary(
                MODEL_SERVICE + "GetModel",
                request_serializer=svc.GetModelRequest.SerializeToString,
                response_deserializer=svc.GetModelResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw(svc.GetModelRequest(name="models/" + "x" * 5000), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(caught.value.details() or "") < 1024

    async def test_two_mebibyte_id_is_echoed_as_a_prefix(self, stub, etcd_server, etcd_prefix):
        """A 2 MiB model id is refused with a bounded status and bounded log lines."""
        huge = "a" * (2 << 20)
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateModel(svc.CreateModelRequest(model_id=huge, request_id=huge[:99999]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(caught.value)
        assert status is not None and status.ByteSize() < 4096
        assert all(len(json.dumps(e, default=str)) < 4096 for e in logs)
        assert await _keys_and_values(etcd_server, etcd_prefix) == {}

    async def test_many_bad_tags_fit_the_trailers(self, stub):
        """Hundreds of violations come back as a few, INVALID_ARGUMENT (not RESOURCE_EXHAUSTED)."""
        tags = {f"{'!' * 100}{i}": "v" * 300 for i in range(64)}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateModel(svc.CreateModelRequest(model_id="m1", model={"tags": tags}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert 0 < len(error_info(caught.value)[2]) <= 8

    async def test_node_id_with_trailing_newline(self, server, etcd_server, etcd_prefix):
        """A node id ending in a newline is INVALID_ARGUMENT and no node is written."""
        async with grpc.aio.insecure_channel(server.target) as channel:
            fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await fleet.ReportNode(fs.ReportNodeRequest(node=fs.Node(node_id="node-1\n")))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["node.node_id"]
        assert await _keys_and_values(etcd_server, etcd_prefix) == {}


    async def test_node_swap_time_out_of_range(self, server, etcd_server, etcd_prefix):
        """A served stage's swap time beyond year 9999 is INVALID_ARGUMENT, nothing stored."""
        served = fs.ServedStage(stage=f"models/{MODEL}/stages/production",
                                swap_time={"seconds": 10**12})
        async with grpc.aio.insecure_channel(server.target) as channel:
            fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await fleet.ReportNode(fs.ReportNodeRequest(
                    node=fs.Node(node_id="node-1", stages=[served])))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value)[2] == ["node.stages[0].swap_time.seconds"]
        assert await _keys_and_values(etcd_server, etcd_prefix) == {}


class TestCallOutcome:
    async def test_cancelled_unary_call_is_logged_cancelled(self, stub, server, monkeypatch):
        """A unary call the client cancels mid-handler is logged and counted CANCELLED, not OK."""
        entered, never = asyncio.Event(), asyncio.Event()

        async def stuck(*args: object, **kwargs: object) -> None:
            entered.set()
            await never.wait()

        monkeypatch.setattr(server.store, "scan", stuck)
        with capture_logs() as logs:
            call = stub.ListModels(svc.ListModelsRequest())
            await entered.wait()
            call.cancel()
            await _until(lambda: _count(server, "ListModels", "CANCELLED") == 1)
        assert [e["code"] for e in logs if e["event"] == "rpc"] == ["CANCELLED"]
        assert _count(server, "ListModels", "OK") == 0

    async def test_timed_out_unary_call_is_counted_deadline_exceeded(
        self, stub, server, monkeypatch
    ):
        """A unary call whose deadline passes mid-handler is counted DEADLINE_EXCEEDED."""
        never = asyncio.Event()

        async def stuck(*args: object, **kwargs: object) -> None:
            await never.wait()

        monkeypatch.setattr(server.store, "scan", stuck)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListModels(svc.ListModelsRequest(), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: _count(server, "ListModels", "DEADLINE_EXCEEDED") == 1)
        assert _count(server, "ListModels", "OK") == 0

    async def test_watch_stream_outcomes(self, stub, server):
        """A watch the client cancels counts CANCELLED; one that times out, DEADLINE_EXCEEDED."""
        await make_model(stub, MODEL)
        async with grpc.aio.insecure_channel(server.target) as channel:
            watch = watch_service_pb2_grpc.WatchServiceStub(channel)
            call = watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]))
            await call.read()
            call.cancel()
            await _until(lambda: _count(server, "WatchStages", "CANCELLED") == 1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]),
                                                 timeout=0.3):
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _until(lambda: _count(server, "WatchStages", "DEADLINE_EXCEEDED") == 1)
        assert _count(server, "WatchStages", "OK") == 0


class TestStoredRecords:
    async def test_cli_renders_a_stored_out_of_range_time(
        self, stub, server, etcd_server, etcd_prefix, capsys
    ):
        """A sunset time an older server stored out of range renders raw, never a traceback."""
        await make_model(stub, MODEL, versions=1)
        key = f"{etcd_prefix}versions/{MODEL}/{1:012d}".encode()
        async with aetcd.Client(etcd_server.host, etcd_server.client_port) as client:
            stored = res.ModelVersion.FromString((await client.get(key)).value)
            stored.sunset_time.seconds, stored.sunset_time.nanos = 10**12, -1
            await client.put(key, stored.SerializeToString())
        base = ["--target", server.target]
        for args in (["versions", "get", MODEL, "1"], ["--json", "versions", "list", MODEL]):
            assert await asyncio.to_thread(cli.main, [*base, *args]) == 0, args
            out = capsys.readouterr()
            assert "1000000000000" in out.out and "Traceback" not in out.err
