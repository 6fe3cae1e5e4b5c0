"""Domain rules of rollback to the last known-good or a named version.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite.
"""

from __future__ import annotations

import pytest

from modelreg.server.domain.errors import (
    FailedPreconditionError,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.domain.env import (
    MODEL,
    VS,
    Env,
)


class TestRollback:
    async def test_rollback_goes_to_last_known_good(self, env: Env) -> None:
        """Rollback returns production to the version it replaced last."""
        await env.setup(3)
        for n in (1, 2, 3):
            await env.to_production(n)
        resp = await env.rollback()
        assert resp.stage.version == 2
        assert resp.rolled_back_version == 3
        assert list(resp.stage.rollback_candidates) == [1]
        assert (await env.version(2)).state == VS.VERSION_STATE_PRODUCTION
        rolled_away = await env.version(3)
        assert list(rolled_away.stages) == ["staging"]  # staging still names it
        assert 3 in (await env.stage("production")).former_versions

    async def test_rolled_back_version_is_never_a_candidate(self, env: Env) -> None:
        """After a rollback the version rolled away from cannot be a rollback target."""
        await env.setup(3)
        for n in (1, 2, 3):
            await env.to_production(n)
        await env.rollback()
        with pytest.raises(FailedPreconditionError) as exc:
            await env.rollback(to_version=3)
        assert exc.value.reason == "NOT_A_ROLLBACK_CANDIDATE"
        assert exc.value.metadata["candidates"] == "1"
        assert (await env.rollback()).stage.version == 1
        assert list((await env.stage("production")).rollback_candidates) == []

    async def test_rolled_away_version_is_archived_once_out_of_staging(self, env: Env) -> None:
        """The version rolled away from is ARCHIVED once staging has moved on from it too."""
        await env.setup(3)
        await env.to_production(1)
        await env.to_production(2)
        await env.rollback()
        assert (await env.version(2)).state == VS.VERSION_STATE_STAGING
        await env.promote("staging", 3)
        assert (await env.version(2)).state == VS.VERSION_STATE_ARCHIVED

    async def test_named_rollback_to_older_candidate(self, env: Env) -> None:
        """A rollback may name any known-good former version, not only the last one."""
        await env.setup(3)
        for n in (1, 2, 3):
            await env.to_production(n)
        resp = await env.rollback(to_version=1)
        assert resp.stage.version == 1
        assert list(resp.stage.rollback_candidates) == [2]

    async def test_named_rollback_to_non_candidate_is_refused(self, env: Env) -> None:
        """Naming a version that never left production is NOT_A_ROLLBACK_CANDIDATE."""
        await env.setup(3)
        await env.to_production(1)
        await env.to_production(2)
        commits = env.store.commits
        with pytest.raises(FailedPreconditionError) as exc:
            await env.rollback(to_version=3)
        assert exc.value.reason == "NOT_A_ROLLBACK_CANDIDATE"
        assert env.store.commits == commits

    async def test_no_candidate_is_refused(self, env: Env) -> None:
        """A pointer with no former version has NO_ROLLBACK_CANDIDATE."""
        await env.setup(1)
        await env.to_production(1)
        with pytest.raises(FailedPreconditionError) as exc:
            await env.rollback()
        assert exc.value.reason == "NO_ROLLBACK_CANDIDATE"

    async def test_never_used_stage_has_no_candidate(self, env: Env) -> None:
        """Rolling back a stage that never pointed anywhere is NO_ROLLBACK_CANDIDATE."""
        await env.setup(1)
        with pytest.raises(FailedPreconditionError) as exc:
            await env.rollback("staging")
        assert exc.value.reason == "NO_ROLLBACK_CANDIDATE"

    async def test_history_lists_moves_newest_first(self, env: Env) -> None:
        """Stage history lists every move newest first with its kind, versions and revision."""
        await env.setup(2)
        await env.to_production(1)
        await env.to_production(2)
        rolled = await env.rollback(actor="bob")
        resp = await env.reg.stages.history(
            svc.ListStageHistoryRequest(name=f"models/{MODEL}/stages/production")
        )
        moves = [(e.generation, e.kind, e.from_version, e.to_version) for e in resp.entries]
        assert moves == [
            (3, res.POINTER_MOVE_KIND_ROLLBACK, 2, 1),
            (2, res.POINTER_MOVE_KIND_PROMOTE, 1, 2),
            (1, res.POINTER_MOVE_KIND_PROMOTE, 0, 1),
        ]
        assert resp.entries[0].actor == "bob"
        assert resp.entries[0].revision == rolled.revision
        revisions = [e.revision for e in resp.entries]
        assert revisions == sorted(revisions, reverse=True)
        assert resp.next_page_token == ""

    async def test_history_pages(self, env: Env) -> None:
        """Stage history pages one move at a time down to the first move."""
        await env.setup(3)
        for n in (1, 2, 3):
            await env.promote("staging", n)
        seen: list[int] = []
        token = ""
        for _ in range(5):
            resp = await env.reg.stages.history(svc.ListStageHistoryRequest(
                name=f"models/{MODEL}/stages/staging", page_size=1, page_token=token
            ))
            seen.extend(e.to_version for e in resp.entries)
            token = resp.next_page_token
            if not token:
                break
        assert seen == [3, 2, 1]
