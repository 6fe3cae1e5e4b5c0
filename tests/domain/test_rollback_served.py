"""Domain rules of issue 14: a rollback lands on a version that really served in the stage.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite
(tests/server/test_rollback_served_api.py, tests/e2e/test_rollback_incident.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from modelreg.server.domain import keys
from modelreg.server.domain.errors import FailedPreconditionError, InvalidArgumentError
from modelreg.server.domain.ports import Put
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import store_pb2
from tests.domain.env import MODEL, Env, field_of
from tests.domain.fleet_env import DIGEST_ERROR, audit_of, fleet_of, incident, report, rollback


class TestRollbackServed:
    async def test_incident_rollback_skips_the_refused_version(self, env: Env) -> None:
        """v1 served, v3 refused by every node, v4 promoted: rollback lands on v1 and names
        v3 as skipped, refused by the fleet, in the response and in the audit event.
        """
        await incident(env, fleet_of(env))
        resp = await rollback(env)
        assert (resp.rolled_back_version, resp.stage.version) == (4, 1)
        assert resp.fleet_evidence
        assert [(s.version, s.reason) for s in resp.skipped] == [(3, res.SKIP_REASON_REFUSED)]
        assert "refused by the fleet" in resp.skipped[0].detail
        assert "DigestMismatchError" in resp.skipped[0].detail
        event = audit_of(await env.audit(), res.AUDIT_ACTION_ROLLBACK)
        assert (event.from_value, event.to_value) == ("4", "1")
        assert list(event.skipped) == list(resp.skipped)
        assert not event.forced

    async def test_candidate_never_reported_serving_is_skipped(self, env: Env) -> None:
        """A candidate no node ever reported serving in the stage is skipped as never served."""
        fleet = fleet_of(env)
        await env.setup(3)
        await env.to_production(1)
        await fleet.report(report("node-a", 1))
        await env.to_production(2)  # nodes were down: nobody reported v2
        await env.to_production(3)
        await fleet.report(report("node-a", 3))
        resp = await rollback(env)
        assert resp.stage.version == 1
        assert [(s.version, s.reason) for s in resp.skipped] == [
            (2, res.SKIP_REASON_NEVER_SERVED)]

    async def test_served_by_one_node_counts_as_served(self, env: Env) -> None:
        """A version one node served and another failed counts as served: it is the target."""
        fleet = fleet_of(env)
        await env.setup(3)
        await env.to_production(1)
        await env.to_production(2)
        await fleet.report(report("node-a", 2))
        await fleet.report(report("node-b", 1, failed=2, error="loader: out of memory"))
        await env.to_production(3)
        resp = await rollback(env)
        assert resp.stage.version == 2 and list(resp.skipped) == []

    async def test_served_elsewhere_does_not_count(self, env: Env) -> None:
        """Serving a version in canary says nothing about production: it is still skipped."""
        fleet = fleet_of(env)
        await env.setup(3, custom_stages=("canary",))
        await env.promote("canary", 2)
        await fleet.report(report("node-c", 2, stage="canary"))
        await env.to_production(1)
        await fleet.report(report("node-a", 1))
        await env.to_production(2)
        await env.to_production(3)
        resp = await rollback(env)
        assert resp.stage.version == 1
        assert [s.version for s in resp.skipped] == [2]

    async def test_without_fleet_reports_every_candidate_counts(self, env: Env) -> None:
        """With no node ever reporting on the stage, rollback keeps its old rule and says so."""
        await env.setup(3)
        for n in (1, 2, 3):
            await env.to_production(n)
        resp = await rollback(env)
        assert resp.stage.version == 2
        assert not resp.fleet_evidence and list(resp.skipped) == []

    async def test_deprecated_candidate_is_listed_as_skipped(self, env: Env) -> None:
        """A deprecated candidate passed over appears in skipped with reason DEPRECATED."""
        await env.setup(3)
        for n in (1, 2, 3):
            await env.to_production(n)
        await env.deprecate(2)
        resp = await rollback(env)
        assert resp.stage.version == 1
        assert [(s.version, s.reason) for s in resp.skipped] == [(2, res.SKIP_REASON_DEPRECATED)]

    async def test_no_served_candidate_is_refused_naming_the_skipped(self, env: Env) -> None:
        """When every candidate is refused or never served, rollback is NO_ROLLBACK_CANDIDATE
        naming each one and why, and nothing is written.
        """
        fleet = fleet_of(env)
        await env.setup(3)
        await env.to_production(1)
        await env.to_production(2)
        await fleet.report(report("node-a", 0, failed=2, error=DIGEST_ERROR))
        await env.to_production(3)
        commits = env.store.commits
        with pytest.raises(FailedPreconditionError) as exc:
            await rollback(env)
        assert exc.value.reason == "NO_ROLLBACK_CANDIDATE"
        assert exc.value.metadata["skipped"] == "2:refused,1:never_served"
        assert "v2: refused by the fleet" in exc.value.message
        assert "allow_unserved" in exc.value.message
        assert env.store.commits == commits

    async def test_named_refused_version_needs_the_override(self, env: Env) -> None:
        """Naming the version the fleet refused is VERSION_REFUSED_BY_FLEET, naming it; with
        allow_unserved and a reason it goes through and the audit event says forced.
        """
        await incident(env, fleet_of(env))
        commits = env.store.commits
        with pytest.raises(FailedPreconditionError) as exc:
            await rollback(env, 3)
        assert exc.value.reason == "VERSION_REFUSED_BY_FLEET"
        assert exc.value.metadata == {"version": "3", "why": "refused"}
        assert "version 3" in exc.value.message and "DigestMismatchError" in exc.value.message
        assert env.store.commits == commits
        resp = await rollback(env, 3, allow_unserved=True, reason="artifact re-uploaded")
        assert resp.stage.version == 3
        assert audit_of(await env.audit(), res.AUDIT_ACTION_ROLLBACK).forced

    async def test_named_never_served_version_needs_the_override(self, env: Env) -> None:
        """Naming a candidate no node ever served in the stage is VERSION_NEVER_SERVED."""
        fleet = fleet_of(env)
        await env.setup(3)
        await env.to_production(1)
        await env.to_production(2)
        await fleet.report(report("node-a", 2))
        await env.to_production(3)
        with pytest.raises(FailedPreconditionError) as exc:
            await rollback(env, 1)
        assert exc.value.reason == "VERSION_NEVER_SERVED"
        assert (await rollback(env, 2)).stage.version == 2  # a served one needs no override

    async def test_override_never_passes_deprecation(self, env: Env) -> None:
        """allow_unserved does not override deprecation: VERSION_DEPRECATED still."""
        await incident(env, fleet_of(env))
        await env.deprecate(3)
        with pytest.raises(FailedPreconditionError) as exc:
            await rollback(env, 3, allow_unserved=True, reason="try anyway")
        assert exc.value.reason == "VERSION_DEPRECATED"

    @pytest.mark.parametrize(
        ("to_version", "reason", "field"),
        [(0, "why", "allow_unserved"), (3, "", "reason"), (3, "   ", "reason")],
    )
    async def test_override_needs_a_named_version_and_a_reason(
        self, env: Env, to_version: int, reason: str, field: str
    ) -> None:
        """allow_unserved without to_version, or without a reason, is INVALID_ARGUMENT naming
        the field, and nothing is written.
        """
        await incident(env, fleet_of(env))
        commits = env.store.commits
        with pytest.raises(InvalidArgumentError) as exc:
            await rollback(env, to_version, allow_unserved=True, reason=reason)
        assert field_of(exc.value) == field
        assert env.store.commits == commits

    async def test_report_landing_during_the_decision_is_seen(
        self, env: Env, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The rollback's Txn guards the outcome records it read: a served record written
        between its read and its commit fails the commit, and the decision is made again on it.
        """
        await incident(env, fleet_of(env))
        store = env.store
        commit = store.commit
        late = Put(keys.outcome(MODEL, "production", 3, "served"),
                   store_pb2.StageOutcome(node_id="node-z").SerializeToString())

        async def racing_commit(guards: Any, writes: Any, **kw: Any) -> Any:
            monkeypatch.setattr(store, "commit", commit)
            await commit([], [late])  # a node report recorded by another server, just now
            return await commit(guards, writes, **kw)

        monkeypatch.setattr(store, "commit", racing_commit)
        failed = store.failed_commits
        resp = await rollback(env)
        assert store.failed_commits == failed + 1
        assert resp.stage.version == 3 and list(resp.skipped) == []
