"""Domain rules of the fleet's durable outcome records, node removal and stale failures.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite
(tests/server/test_rollback_served_api.py).
"""

from __future__ import annotations

import pytest

from modelreg.server.domain import keys, outcomes
from modelreg.server.domain.errors import InvalidArgumentError, NotFoundError
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import store_pb2
from tests.domain.env import MODEL, Env, field_of
from tests.domain.fleet_env import DIGEST_ERROR, fleet_of, report


def outcome_keys(env: Env) -> list[str]:
    return sorted(k for k in env.store.data if k.startswith("outcomes/"))


class TestOutcomeRecords:
    async def test_first_report_records_served_once(self, env: Env) -> None:
        """A node serving v1 records served once; repeated heartbeats of any node write no
        further record and make no transaction.
        """
        fleet = fleet_of(env)
        await env.setup(1)
        await env.to_production(1)
        await fleet.report(report("node-a", 1))
        key = keys.outcome(MODEL, "production", 1, "served")
        assert outcome_keys(env) == [key]
        first = env.store.data[key]
        commits = env.store.commits
        for _ in range(5):
            await fleet.report(report("node-a", 1))
        await fleet_of(env).report(report("node-b", 1))  # another server process
        assert env.store.commits == commits
        assert env.store.data[key] == first
        assert store_pb2.StageOutcome.FromString(first.value).node_id == "node-a"

    async def test_failure_report_records_node_and_error(self, env: Env) -> None:
        """A failure report records failed with the node and its error."""
        await env.setup(3)
        await fleet_of(env).report(report("node-a", 1, failed=3, error=DIGEST_ERROR))
        key = keys.outcome(MODEL, "production", 3, "failed")
        assert key in outcome_keys(env)
        record = store_pb2.StageOutcome.FromString(env.store.data[key].value)
        assert (record.node_id, record.error) == ("node-a", DIGEST_ERROR)

    async def test_reports_of_unknown_versions_record_nothing(self, env: Env) -> None:
        """Reports naming a version or model that does not exist record no outcome."""
        fleet = fleet_of(env)
        await env.setup(1)
        await fleet.report(report("node-a", 9))
        await fleet.report(report("node-b", 1, model_id="ghost"))
        assert outcome_keys(env) == []
        assert keys.node("node-a") in env.store.data

    async def test_model_deletion_drops_its_records(self, env: Env) -> None:
        """Deleting a model deletes its outcome records with it."""
        await env.setup(1)
        await env.create_model("other")
        await env.create_version("other")
        await fleet_of(env).report(report("node-a", 1, stage="staging"))
        await fleet_of(env).report(report("node-b", 1, stage="staging", model_id="other"))
        req = svc.DeleteModelRequest(name=f"models/{MODEL}")
        await env.reg.models.delete(env.call("DeleteModel", req), req)
        assert outcome_keys(env) == [keys.outcome("other", "staging", 1, "served")]

    @pytest.mark.parametrize("field", ["serving_version", "prepared_version", "failed_version"])
    async def test_negative_versions_are_invalid(self, env: Env, field: str) -> None:
        """A negative version in a report is INVALID_ARGUMENT naming it, and nothing is written."""
        req = report("node-a", 1)
        setattr(req.node.stages[0], field, -1)
        with pytest.raises(InvalidArgumentError) as exc:
            await fleet_of(env).report(req)
        assert field_of(exc.value) == f"node.stages[0].{field}"
        assert env.store.data == {}

    def test_memo_forgets_after_its_time(self) -> None:
        """The memo trusts a seen record for its time only, and stays within its size."""
        now = [0.0]
        memo = outcomes.Memo(seconds=60, size=2, clock=lambda: now[0])
        memo.add(["a", "b"])
        assert memo.known("a") and not memo.known("c")
        now[0] = 61
        assert not memo.known("a")
        memo.add(["c", "d", "e"])
        assert not memo.known("c") and memo.known("e")


class TestNodeRemovalAndStaleFailures:
    async def test_delete_node_removes_it_at_once(self, env: Env) -> None:
        """DeleteNode removes a node's report; a second delete is NOT_FOUND."""
        fleet = fleet_of(env)
        await fleet.report(report("node-a", 0))
        await fleet.delete(fs.DeleteNodeRequest(name="nodes/node-a"))
        assert keys.node("node-a") not in env.store.data
        with pytest.raises(NotFoundError):
            await fleet.delete(fs.DeleteNodeRequest(name="nodes/node-a"))

    @pytest.mark.parametrize("name", ["", "node-a", "nodes/", "nodes/Node A", "models/x"])
    async def test_delete_node_bad_name_is_invalid(self, env: Env, name: str) -> None:
        """A malformed node name is INVALID_ARGUMENT naming name."""
        with pytest.raises(InvalidArgumentError) as exc:
            await fleet_of(env).delete(fs.DeleteNodeRequest(name=name))
        assert field_of(exc.value) == "name"

    async def test_rollout_drops_failures_of_other_versions(self, env: Env) -> None:
        """The rollout view shows a node's failure only while it is of the committed version:
        once production moves on from v3, a node still reporting v3 failed shows no failure.
        """
        fleet = fleet_of(env)
        await env.setup(3)
        await env.to_production(1)
        await env.to_production(3)
        await fleet.report(report("node-a", 1, failed=3, error=DIGEST_ERROR))
        status = await fleet.rollout(
            fs.GetRolloutStatusRequest(name=f"models/{MODEL}/stages/production"))
        assert status.lagging[0].stages[0].failed_version == 3
        assert "v3 failed" in status.summary
        await env.promote("staging", 2)
        await env.promote("production", 2)
        status = await fleet.rollout(
            fs.GetRolloutStatusRequest(name=f"models/{MODEL}/stages/production"))
        assert status.lagging[0].stages[0].failed_version == 0
        assert "failed" not in status.summary
