"""The rollout guard over real regions (issue 9, item 8): after a committed promotion, nodes
report health figures; a region whose fleet breaches the guard's thresholds for its breach
duration makes the coordinator roll the stage back in every region, with the evidence in the
rollout record and the audit trail. Below the thresholds, for less than the breach duration, or
after the bake window, nothing happens. The wire: GetRegionHealth, and guards validated.

``us`` (the primary, whose servers run coordinators) and ``eu`` (its own etcd, a real
replicator, a regional server) as in ``rollout_env``; serving nodes are ``ReportNode`` calls
through each region's server. Tests wait on records and on what the coordinator has looked at
(bounds, never timings).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from modelreg.server.rollout_guard import BakingGuards
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, ActorStub, RunningServer, error_info, start_server
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)
from tests.server.forward_env import address
from tests.server.rollout_env import (
    STAGE,
    Regions,
    eu_etcd,  # noqa: F401 (a fixture)
    regions,
    until,
)

COMMITTED = res.ROLLOUT_STATE_COMMITTED
COORDINATOR = "modelreg-coordinator"
BAD = {"error_rate": 0.3}
GOOD = {"error_rate": 0.01}


def seconds(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(n * 1e9))
    return d


def guard(*, bake: float = 60, breach: float = 0.3, **fields: Any) -> res.RolloutGuard:
    """error_rate at most 0.05, watched ``bake`` s after the switch, ``breach`` s to fire."""
    return res.RolloutGuard(max_values={"error_rate": 0.05}, bake_window=seconds(bake),
                            breach_duration=seconds(breach), **fields)


async def nodes(env: Regions, *, us: bool = True, eu: bool = True, **served: Any) -> None:
    """us-1 and us-2 report through the front us server, eu-1 through eu's."""
    us_server = env.front or next(s for s in env.us if s in env.started)
    if us:
        for node in ("us-1", "us-2"):
            await env.report(us_server, node, "us", **served)
    if eu:
        assert env.eu is not None
        await env.report(env.eu, "eu-1", "eu", **served)


async def serving_v2(env: Regions, the_guard: res.RolloutGuard) -> str:
    """Staging governed by ``the_guard``: v1 rolled out and served by every node, then v2 rolled
    out and committed, every node serving v2 (no figures yet). The v2 rollout's name.
    """
    await env.governed_model(guard=the_guard)
    await nodes(env)
    first = await env.promote(1)
    await nodes(env, prepared_version=1, rollout=first)
    assert (await env.settled(first)).state == COMMITTED
    await nodes(env, serving_version=1, prepared_version=1)
    second = await env.promote(2)
    await nodes(env, serving_version=1, prepared_version=2, rollout=second)
    done = await env.settled(second)
    assert done.state == COMMITTED, done.abort_reason
    await nodes(env, serving_version=2, prepared_version=2)
    return second


def guards_of(server: RunningServer) -> BakingGuards:
    coordinator = server.app.coordinator
    assert coordinator is not None and coordinator.guards is not None
    return coordinator.guards


async def leader_guards(env: Regions) -> BakingGuards:
    (leader,) = await until(env.leaders, "a leader")
    return guards_of(leader)


async def watched(env: Regions, name: str) -> BakingGuards:
    """Waits until the leader's guard watches ``name``; the leader's guards."""
    guards = await leader_guards(env)
    await until(lambda: name in guards.watching(), f"the guard watching {name}")
    return guards


async def looks_more(guards: BakingGuards, name: str, more: int) -> None:
    """Waits until the guard has looked at the regions ``more`` times more than now."""
    target = guards.looks[name] + more
    await until(lambda: guards.looks[name] >= target, f"{more} more looks at {name}")


def fired(server: RunningServer, outcome: str = "rolled_back") -> float:
    value = server.app.metrics.registry.get_sample_value(
        "modelreg_rollout_guard_fired_total", {"outcome": outcome})
    return value or 0.0


async def coordinator_events(env: Regions) -> list[res.AuditEvent]:
    resp = await env.models().ListAuditEvents(svc.ListAuditEventsRequest(
        parent=f"models/{MODEL}", actor=COORDINATOR))
    return list(resp.audit_events)


async def eu_pointer(env: Regions) -> res.StagePointer:
    assert env.eu is not None
    return (await env.models(env.eu).GetStage(svc.GetStageRequest(name=STAGE))).stage


class TestFires:
    async def test_a_breach_in_one_region_rolls_back_every_region(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """Eu's node reports an error rate above the threshold after the commit (us's nodes are
        fine): the coordinator rolls staging back to v1 in us and eu (one emergency rollback,
        activation on receipt); the rollout records the verdict (eu named, observed and
        allowed values, the rollback) and the audit trail has the ROLLBACK by the coordinator
        with that evidence as its reason. It fires once.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            name = await serving_v2(env, guard())
            guards = await watched(env, name)
            await nodes(env, eu=False, serving_version=2, prepared_version=2, health=GOOD)
            await nodes(env, us=False, serving_version=2, prepared_version=2, health=BAD)

            async def verdict() -> res.Rollout | None:
                r = await env.rollout(name)
                return r if r.HasField("guard") else None
            done = await until(verdict, "the guard's verdict")
            evidence = done.guard.evidence
            assert evidence.startswith(f"rollout guard of {name} (v2): region eu breached for ")
            assert "error_rate 0.3 > max 0.05 on 1 of 1 live nodes (worst nodes/eu-1)" in evidence
            assert done.guard.rollback and not done.guard.error
            assert [h.region for h in done.guard.health] == ["eu", "us"]
            assert done.guard.health[0].breached and not done.guard.health[1].breached
            assert done.state == COMMITTED and done.commit_revision > 0

            pointer = await env.pointer()
            assert (pointer.version, pointer.rollout) == (1, done.guard.rollback)
            assert pointer.activation_time == pointer.update_time  # on receipt
            assert (await until(lambda: _eu_at(env, 1), "eu back on v1")).rollout == (
                done.guard.rollback)
            back = await env.rollout(done.guard.rollback)
            assert (back.kind, back.state, back.actor, back.reason) == (
                res.ROLLOUT_KIND_ROLLBACK, COMMITTED, COORDINATOR, evidence)
            assert list(back.regions) == ["us", "eu"]
            events = await coordinator_events(env)
            assert (events[0].action, events[0].rollout) == (
                res.AUDIT_ACTION_ROLLBACK, done.guard.rollback)
            assert (events[0].reason, events[0].from_value, events[0].to_value) == (
                evidence, "2", "1")
            (leader,) = env.leaders()
            await until(lambda: fired(leader) == 1, "the metric")
            assert name not in guards.watching()
            assert [e.action for e in events].count(res.AUDIT_ACTION_ROLLBACK) == 1

    async def test_a_coordinator_started_while_a_rollout_bakes_takes_over(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """A second us server starts after the commit (nothing is preparing, so only the baking
        guarded rollout can make it campaign); the leader stops; the newcomer leads, finds the
        rollout in etcd and rolls back when the nodes breach.
        """
        late = address()
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path,
                           extra_us=(late,)) as env:
            name = await serving_v2(env, guard())
            await watched(env, name)
            (leader,) = env.leaders()
            newcomer = await env.start_us(late)
            env.front = newcomer.target
            await env.stop(leader)
            successor = await watched(env, name)
            assert env.leaders() == [newcomer] and guards_of(newcomer) is successor
            await nodes(env, serving_version=2, prepared_version=2, health=BAD)

            async def rolled_back() -> bool:
                return (await env.pointer()).version == 1
            await until(rolled_back, "the newcomer's rollback")
            await until(lambda: fired(newcomer) == 1, "the metric")
            assert (await env.rollout(name)).guard.rollback


class TestHoldsBack:
    async def test_below_the_threshold_nothing_happens(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """Every node reports an error rate below the maximum: the guard looks again and again
        and never fires; v2 stays, no verdict, no coordinator rollback.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            name = await serving_v2(env, guard(breach=0))
            guards = await watched(env, name)
            await nodes(env, serving_version=2, prepared_version=2, health=GOOD)
            await looks_more(guards, name, 20)
            assert guards.breaching(name) == {}
            assert not (await env.rollout(name)).HasField("guard")
            assert (await env.pointer()).version == 2
            events = await coordinator_events(env)
            assert res.AUDIT_ACTION_ROLLBACK not in [e.action for e in events]

    async def test_a_breach_shorter_than_the_breach_duration_does_not_fire(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """Eu breaches, then recovers before the breach duration (30 s) is up: the streak ends
        with nothing done; a new breach starts a new streak, from its own start.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            name = await serving_v2(env, guard(breach=30))
            guards = await watched(env, name)
            await nodes(env, us=False, serving_version=2, prepared_version=2, health=BAD)
            first = await until(lambda: guards.breaching(name).get("eu"), "eu's breach seen")
            await nodes(env, us=False, serving_version=2, prepared_version=2, health=GOOD)
            await until(lambda: "eu" not in guards.breaching(name), "eu's recovery seen")
            assert not (await env.rollout(name)).HasField("guard")
            assert (await env.pointer()).version == 2
            await nodes(env, us=False, serving_version=2, prepared_version=2, health=BAD)
            second = await until(lambda: guards.breaching(name).get("eu"), "eu's new breach")
            assert second > first
            assert not (await env.rollout(name)).HasField("guard")
            assert (await env.pointer()).version == 2

    async def test_after_the_bake_window_nothing_happens(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """With a 2 s bake window the guard stops watching once it is over; nodes that breach
        afterwards change nothing, and a fresh read of the baking rollouts leaves it out.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            name = await serving_v2(env, guard(bake=2, breach=0))
            guards = await watched(env, name)
            await nodes(env, serving_version=2, prepared_version=2, health=GOOD)
            await until(lambda: name not in guards.watching(), "the bake window over")
            looks = guards.looks[name]
            await nodes(env, serving_version=2, prepared_version=2, health=BAD)
            reads = guards.reads
            await until(lambda: guards.reads > reads, "a fresh read of the baking rollouts")
            assert name not in guards.watching() and guards.looks[name] == looks
            assert not (await env.rollout(name)).HasField("guard")
            assert (await env.pointer()).version == 2


async def _eu_at(env: Regions, version: int) -> res.StagePointer | None:
    pointer = await eu_pointer(env)
    return pointer if pointer.version == version else None


class TestWire:
    async def test_region_health_from_reported_nodes(self, etcd_server, etcd_prefix):
        """GetRegionHealth counts live nodes on the version: per figure, the reporting and
        breaching nodes and the worst value; the region breaches at the node fraction.
        """
        server = await start_server(etcd_server.endpoint, etcd_prefix)
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
                for node_id, version, rate in (("a", 2, 0.3), ("b", 2, 0.01), ("c", 1, 0.9),
                                               ("d", 2, None)):
                    health = {} if rate is None else {"error_rate": rate}
                    await fleet.ReportNode(fs.ReportNodeRequest(ttl_seconds=15, node=fs.Node(
                        node_id=node_id, stages=[fs.ServedStage(
                            stage=STAGE, serving_version=version, health=health)])))
                request = fs.GetRegionHealthRequest(name=STAGE, version=2, guard=guard())
                got = (await fleet.GetRegionHealth(request, timeout=10)).health
                assert (got.region, got.live_nodes, got.breached) == ("default", 3, False)
                (figure,) = got.figures
                assert (figure.figure, figure.reporting_nodes, figure.breaching_nodes) == (
                    "error_rate", 2, 1)
                assert (figure.worst_value, figure.worst_node) == (0.3, "nodes/a")
                request.guard.node_fraction = 0.3
                got = (await fleet.GetRegionHealth(request, timeout=10)).health
                assert got.breached and got.figures[0].breached
        finally:
            await server.stop()

    @pytest.mark.parametrize(("request_", "field"), [
        (fs.GetRegionHealthRequest(name=STAGE, version=0, guard=guard()), "version"),
        (fs.GetRegionHealthRequest(name=STAGE, version=2), "guard.max_values"),
        (fs.GetRegionHealthRequest(name=STAGE, version=2, guard=guard(node_fraction=2)),
         "guard.node_fraction"),
        (fs.GetRegionHealthRequest(name="models/x", version=2, guard=guard()), "name"),
    ])
    async def test_bad_health_requests(self, etcd_server, etcd_prefix, request_, field):
        server = await start_server(etcd_server.endpoint, etcd_prefix)
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                fleet = fleet_service_pb2_grpc.FleetServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await fleet.GetRegionHealth(request_, timeout=10)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(exc.value)[2] == [field]
        finally:
            await server.stop()

    async def test_bad_guards_are_refused_with_their_path(self, etcd_server, etcd_prefix):
        """UpdateModel with an unsound guard: INVALID_ARGUMENT naming every bad part."""
        server = await start_server(etcd_server.endpoint, etcd_prefix)
        try:
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = ActorStub(channel, "alice")
                await stub.CreateModel(svc.CreateModelRequest(model_id=MODEL))
                bad = res.RolloutGuard(max_values={"Error Rate": 0.05, "p99": float("nan")},
                                       bake_window=seconds(0.5), node_fraction=-1)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.UpdateModel(svc.UpdateModelRequest(
                        model=res.RegisteredModel(name=f"models/{MODEL}", rollout_policies={
                            "production": res.RolloutPolicy(guard=bad)}),
                        update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"])))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            at = 'model.rollout_policies["production"].guard.'
            assert sorted(error_info(exc.value)[2]) == sorted([
                at + 'max_values["Error Rate"]', at + 'max_values["p99"]', at + "bake_window",
                at + "node_fraction"])
        finally:
            await server.stop()
