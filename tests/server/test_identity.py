"""The identity seam: every modelreg RPC, unary or streaming, is authenticated and authorised in
the one interceptor before its handler runs, and the principal it proved is the audit's actor.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import AsyncIterator

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import modelreg.v1
from modelreg.server.api.grpc import unguarded_methods
from modelreg.server.api.identity import HeaderAuthenticator
from modelreg.server.domain.errors import PermissionDeniedError, UnauthenticatedError
from modelreg.server.domain.identity import PERMISSIONS, Caller, Permission, Principal
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import watch_service_pb2 as ws
from modelreg.v1 import watch_service_pb2_grpc
from tests.helpers import (
    MODEL,
    PARENT,
    ActorStub,
    RunningServer,
    error_info,
    make_model,
    stage,
    start_server,
)


class Refusing:
    """Today's header identity, except that one principal is refused."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.seen: list[str] = []

    async def authenticate(self, caller: Caller) -> Principal:
        principal = await HeaderAuthenticator().authenticate(caller)
        self.seen.append(principal.name)
        if principal.name == self.refused:
            raise UnauthenticatedError(f"{principal.name} has no valid credentials")
        return principal


class Denying:
    """Allows everyone everything but one permission to one principal; records each question."""

    def __init__(self, principal: str, permission: Permission) -> None:
        self.denied = (principal, permission)
        self.asked: list[tuple[str, str, Permission]] = []

    async def authorize(self, principal: Principal, method: str, permission: Permission) -> None:
        self.asked.append((principal.name, method, permission))
        if (principal.name, permission) == self.denied:
            raise PermissionDeniedError(principal.name, method, permission)


async def _keys(etcd: EmbeddedEtcd, prefix: str) -> dict[bytes, int]:
    """Every key under ``prefix`` with its mod_revision: what "nothing written" compares."""
    async with aetcd.Client(etcd.host, etcd.client_port, timeout=10) as client:
        return {kv.key: kv.mod_revision for kv in await client.get_prefix(prefix.encode())}


@pytest.fixture
async def guarded(etcd_server: EmbeddedEtcd, etcd_prefix: str) -> AsyncIterator[RunningServer]:
    """A server whose authenticator refuses ``mallory`` (and takes everyone else at their word)."""
    running = await start_server(etcd_server.endpoint, etcd_prefix,
                                 authenticator=Refusing("mallory"))
    try:
        yield running
    finally:
        await running.stop()


async def _first_watch_message(channel: grpc.aio.Channel, actor: str) -> ws.WatchStagesResponse:
    call = watch_service_pb2_grpc.WatchServiceStub(channel).WatchStages(
        ws.WatchStagesRequest(models=[MODEL]), metadata=(("x-modelreg-actor", actor),),
        timeout=10)
    try:
        message: ws.WatchStagesResponse = await call.read()
        return message
    finally:
        call.cancel()


class TestAuthentication:
    async def test_refused_caller_gets_unauthenticated_on_unary_and_stream_with_nothing_written(
        self, guarded: RunningServer, etcd_server: EmbeddedEtcd, etcd_prefix: str
    ) -> None:
        """A principal the authenticator refuses gets UNAUTHENTICATED on PromoteVersion and on
        WatchStages, and etcd is unchanged; everyone else is served as before.
        """
        async with grpc.aio.insecure_channel(guarded.target) as channel:
            await make_model(ActorStub(channel, "alice"), versions=1)
            before = await _keys(etcd_server, etcd_prefix)

            mallory = ActorStub(channel, "mallory")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await mallory.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                      version=1))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(caught.value)[0] == "UNAUTHENTICATED"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _first_watch_message(channel, "mallory")
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(caught.value)[0] == "UNAUTHENTICATED"
            assert await _keys(etcd_server, etcd_prefix) == before

            opening = await _first_watch_message(channel, "alice")
            assert opening.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT
        assert guarded.app._authenticator.seen.count("mallory") == 2  # type: ignore[attr-defined]

    async def test_bad_actor_header_on_a_stream_and_a_read_is_invalid_argument(
        self, server: RunningServer
    ) -> None:
        """A malformed x-modelreg-actor is INVALID_ARGUMENT naming the header on every RPC,
        reads and streams included, as it always was on mutations.
        """
        bad = "x" * 300
        async with grpc.aio.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _first_watch_message(channel, bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(caught.value)[2] == ["x-modelreg-actor"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ActorStub(channel, bad).ListModels(svc.ListModelsRequest())
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(caught.value)[2] == ["x-modelreg-actor"]

    async def test_health_and_reflection_stay_open(
        self, guarded: RunningServer
    ) -> None:
        """Probes and tools need no identity: a refused caller still gets health and
        reflection answers.
        """
        mallory = (("x-modelreg-actor", "mallory"),)
        async with grpc.aio.insecure_channel(guarded.target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), metadata=mallory, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=mallory, timeout=10)
            async for answer in call:
                names = {s.name for s in answer.list_services_response.service}
                assert "modelreg.v1.ModelService" in names
                break

    async def test_each_call_records_its_own_principal(self, server: RunningServer) -> None:
        """Concurrent calls by different principals each write their own principal into the
        audit event: the seam's principal is per call.
        """
        async with grpc.aio.insecure_channel(server.target) as channel:
            await asyncio.gather(*(
                ActorStub(channel, f"user-{i}").CreateModel(
                    svc.CreateModelRequest(model_id=f"model-{i}"))
                for i in range(20)))
            events = await ActorStub(channel, "auditor").ListAuditEvents(
                svc.ListAuditEventsRequest())
        actors = {e.resource.removeprefix("models/"): e.actor for e in events.audit_events}
        assert actors == {f"model-{i}": f"user-{i}" for i in range(20)}


class TestAuthorization:
    async def test_denied_permission_is_permission_denied_with_nothing_written(
        self, etcd_server: EmbeddedEtcd, etcd_prefix: str
    ) -> None:
        """An authorizer that denies bob stages.promote gets asked with the RPC's permission
        from the table: bob's PromoteVersion is PERMISSION_DENIED and writes nothing, while
        his reads and alice's promotion go through.
        """
        authorizer = Denying("bob", Permission.STAGES_PROMOTE)
        running = await start_server(etcd_server.endpoint, etcd_prefix, authorizer=authorizer)
        try:
            async with grpc.aio.insecure_channel(running.target) as channel:
                await make_model(ActorStub(channel, "alice"), versions=1)
                before = await _keys(etcd_server, etcd_prefix)
                bob = ActorStub(channel, "bob")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await bob.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                      version=1))
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                reason, metadata, _ = error_info(caught.value)
                assert reason == "PERMISSION_DENIED"
                assert metadata["permission"] == "stages.promote"
                assert await _keys(etcd_server, etcd_prefix) == before
                await bob.GetModel(svc.GetModelRequest(name=PARENT))
                await _first_watch_message(channel, "bob")
                await ActorStub(channel, "alice").PromoteVersion(
                    svc.PromoteVersionRequest(name=stage("staging"), version=1))
        finally:
            await running.stop()
        assert ("bob", "/modelreg.v1.ModelService/PromoteVersion",
                Permission.STAGES_PROMOTE) in authorizer.asked
        assert ("bob", "/modelreg.v1.WatchService/WatchStages",
                Permission.STAGES_WATCH) in authorizer.asked


class TestPermissionTable:
    def test_every_rpc_of_the_api_has_a_permission(self) -> None:
        """The table names every RPC of every modelreg.v1 service, and nothing else, so the
        server (which checks the same at start) never serves an RPC without a permission.
        """
        methods = set()
        for module in pkgutil.iter_modules(modelreg.v1.__path__):
            if module.name.endswith("_pb2"):
                descriptor = importlib.import_module(f"modelreg.v1.{module.name}").DESCRIPTOR
                for service in descriptor.services_by_name.values():
                    methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
        assert methods == set(PERMISSIONS)
        assert unguarded_methods() == []
