"""Mutations through a server outside the primary region commit on the primary, unchanged.

Real grpc.aio servers on loopback: the primary region's (``us``) and a regional one (``eu``)
that forwards every mutation to them; see ``forward_env`` for the regional server's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from structlog.testing import capture_logs

from modelreg.server.api.forward import FORWARDED
from modelreg.server.api.identity import FORWARDED_ACTOR_HEADER, FORWARDED_BY_HEADER
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import region_service_pb2, rollout_service_pb2, watch_service_pb2_grpc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from tests.helpers import MODEL, PARENT, error_info, make_model, stage
from tests.server.forward_env import address, deployment


def failure(err: grpc.aio.AioRpcError) -> tuple[object, ...]:
    """Everything a caller can see of a failed call: code, message and rich details."""
    return err.code(), err.details(), *error_info(err)


def hops(logs: list[dict[str, Any]], method: str) -> list[tuple[str, ...]]:
    """The RPC log lines of ``method``, as (where it was answered, actor, request id, code).

    The regional server's line says ``forwarded_to`` the primary, the primary's line says
    ``forwarded_by`` the region: proof that the call went through the forwarder (the
    regional server, reading the primary's etcd directly, could commit by itself).
    """
    found = []
    for line in logs:
        if line.get("event") == "rpc" and line.get("method") == method:
            where = ("eu->" + line["forwarded_to"] if "forwarded_to" in line
                     else "primary<-" + line["forwarded_by"] if "forwarded_by" in line
                     else "local")
            found.append((where, line.get("actor", ""), line.get("request_id", ""),
                          line["code"]))
    return sorted(found)


async def logged(logs: list[dict[str, Any]], method: str, count: int = 2) -> None:
    """Waits (up to 10 s) until ``count`` rpc lines of ``method`` are captured.

    A server logs a call once it has sent the answer, so the caller may hold the answer a
    moment before the line exists: leaving ``capture_logs`` at once could miss it.
    """
    for _ in range(1000):
        if len(hops(logs, method)) >= count:
            return
        await asyncio.sleep(0.01)


@pytest.fixture
async def regions(etcd_server, etcd_prefix, tmp_path: Path):
    async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path,
                          eu={"bookmark_interval": 0.2}) as env:
        yield env


class TestForwardedMutations:
    async def test_a_promotion_through_the_region_commits_on_the_primary(self, regions):
        """A model, versions and promotions made through eu are the primary's: the same
        revision and etag read back on the primary, audited there with the caller as actor.
        """
        eu, us = regions.model_stub(regions.eu), regions.model_stub(regions.us[0])
        await make_model(eu, versions=2)
        with capture_logs() as logs:
            promoted = await eu.PromoteVersion(svc.PromoteVersionRequest(
                name=stage("staging"), version=2, reason="from eu"))
            await logged(logs, "PromoteVersion")
        assert hops(logs, "PromoteVersion") == [("eu->us", "alice", "", "OK"),
                                                ("primary<-eu", "alice", "", "OK")]
        on_primary = (await us.GetStage(svc.GetStageRequest(name=stage("staging")))).stage
        assert on_primary.version == 2
        assert on_primary.etag == promoted.stage.etag == f'"{promoted.revision}"'
        assert (await us.GetModelVersion(svc.GetModelVersionRequest(
            name=f"{PARENT}/versions/2"))).model_version.stages == ["staging"]
        events = (await us.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))).audit_events
        assert {e.actor for e in events} == {"alice"}
        assert events[0].revision == promoted.revision and events[0].reason == "from eu"

    async def test_an_etag_read_in_one_region_guards_a_write_through_another(self, regions):
        """An etag read from the primary guards a promotion sent through eu; once stale, eu
        answers ABORTED exactly as the primary itself does.
        """
        eu, us = regions.model_stub(regions.eu), regions.model_stub(regions.us[0])
        await make_model(us, versions=2)
        first = await us.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                  version=1))
        etag = first.stage.etag
        second = await eu.PromoteVersion(svc.PromoteVersionRequest(
            name=stage("staging"), version=2, etag=etag))
        assert second.revision > first.revision
        stale = svc.PromoteVersionRequest(name=stage("staging"), version=1, etag=etag)
        with capture_logs() as logs:
            with pytest.raises(grpc.aio.AioRpcError) as through_eu:
                await eu.PromoteVersion(stale)
            await logged(logs, "PromoteVersion")
        with pytest.raises(grpc.aio.AioRpcError) as direct:
            await us.PromoteVersion(stale)
        assert failure(through_eu.value) == failure(direct.value)
        assert [h[0] for h in hops(logs, "PromoteVersion")] == ["eu->us", "primary<-eu"]
        code, _, reason, metadata, _ = failure(through_eu.value)
        assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
        assert metadata["current_etag"] == second.stage.etag

    @pytest.mark.parametrize("request_", [
        svc.PromoteVersionRequest(name=stage("LATEST"), version=1),
        svc.PromoteVersionRequest(name=stage("production"), version=1),
        svc.PromoteVersionRequest(name=stage("staging", "no-such-model"), version=1),
    ], ids=["invalid", "rule", "missing"])
    async def test_errors_pass_through_with_their_details(self, regions, request_):
        """A refusal by the primary (bad field, lifecycle rule, missing model) reaches the
        caller through eu with the same code, message, reason, metadata and field violations.
        """
        eu, us = regions.model_stub(regions.eu), regions.model_stub(regions.us[0])
        await make_model(us, versions=1)
        with capture_logs() as logs:
            with pytest.raises(grpc.aio.AioRpcError) as through_eu:
                await eu.PromoteVersion(request_)
            await logged(logs, "PromoteVersion")
        with pytest.raises(grpc.aio.AioRpcError) as direct:
            await us.PromoteVersion(request_)
        assert failure(through_eu.value) == failure(direct.value)
        code = direct.value.code().name
        assert hops(logs, "PromoteVersion") == [("eu->us", "alice", "", code),
                                                ("primary<-eu", "alice", "", code)]
        assert failure(direct.value)[2] in {"INVALID_ARGUMENT", "STAGING_REQUIRED", "NOT_FOUND"}

    async def test_the_request_id_crosses_so_a_retry_anywhere_is_applied_once(self, regions):
        """A mutation sent through eu with a request id and retried on the primary returns the
        first response: the primary saw the caller's id and applied it once.
        """
        eu, us = regions.model_stub(regions.eu), regions.model_stub(regions.us[0])
        await make_model(us, versions=1)
        request = svc.PromoteVersionRequest(name=stage("staging"), version=1, request_id="r-42")
        with capture_logs() as logs:
            first = await eu.PromoteVersion(request)
            await logged(logs, "PromoteVersion")
        assert hops(logs, "PromoteVersion") == [("eu->us", "alice", "r-42", "OK"),
                                                ("primary<-eu", "alice", "r-42", "OK")]
        again = await us.PromoteVersion(request)
        assert again == first
        history = await us.ListStageHistory(svc.ListStageHistoryRequest(name=stage("staging")))
        assert len(history.entries) == 1

    async def test_every_mutation_is_forwarded_and_nothing_else(self):
        """The forwarded table holds exactly the ModelService, RolloutService and RegionService
        RPCs that are no Get, List or Watch, so a new mutation cannot be answered from a
        regional store by mistake; the one exception is break glass (PinStage, UnpinStage),
        which a region's own server answers by design.
        """
        services = (svc.DESCRIPTOR.services_by_name["ModelService"],
                    rollout_service_pb2.DESCRIPTOR.services_by_name["RolloutService"],
                    region_service_pb2.DESCRIPTOR.services_by_name["RegionService"])
        writes = {f"/{service.full_name}/{m.name}" for service in services
                  for m in service.methods if not m.name.startswith(("Get", "List", "Watch"))}
        local = {"/modelreg.v1.RegionService/PinStage", "/modelreg.v1.RegionService/UnpinStage"}
        assert writes - local == FORWARDED and len(FORWARDED) == 10

    async def test_the_primary_region_commits_itself(self, regions):
        """The primary's servers have no forwarder: they commit as a server without regions."""
        assert regions.us[0].app.forwarder is None and regions.eu.app.forwarder is not None


class TestForwardedPrincipal:
    async def test_the_primary_takes_a_forwarded_principal_only_from_a_forwarding_server(
        self, regions
    ):
        """x-modelreg-forwarded-actor without the forwarding server's header is refused
        UNAUTHENTICATED; with it, the primary records the forwarded principal (today's basis).
        """
        us = regions.model_stub(regions.us[0])
        request = svc.CreateModelRequest(model_id=MODEL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await us.CreateModel(request, metadata=((FORWARDED_ACTOR_HEADER, "mallory"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(err.value)[0] == "UNAUTHENTICATED"
        await us.CreateModel(request, metadata=((FORWARDED_ACTOR_HEADER, "bob"),
                                                (FORWARDED_BY_HEADER, "eu")))
        events = (await us.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))).audit_events
        assert [e.actor for e in events] == ["bob"]

    async def test_a_forwarded_call_is_never_forwarded_again(self, regions):
        """A mutation that reaches eu already forwarded (the senders' topologies disagree) is
        refused UNAVAILABLE naming the primary, instead of going round in a loop.
        """
        eu = regions.model_stub(regions.eu)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await eu.CreateModel(svc.CreateModelRequest(model_id=MODEL), metadata=(
                (FORWARDED_ACTOR_HEADER, "bob"), (FORWARDED_BY_HEADER, "ap")))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        reason, metadata, _ = error_info(err.value)
        assert reason == "PRIMARY_UNAVAILABLE" and metadata["primary"] == "us"
        assert "topologies disagree" in (err.value.details() or "")


class TestFailover:
    async def test_a_dead_primary_server_is_skipped(self, etcd_server, etcd_prefix, tmp_path):
        """With the first of the primary's listed servers down and a second one stopped mid
        way, mutations through eu go to the one still serving.
        """
        async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path, primary_servers=2,
                              dead_primary_addresses=[address()]) as env:
            eu = env.model_stub(env.eu)
            await make_model(eu, versions=2)
            await eu.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=1))
            await env.us[0].stop()
            with capture_logs() as logs:
                promoted = await eu.PromoteVersion(svc.PromoteVersionRequest(
                    name=stage("staging"), version=2))
                await logged(logs, "PromoteVersion")
            assert hops(logs, "PromoteVersion") == [("eu->us", "alice", "", "OK"),
                                                    ("primary<-eu", "alice", "", "OK")]
            us = env.model_stub(env.us[1])
            got = await us.GetStage(svc.GetStageRequest(name=stage("staging")))
            assert got.stage.etag == promoted.stage.etag and got.stage.version == 2


class TestPrimaryUnavailable:
    async def test_mutations_fail_fast_while_reads_and_watches_go_on(self, regions):
        """With every primary server stopped, a mutation through eu fails UNAVAILABLE
        (PRIMARY_UNAVAILABLE, naming the primary) well inside a long deadline, writing
        nothing; reads and an open watch stream, bookmarks included, go on; when the primary
        is back, mutations through eu commit again.
        """
        eu = regions.model_stub(regions.eu)
        await make_model(eu, versions=2)
        await eu.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=1))
        channel = grpc.aio.insecure_channel(regions.eu.target)
        regions.channels.append(channel)
        stream = watch_service_pb2_grpc.WatchServiceStub(channel).WatchStages(
            ws.WatchStagesRequest(models=[MODEL]))
        opening = await stream.read()
        assert opening.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT
        listen = regions.us[0].target
        await regions.us[0].stop()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await eu.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=2),
                                    timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # not DEADLINE_EXCEEDED
        reason, metadata, _ = error_info(err.value)
        assert reason == "PRIMARY_UNAVAILABLE"
        assert metadata == {"primary": "us", "servers": listen}
        assert "primary region us is unreachable" in (err.value.details() or "")

        got = await eu.GetStage(svc.GetStageRequest(name=stage("staging")))
        assert got.stage.version == 1
        bookmark = await asyncio.wait_for(stream.read(), 30)
        assert bookmark.type == ws.WATCH_MESSAGE_TYPE_BOOKMARK
        assert bookmark.revision >= opening.revision

        await regions.start_primary(listen)
        promoted = None
        for _ in range(200):  # gRPC reconnects within about a second; bound the test only
            with contextlib.suppress(grpc.aio.AioRpcError):
                promoted = await eu.PromoteVersion(svc.PromoteVersionRequest(
                    name=stage("staging"), version=2, request_id="after-the-outage"))
                break
            await asyncio.sleep(0.05)
        assert promoted is not None and promoted.stage.version == 2
        change = await asyncio.wait_for(stream.read(), 30)
        while change.type == ws.WATCH_MESSAGE_TYPE_BOOKMARK:
            change = await asyncio.wait_for(stream.read(), 30)
        assert change.revision == promoted.revision
        stream.cancel()

    async def test_a_primary_that_never_answers_costs_a_connect_timeout(
        self, etcd_server, etcd_prefix, tmp_path
    ):
        """A primary address that accepts connections but never speaks gRPC (a hung process)
        fails a mutation through eu with PRIMARY_UNAVAILABLE after the connect timeout, not
        the caller's long deadline.
        """
        accepted: list[asyncio.StreamWriter] = []

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # read nothing, answer nothing

        silent = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        try:
            async with deployment(etcd_server.endpoint, etcd_prefix, tmp_path,
                                  dead_primary_addresses=[f"127.0.0.1:{port}"],
                                  primary_servers=0,
                                  eu={"forward_connect_timeout": 0.3}) as env:
                eu = env.model_stub(env.eu)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await eu.CreateModel(svc.CreateModelRequest(model_id=MODEL), timeout=60)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_info(err.value)[0] == "PRIMARY_UNAVAILABLE"
                assert accepted, "the forwarder never tried the hung address"
        finally:
            for writer in accepted:
                writer.close()
            silent.close()
            await silent.wait_closed()

    async def test_a_hung_primary_costs_at_most_the_forward_timeout(
        self, own_etcd, etcd_prefix, tmp_path
    ):
        """A primary whose etcd froze (SIGSTOP) holds a forwarded mutation; eu gives up after
        its forward timeout, well inside the caller's long deadline, with DEADLINE_EXCEEDED:
        the primary may still apply it, so the caller is not told UNAVAILABLE.
        """
        async with deployment(own_etcd.endpoint, etcd_prefix, tmp_path,
                              eu={"forward_timeout": 1.0}) as env:
            for server in env.us:
                assert server.app.config.etcd_timeout >= 1.0
            eu = env.model_stub(env.eu)
            await eu.CreateModel(svc.CreateModelRequest(model_id=MODEL))  # connected
            os.kill(own_etcd.pid, signal.SIGSTOP)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await eu.UpdateModel(svc.UpdateModelRequest(
                        model=res.RegisteredModel(name=PARENT, description="frozen"),
                        update_mask=field_mask_pb2.FieldMask(paths=["description"])),
                        timeout=60)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # Once the primary's own etcd call has timed out, its store fails fast: the
                # next mutation through eu is refused UNAVAILABLE, inside a deadline shorter
                # than the primary's etcd timeout, with the primary's answer passed on.
                refused = await _until_refused(lambda: eu.UpdateModel(svc.UpdateModelRequest(
                    model=res.RegisteredModel(name=PARENT, description="frozen"),
                    update_mask=field_mask_pb2.FieldMask(paths=["description"])),
                    timeout=0.9))
                assert refused.code() == grpc.StatusCode.UNAVAILABLE
                reason, metadata, _ = error_info(refused)
                assert reason == "STORE_UNAVAILABLE"
                assert "has not answered" in refused.details()
                assert metadata["endpoint"] == own_etcd.endpoint
            finally:
                os.kill(own_etcd.pid, signal.SIGCONT)
            # etcd answers again: so does the primary, through eu. (The first update may have
            # been applied when etcd woke: it was sent, which is why it was not UNAVAILABLE.)
            await _until_ok(lambda: eu.UpdateModel(svc.UpdateModelRequest(
                model=res.RegisteredModel(name=PARENT, description="thawed"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]))))
            got = await eu.GetModel(svc.GetModelRequest(name=PARENT))
            assert got.model.description == "thawed"



async def _until_refused(call: Any, within: float = 30.0) -> grpc.aio.AioRpcError:
    """The first error of ``call`` other than DEADLINE_EXCEEDED, retried for ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return err
            if asyncio.get_running_loop().time() > deadline:
                raise
            continue
        raise AssertionError("the call succeeded against a frozen primary")


async def _until_ok(call: Any, within: float = 30.0) -> Any:
    """The answer of ``call`` once it stops failing UNAVAILABLE, retried for ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or (
                    asyncio.get_running_loop().time() > deadline):
                raise
            await asyncio.sleep(0.1)
