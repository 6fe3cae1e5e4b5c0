"""Domain rules of the rollout guard (issue 9, item 8): its policy's validation, a region's
health summary, the breach streaks and the judgement, and the one transaction that rolls back
and records the verdict. Unit tests over the in-memory store; the proof against real regions
is ``tests/server/test_rollout_guard.py``.
"""

from __future__ import annotations

import math

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from modelreg.server.domain import guard as rules
from modelreg.server.domain.errors import InvalidArgumentError
from modelreg.server.domain.health import needed, region_health
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import rollout_service_pb2 as rs
from tests.domain.env import MODEL, Env, field_of
from tests.domain.fleet_env import fleet_of

PRODUCTION = f"models/{MODEL}/stages/production"
S = 1_000_000_000
COORDINATOR = "modelreg-coordinator"


def seconds(n: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(n * S))
    return d


def a_guard(**fields: object) -> res.RolloutGuard:
    fields.setdefault("max_values", {"error_rate": 0.05})
    return res.RolloutGuard(**fields)  # type: ignore[arg-type]


async def govern(env: Env, guard: res.RolloutGuard) -> res.RegisteredModel:
    model = res.RegisteredModel(name=f"models/{MODEL}", rollout_policies={
        "production": res.RolloutPolicy(guard=guard)})
    req = svc.UpdateModelRequest(model=model,
                                 update_mask=field_mask_pb2.FieldMask(paths=["rollout_policies"]))
    return (await env.reg.models.update(env.call("UpdateModel", req), req)).model


async def committed(env: Env, guard: res.RolloutGuard | None = None, *,
                    versions: int = 2) -> res.Rollout:
    """v1 in production, then a guarded rollout of v2 committed by the coordinator."""
    await env.setup(versions)
    await env.to_production(1)
    await govern(env, guard or a_guard())
    await env.promote("staging", 2)
    started = await env.promote("production", 2, reason="better auc")
    done = await env.reg.rollouts.commit(started.rollout.name, actor=COORDINATOR)
    assert done.state == res.ROLLOUT_STATE_COMMITTED
    return done


def node(node_id: str, serving: int, stage: str = PRODUCTION, **health: float) -> fs.Node:
    return fs.Node(node_id=node_id, stages=[fs.ServedStage(
        stage=stage, serving_version=serving, prepared_version=serving, health=health)])


def breached(region: str = "default", live: int = 2, worst: float = 0.3) -> res.RegionHealth:
    figure = res.FigureHealth(figure="error_rate", max_value=0.05, reporting_nodes=live,
                              breaching_nodes=live, worst_value=worst, worst_node="nodes/n1",
                              breached=True)
    return res.RegionHealth(region=region, live_nodes=live, figures=[figure], breached=True)


def healthy(region: str = "default") -> res.RegionHealth:
    return res.RegionHealth(region=region, live_nodes=2, figures=[res.FigureHealth(
        figure="error_rate", max_value=0.05, reporting_nodes=2, worst_value=0.01)])


class TestPolicy:
    @pytest.mark.parametrize(("guard", "where"), [
        (a_guard(max_values={"Error Rate": 0.05}), 'max_values["Error Rate"]'),
        (a_guard(max_values={"": 0.05}), 'max_values[""]'),
        (a_guard(max_values={"error_rate": math.nan}), 'max_values["error_rate"]'),
        (a_guard(max_values={"error_rate": math.inf}), 'max_values["error_rate"]'),
        (a_guard(max_values={f"f{i}": 1.0 for i in range(33)}), "max_values"),
        (a_guard(bake_window=seconds(0.5)), "bake_window"),
        (a_guard(bake_window=seconds(25 * 3600)), "bake_window"),
        (a_guard(bake_window=seconds(60), breach_duration=seconds(61)), "breach_duration"),
        (a_guard(breach_duration=seconds(601)), "breach_duration"),
        (a_guard(breach_duration=seconds(-1)), "breach_duration"),
        (a_guard(node_fraction=1.5), "node_fraction"),
        (a_guard(node_fraction=math.nan), "node_fraction"),
        (res.RolloutGuard(bake_window=seconds(60)), "max_values"),
    ])
    async def test_bad_guards_are_named(self, env: Env, guard: res.RolloutGuard,
                                        where: str) -> None:
        """Each unsound part of a guard is refused, naming its path in the policy."""
        await env.setup(0)
        with pytest.raises(InvalidArgumentError) as exc:
            await govern(env, guard)
        assert field_of(exc.value) == f'model.rollout_policies["production"].guard.{where}'

    async def test_a_sound_guard_is_kept(self, env: Env) -> None:
        """Figures, a bake window, a breach duration up to it and a fraction are stored as given;
        an empty guard is no guard (and valid).
        """
        await env.setup(0)
        guard = a_guard(max_values={"error_rate": 0.05, "latency.p99_ms": 250},
                        bake_window=seconds(60), breach_duration=seconds(60), node_fraction=1)
        model = await govern(env, guard)
        assert model.rollout_policies["production"].guard == guard
        model = await govern(env, res.RolloutGuard())
        assert not rules.enabled(model.rollout_policies["production"].guard)

    async def test_node_reports_with_bad_figures_are_refused(self, env: Env) -> None:
        """A node's health figures obey the same rules, named by their path in the report."""
        fleet = fleet_of(env)
        with pytest.raises(InvalidArgumentError) as exc:
            await fleet.report(fs.ReportNodeRequest(node=node("n1", 1, **{"Bad Name": 1.0})))
        assert field_of(exc.value) == 'node.stages[0].health["Bad Name"]'
        with pytest.raises(InvalidArgumentError) as exc:
            await fleet.report(fs.ReportNodeRequest(node=node("n1", 1, error_rate=math.nan)))
        assert field_of(exc.value) == 'node.stages[0].health["error_rate"]'


class TestHealth:
    def test_only_nodes_on_the_version_count(self) -> None:
        """Nodes on another version or another stage say nothing about the version's health."""
        guard = a_guard()
        found = region_health("eu", PRODUCTION, 2, guard, [
            node("a", 2, error_rate=0.3), node("b", 1, error_rate=0.9),
            node("c", 2, stage=f"models/{MODEL}/stages/staging", error_rate=0.9)])
        assert (found.region, found.live_nodes, found.breached) == ("eu", 1, True)
        (figure,) = found.figures
        assert (figure.reporting_nodes, figure.breaching_nodes) == (1, 1)
        assert (figure.worst_value, figure.worst_node) == (0.3, "nodes/a")

    def test_the_node_fraction_decides(self) -> None:
        """One breaching node of four: a breach at fraction 0.25, not at the default 0.5; a node
        that does not report the figure does not breach it; at the maximum is not above it.
        """
        nodes = [node("a", 2, error_rate=0.5), node("b", 2, error_rate=0.05), node("c", 2),
                 node("d", 2, error_rate=0.01)]
        half = region_health("eu", PRODUCTION, 2, a_guard(), nodes)
        assert not half.breached
        assert (half.figures[0].reporting_nodes, half.figures[0].breaching_nodes) == (3, 1)
        quarter = region_health("eu", PRODUCTION, 2, a_guard(node_fraction=0.25), nodes)
        assert quarter.breached and quarter.figures[0].breached

    def test_no_node_no_breach(self) -> None:
        """A region with no node on the version never breaches."""
        found = region_health("eu", PRODUCTION, 2, a_guard(), [node("a", 1, error_rate=1.0)])
        assert (found.live_nodes, found.breached) == (0, False)

    @pytest.mark.parametrize(("fraction", "live", "need"), [
        (0, 4, 2), (0, 3, 2), (0.25, 4, 1), (1, 4, 4), (0.1, 1, 1), (0, 0, 1)])
    def test_needed(self, fraction: float, live: int, need: int) -> None:
        assert needed(live, fraction) == need

    def test_figures_in_name_order_each_on_its_own(self) -> None:
        """Two figures: each has its own counts and worst value; one breaching is enough."""
        guard = a_guard(max_values={"latency_p99_ms": 250, "error_rate": 0.05})
        found = region_health("eu", PRODUCTION, 2, guard, [
            node("a", 2, error_rate=0.01, latency_p99_ms=400),
            node("b", 2, error_rate=0.02, latency_p99_ms=900)])
        assert [f.figure for f in found.figures] == ["error_rate", "latency_p99_ms"]
        assert [f.breached for f in found.figures] == [False, True]
        assert found.figures[1].worst_value == 900 and found.figures[1].worst_node == "nodes/b"
        assert found.breached


class TestJudgement:
    def rollout(self, **guard: object) -> res.Rollout:
        r = res.Rollout(name=f"{PRODUCTION}/rollouts/1", kind=res.ROLLOUT_KIND_PROMOTE,
                        state=res.ROLLOUT_STATE_COMMITTED, target_version=2, regions=["us", "eu"],
                        policy=res.RolloutPolicy(guard=a_guard(**guard)))
        r.activation_time.FromNanoseconds(100 * S)
        return r

    def test_streaks_start_keep_and_end(self) -> None:
        """A breaching region keeps its start; one that stops breaching, or cannot be asked,
        loses its streak.
        """
        first = rules.streaks({}, [breached("us"), breached("eu")], 5)
        assert first == {"us": 5, "eu": 5}
        unasked = res.RegionHealth(region="eu", error="region eu is unreachable")
        assert rules.streaks(first, [breached("us"), unasked], 9) == {"us": 5}
        assert rules.streaks(first, [healthy("us"), breached("eu")], 9) == {"eu": 5}

    def test_a_breach_shorter_than_the_duration_waits(self) -> None:
        rollout = self.rollout(breach_duration=seconds(3))
        health = [breached("us"), healthy("eu")]
        assert rules.judge(rollout, health, {"us": 101 * S}, 103 * S).action == "watch"
        fired = rules.judge(rollout, health, {"us": 101 * S}, 104 * S)
        assert (fired.action, fired.region, fired.since_ns) == ("fire", "us", 101 * S)

    def test_the_evidence_names_region_figure_values_and_nodes(self) -> None:
        rollout = self.rollout(breach_duration=seconds(1))
        fired = rules.judge(rollout, [breached("eu", live=2, worst=0.31)], {"eu": 101 * S},
                            103 * S)
        assert fired.evidence == (
            f"rollout guard of {PRODUCTION}/rollouts/1 (v2): region eu breached for 2 s "
            "(allowed 1 s): error_rate 0.31 > max 0.05 on 2 of 2 live nodes (worst nodes/n1)")

    def test_nothing_before_the_activation_or_after_the_bake_window(self) -> None:
        rollout = self.rollout(bake_window=seconds(60))
        health = [breached("us")]
        assert rules.judge(rollout, health, {"us": 90 * S}, 99 * S).action == "watch"
        assert rules.judge(rollout, health, {"us": 100 * S}, 160 * S).action == "fire"
        assert rules.judge(rollout, health, {"us": 100 * S}, 161 * S).action == "done"

    def test_the_oldest_streak_fires(self) -> None:
        rollout = self.rollout()
        fired = rules.judge(rollout, [breached("us"), breached("eu")],
                            {"us": 103 * S, "eu": 102 * S}, 104 * S)
        assert fired.region == "eu"


class TestFire:
    async def test_fire_rolls_back_and_records_the_verdict(self, env: Env) -> None:
        """One transaction: the emergency rollback (v1 back, on receipt, a ROLLBACK rollout by
        the coordinator with the evidence as reason) and the verdict on the guarded rollout,
        which keeps its commit revision; audited as a ROLLBACK naming the evidence.
        """
        done = await committed(env)
        assert [r.name for r in await env.reg.guard.baking()] == [done.name]
        judgement = rules.Judgement("fire", "rollout guard: error_rate too high", "default",
                                    env.clock.now)
        fired = await env.reg.guard.fire(done.name, judgement, [healthy("x"), breached()],
                                         actor=COORDINATOR)
        assert fired is not None and fired.rollback is not None
        pointer = await env.stage("production")
        assert (pointer.version, pointer.rollout) == (1, fired.rollback.rollout.name)
        assert pointer.activation_time == pointer.update_time
        back = fired.rollback.rollout
        assert (back.kind, back.state, back.actor, back.reason) == (
            res.ROLLOUT_KIND_ROLLBACK, res.ROLLOUT_STATE_COMMITTED, COORDINATOR,
            "rollout guard: error_rate too high")
        got = (await env.reg.rollouts.get(rs.GetRolloutRequest(name=done.name))).rollout
        assert got.commit_revision == done.commit_revision
        assert got.guard.rollback == back.name and got.guard.evidence == judgement.evidence
        assert [h.region for h in got.guard.health] == ["default", "x"]
        assert got.guard.breach_start_time.ToNanoseconds() == judgement.since_ns
        assert got.state == res.ROLLOUT_STATE_COMMITTED and got == fired.rollout
        event = (await env.audit())[0]
        assert (event.action, event.actor, event.reason, event.rollout) == (
            res.AUDIT_ACTION_ROLLBACK, COORDINATOR, judgement.evidence, back.name)
        assert (event.from_value, event.to_value) == ("2", "1")
        # Once only: the guard stands down, nothing more is written.
        commits = env.store.commits
        assert await env.reg.guard.fire(done.name, judgement, [], actor=COORDINATOR) is None
        assert env.store.commits == commits
        assert await env.reg.guard.baking() == []

    async def test_the_guard_stands_down_once_the_stage_moved_on(self, env: Env) -> None:
        """An operator's rollback since the commit: the pointer names another rollout, so the
        guard neither lists the rollout nor fires.
        """
        done = await committed(env)
        await env.rollback()
        assert await env.reg.guard.baking() == []
        judgement = rules.Judgement("fire", "too late", "default", env.clock.now)
        commits = env.store.commits
        assert await env.reg.guard.fire(done.name, judgement, [], actor=COORDINATOR) is None
        assert env.store.commits == commits
        assert (await env.stage("production")).version == 1

    async def test_a_rollout_preparing_meanwhile_is_superseded(self, env: Env) -> None:
        """v3 is being rolled out while v2 still serves and breaches: the guard rolls back to
        v1 anyway, aborting the v3 rollout in the same transaction.
        """
        done = await committed(env, versions=3)
        await env.promote("staging", 3)
        pending = await env.promote("production", 3)
        assert [r.name for r in await env.reg.guard.baking()] == [done.name]
        judgement = rules.Judgement("fire", "error_rate too high", "default", env.clock.now)
        fired = await env.reg.guard.fire(done.name, judgement, [breached()], actor=COORDINATOR)
        assert fired is not None and fired.rollback is not None
        assert fired.rollback.aborted_rollout == pending.rollout.name
        pointer = await env.stage("production")
        assert (pointer.version, pointer.pending_rollout, pointer.pending_version) == (1, "", 0)

    async def test_the_guard_stands_down_after_the_bake_window(self, env: Env) -> None:
        done = await committed(env, a_guard(bake_window=seconds(5)))
        env.clock.now = rules.bake_end_ns(done) + S
        assert await env.reg.guard.baking() == []
        judgement = rules.Judgement("fire", "too late", "default", env.clock.now)
        assert await env.reg.guard.fire(done.name, judgement, [], actor=COORDINATOR) is None
        assert (await env.stage("production")).version == 2

    async def test_no_guard_no_watch(self, env: Env) -> None:
        """A committed rollout whose policy has no guard is not watched."""
        await committed(env, res.RolloutGuard())
        assert await env.reg.guard.baking() == []

    async def test_a_refused_rollback_records_the_verdict_alone(self, env: Env) -> None:
        """The first version ever in production has nothing to roll back to: the verdict says
        so (its error), nothing moves, and the guard does not fire again.
        """
        await env.setup(1)
        await govern(env, a_guard())
        await env.promote("staging", 1)
        started = await env.promote("production", 1)
        done = await env.reg.rollouts.commit(started.rollout.name, actor=COORDINATOR)
        judgement = rules.Judgement("fire", "error_rate too high", "default", env.clock.now)
        fired = await env.reg.guard.fire(done.name, judgement, [breached()], actor=COORDINATOR)
        assert fired is not None and fired.rollback is None
        assert fired.rollout.guard.error.startswith("the stage could not be rolled back: ")
        assert not fired.rollout.guard.rollback
        assert (await env.stage("production")).version == 1
        got = (await env.reg.rollouts.get(rs.GetRolloutRequest(name=done.name))).rollout
        assert got.guard == fired.rollout.guard and got.commit_revision == done.commit_revision
        assert await env.reg.guard.baking() == []
