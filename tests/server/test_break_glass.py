"""Break glass over real regions: a region pins a stage with the primary down, serves the pinned
version loudly (reads, watch streams, the watcher SDK) while other regions do not, reports the
pin and its clearing to the primary once it is back, and refuses bad requests writing nothing.

``us`` (the primary) and ``eu`` (its own etcd, a real replicator, a regional server) as in
``rollout_env``. "The primary down" is its servers stopped and eu's replicator stopped (eu
reaches nothing of the primary: mutations there fail PRIMARY_UNAVAILABLE); "back" is both
started again on the same addresses. Tests wait on what they check (a bound, never a timing).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest

from modelreg.client.watcher import AsyncModelWatcher, Backoff
from modelreg.server.embedded_etcd import EmbeddedEtcd
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc, region_service_pb2_grpc, watch_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import region_service_pb2 as rgs
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws
from tests.helpers import MODEL, PARENT, Toy, error_info, load_toy, register, stage
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)
from tests.server.rollout_env import (
    Regions,
    eu_etcd,  # noqa: F401 (a fixture)
    regions,
    until,
)

PRODUCTION = stage("production")
ACTOR = (("x-modelreg-actor", "oncall"),)
PIN = res.AUDIT_ACTION_BREAK_GLASS_PIN
UNPIN = res.AUDIT_ACTION_BREAK_GLASS_UNPIN


@pytest.fixture
async def env(etcd_server: EmbeddedEtcd, eu_etcd: EmbeddedEtcd, etcd_prefix: str,
              tmp_path: Path) -> AsyncIterator[Regions]:
    """Us and eu running; production at v2 (v1 before it), applied in eu."""
    async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path,
                       coordinator="off", bookmark_interval=0.2) as e:
        us = e.models()
        await us.CreateModel(svc.CreateModelRequest(model_id=MODEL))
        for n in (1, 2, 3):
            await register(us, tmp_path, n)
        for n in (1, 2):
            await us.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"), version=n))
            last = await us.PromoteVersion(svc.PromoteVersionRequest(name=PRODUCTION, version=n))
        await applied_in_eu(e, last.revision)
        yield e


async def applied_in_eu(env: Regions, revision: int) -> None:
    """Waits until eu has applied ``revision``."""
    assert env.eu is not None
    await env.models(env.eu).GetStage(svc.GetStageRequest(name=PRODUCTION), metadata=(
        ("x-modelreg-actor", "t"), ("x-modelreg-min-revision", str(revision))), timeout=30)


def region_stub(env: Regions, target: str) -> region_service_pb2_grpc.RegionServiceStub:
    return region_service_pb2_grpc.RegionServiceStub(env.channel(target))


async def primary_down(env: Regions) -> str:
    """Stops the us server and eu's replicator; the us server's address."""
    listen = env.us[0].target
    await env.stop(env.us[0])
    env.us.clear()
    await env.stop_replicator()
    return listen


async def primary_back(env: Regions, listen: str) -> None:
    await env.start_replicator()
    await env.start_us(listen)


async def audit(stub: Any) -> list[res.AuditEvent]:
    resp = await stub.ListAuditEvents(svc.ListAuditEventsRequest(parent=PARENT))
    return list(resp.audit_events)


def break_glass(events: list[res.AuditEvent]) -> list[res.AuditEvent]:
    return [e for e in events if e.action in (PIN, UNPIN)]


async def next_message(stream: Any, kind: int) -> ws.WatchStagesResponse:
    async with asyncio.timeout(30):
        async for message in stream:
            if message.type == kind:
                return message  # type: ignore[no-any-return]
    raise AssertionError("the stream ended")


async def local_keys(eu_etcd: EmbeddedEtcd, prefix: str) -> list[bytes]:
    """The break-glass keys in eu's etcd."""
    async with aetcd.Client(eu_etcd.host, eu_etcd.client_port, timeout=10) as client:
        found = []
        for family in (b"pins/", b"localaudit/"):
            found += [bytes(kv.key) for kv in await client.get_prefix(prefix.encode() + family)]
        return found


class TestPinWithThePrimaryDown:
    async def test_pin_serves_reports_and_unpins(self, env: Regions, tmp_path: Path) -> None:
        """With the primary down, eu pins production to v1: eu's reads, watch stream and
        watcher serve v1 loudly; the pin is in eu's audit log. When the primary returns the
        event reaches its audit log (and eu's, once) with actor, time and region, while the pin
        stays in force even over a new promotion; unpinning makes eu follow the primary again,
        and that is reported too. us never sees the pin.
        """
        assert env.eu is not None
        eu, eu_regions = env.models(env.eu), region_stub(env, env.eu.target)
        watch = watch_service_pb2_grpc.WatchServiceStub(env.channel(env.eu.target))
        stream = watch.WatchStages(ws.WatchStagesRequest(models=[MODEL], stages=["production"]),
                                   metadata=ACTOR)
        seen: list[int] = []
        watcher: AsyncModelWatcher[Toy] = AsyncModelWatcher(
            MODEL, "production", load_toy, target=env.eu.target, node_id="eu-node",
            region="eu", cache_dir=tmp_path / "cache", reconnect_backoff=Backoff(0.05, 0.2),
            on_swap=lambda new, old: seen.append(new.version))
        try:
            async with watcher:
                await watcher.wait_for_version(2, timeout=30)
                opening = await next_message(stream, ws.WATCH_MESSAGE_TYPE_SNAPSHOT)
                assert [p.version for p in opening.snapshot] == [2]
                listen = await primary_down(env)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await eu.RollbackStage(svc.RollbackStageRequest(name=PRODUCTION))
                assert error_info(refused.value)[0] == "PRIMARY_UNAVAILABLE"

                pinned = await eu_regions.PinStage(rgs.PinStageRequest(
                    name=PRODUCTION, region="regions/eu", reason="v2 corrupts scores"),
                    metadata=ACTOR, timeout=10)
                assert (pinned.stage.version, pinned.stage.local_pin.overridden_version) == (1, 2)
                assert pinned.stage.local_pin.region == "regions/eu"
                assert pinned.audit_event.action == PIN and not pinned.audit_event.HasField(
                    "report_time")
                change = await next_message(stream, ws.WATCH_MESSAGE_TYPE_CHANGES)
                assert change.local_change and change.revision == opening.revision
                assert [(c.stage.version, c.from_version) for c in change.changes] == [(1, 2)]
                assert change.changes[0].stage.local_pin.reason == "v2 corrupts scores"
                await watcher.wait_for_version(1, timeout=30)  # no primary needed
                assert seen[-1] == 1
                read = await eu.GetStage(svc.GetStageRequest(name=PRODUCTION))
                assert (read.stage.version, read.stage.local_pin.primary_version) == (1, 2)
                listed = await eu.ListStages(svc.ListStagesRequest(parent=PARENT))
                assert [p.version for p in listed.stages if p.HasField("local_pin")] == [1]
                fleet = fleet_service_pb2_grpc.FleetServiceStub(env.channel(env.eu.target))

                async def eu_fleet_on_the_pin() -> fs.GetRolloutStatusResponse | None:
                    got = await fleet.GetRolloutStatus(fs.GetRolloutStatusRequest(
                        name=PRODUCTION), metadata=ACTOR, timeout=10)
                    return got if [c.version for c in got.serving] == [1] else None
                status = await until(eu_fleet_on_the_pin, "eu's node reporting v1")
                assert status.stage.version == 1 and "PINNED here" in status.summary
                local = break_glass(await audit(eu))
                assert [(e.action, e.actor, e.region, e.from_value, e.to_value)
                        for e in local] == [(PIN, "oncall", "regions/eu", "2", "1")]

                await primary_back(env, listen)
                us = env.models()

                async def reported() -> list[res.AuditEvent]:
                    return break_glass(await audit(us))
                on_primary = (await until(reported, "the pin reported to the primary"))[0]
                assert (on_primary.name, on_primary.actor, on_primary.region) == (
                    pinned.audit_event.name, "oncall", "regions/eu")
                assert on_primary.time == pinned.audit_event.time
                assert on_primary.HasField("report_time") and on_primary.reason == (
                    "v2 corrupts scores")

                async def marked() -> bool:
                    stage_now = (await eu.GetStage(svc.GetStageRequest(name=PRODUCTION))).stage
                    return stage_now.local_pin.reported
                await until(marked, "the pin marked reported in eu")
                assert [e.name for e in break_glass(await audit(eu))] == [on_primary.name]
                primary_view = (await us.GetStage(svc.GetStageRequest(name=PRODUCTION))).stage
                assert primary_view.version == 2 and not primary_view.HasField("local_pin")

                await us.PromoteVersion(svc.PromoteVersionRequest(name=stage("staging"),
                                                                  version=3))
                moved = await us.PromoteVersion(svc.PromoteVersionRequest(name=PRODUCTION,
                                                                          version=3))
                await applied_in_eu(env, moved.revision)
                read = await eu.GetStage(svc.GetStageRequest(name=PRODUCTION))
                assert (read.stage.version, read.stage.local_pin.primary_version) == (1, 3)
                assert watcher.current is not None and watcher.current.version == 1

                cleared = await eu_regions.UnpinStage(rgs.UnpinStageRequest(
                    name=PRODUCTION, region="regions/eu", reason="v3 fixes it"),
                    metadata=ACTOR, timeout=10)
                assert (cleared.stage.version, cleared.cleared_pin.version) == (3, 1)
                await watcher.wait_for_version(3, timeout=30)
                async with asyncio.timeout(30):
                    while True:
                        change = await next_message(stream, ws.WATCH_MESSAGE_TYPE_CHANGES)
                        if change.local_change and not change.changes[0].stage.HasField(
                                "local_pin"):
                            break  # (earlier: v3's move, the pin's reported mark)
                assert [(c.stage.version, c.stage.HasField("local_pin"))
                        for c in change.changes] == [(3, False)]

                async def both() -> list[res.AuditEvent] | None:
                    events = break_glass(await audit(us))
                    return events if len(events) == 2 else None
                events = await until(both, "the unpin reported to the primary")
                assert [(e.action, e.from_value, e.to_value, e.region) for e in events] == [
                    (UNPIN, "1", "3", "regions/eu"), (PIN, "2", "1", "regions/eu")]
        finally:
            stream.cancel()


class TestRefusals:
    async def test_bad_requests_write_nothing(self, env: Regions,
                                              eu_etcd: EmbeddedEtcd) -> None:
        """No reason, no region, another region, an unknown one, a version that is no former
        version of the stage, a pin asked of the primary's server and an unpin of a stage not
        pinned are each refused with their reason; eu's etcd holds no break-glass key after.
        """
        assert env.eu is not None
        eu, us = region_stub(env, env.eu.target), region_stub(env, env.us[0].target)
        ok = {"name": PRODUCTION, "region": "regions/eu", "reason": "bad"}
        cases: list[tuple[Any, Any, grpc.StatusCode, str]] = [
            (eu.PinStage, rgs.PinStageRequest(**{**ok, "reason": " "}),
             grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            (eu.PinStage, rgs.PinStageRequest(**{**ok, "region": ""}),
             grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            (eu.PinStage, rgs.PinStageRequest(**{**ok, "region": "regions/us"}),
             grpc.StatusCode.FAILED_PRECONDITION, "NOT_THIS_REGION"),
            (eu.PinStage, rgs.PinStageRequest(**{**ok, "region": "regions/ap"}),
             grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
            (eu.PinStage, rgs.PinStageRequest(**ok, to_version=3),
             grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_ROLLBACK_CANDIDATE"),
            (eu.PinStage, rgs.PinStageRequest(**{**ok, "name": stage("canary")}),
             grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            (us.PinStage, rgs.PinStageRequest(**{**ok, "region": "regions/us"}),
             grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_REGIONAL_SERVER"),
            (eu.UnpinStage, rgs.UnpinStageRequest(**ok),
             grpc.StatusCode.FAILED_PRECONDITION, "STAGE_NOT_PINNED"),
        ]
        for call, request, code, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(request, metadata=ACTOR, timeout=10)
            assert (err.value.code(), error_info(err.value)[0]) == (code, reason), request
        assert await local_keys(eu_etcd, env.prefix) == []

    async def test_a_retried_pin_is_applied_once(self, env: Regions) -> None:
        """The same request_id sent twice pins once: the second answer is the first pin, not
        a second move to an older version.
        """
        assert env.eu is not None
        eu = region_stub(env, env.eu.target)
        request = rgs.PinStageRequest(name=PRODUCTION, region="regions/eu", reason="r",
                                      request_id="pin-1")
        first = await eu.PinStage(request, metadata=ACTOR, timeout=10)
        again = await eu.PinStage(request, metadata=ACTOR, timeout=10)
        assert first.stage.version == again.stage.version == 1
        assert first.audit_event.name == again.audit_event.name
        assert len(break_glass(await audit(env.models(env.eu)))) == 1


class TestWatchContract:
    async def test_a_stream_resumed_across_a_pin_opens_with_a_reset_snapshot(
        self, env: Regions
    ) -> None:
        """A stream that saw revision R, then went away while eu pinned the stage, resumes
        from R + 1 with a snapshot flagged reset showing the pin (a replay of the primary's
        changes could not); a stream selecting another stage resumes as usual.
        """
        assert env.eu is not None
        watch = watch_service_pb2_grpc.WatchServiceStub(env.channel(env.eu.target))
        first = watch.WatchStages(ws.WatchStagesRequest(models=[MODEL]), metadata=ACTOR)
        try:
            opening = await next_message(first, ws.WATCH_MESSAGE_TYPE_SNAPSHOT)
        finally:
            first.cancel()
        await region_stub(env, env.eu.target).PinStage(rgs.PinStageRequest(
            name=PRODUCTION, region="regions/eu", reason="r"), metadata=ACTOR, timeout=10)
        resumed = watch.WatchStages(ws.WatchStagesRequest(
            models=[MODEL], start_revision=opening.revision + 1), metadata=ACTOR)
        other = watch.WatchStages(ws.WatchStagesRequest(
            models=[MODEL], stages=["staging"], start_revision=opening.revision + 1),
            metadata=ACTOR)
        try:
            async with asyncio.timeout(30):
                message = await anext(aiter(resumed))
            assert message.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT and message.reset
            assert {p.name: p.version for p in message.snapshot}[PRODUCTION] == 1
            async with asyncio.timeout(30):
                message = await anext(aiter(other))
            assert message.type == ws.WATCH_MESSAGE_TYPE_BOOKMARK
        finally:
            resumed.cancel()
            other.cancel()


class TestPinAgain:
    async def test_a_second_pin_starts_from_the_pinned_version(self, env: Regions) -> None:
        """Pinning a pinned stage again moves on from the pinned version: production (v2, v1
        before it) pinned to v1 has no older candidate, so a second pin is refused
        NO_ROLLBACK_CANDIDATE and the first stays in force.
        """
        assert env.eu is not None
        eu = region_stub(env, env.eu.target)
        request = rgs.PinStageRequest(name=PRODUCTION, region="regions/eu", reason="r")
        await eu.PinStage(request, metadata=ACTOR, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await eu.PinStage(request, metadata=ACTOR, timeout=10)
        assert error_info(err.value)[0] == "NO_ROLLBACK_CANDIDATE"
        read = await env.models(env.eu).GetStage(svc.GetStageRequest(name=PRODUCTION))
        assert (read.stage.version, read.stage.local_pin.overridden_version) == (1, 2)
