"""Domain rules of promotion: the regular path, hotfix, etags and refusals.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite.
"""

from __future__ import annotations

import pytest

from modelreg.server.domain.errors import (
    EtagMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.domain.env import (
    MODEL,
    VS,
    Env,
    field_of,
)


class TestPromote:
    async def test_production_promotion_archives_previous_version(self, env: Env) -> None:
        """Promoting to production archives the version it replaces, in the same move."""
        await env.setup(2)
        await env.to_production(1)
        await env.promote("staging", 2)
        resp = await env.promote("production", 2)
        assert resp.archived_version == 1
        assert resp.stage.version == 2
        assert resp.stage.previous_version == 1
        assert list(resp.stage.former_versions) == [1]
        assert list(resp.stage.rollback_candidates) == [1]
        assert (await env.version(1)).state == VS.VERSION_STATE_ARCHIVED
        stored = await env.stage("production")
        assert stored == resp.stage
        assert resp.stage.etag == f'"{resp.revision}"'

    async def test_first_production_promotion_archives_nothing(self, env: Env) -> None:
        """The first production version replaces nothing, so nothing is archived."""
        await env.setup(1)
        resp = await env.to_production(1)
        assert resp.archived_version == 0
        assert list(resp.stage.rollback_candidates) == []

    async def test_staging_promotion_reports_no_archived_version(self, env: Env) -> None:
        """Replacing a staging version archives nothing: archiving is production's alone."""
        await env.setup(2)
        await env.promote("staging", 1)
        resp = await env.promote("staging", 2)
        assert resp.archived_version == 0
        assert (await env.version(1)).state == VS.VERSION_STATE_REGISTERED

    async def test_skipping_staging_is_refused(self, env: Env) -> None:
        """A registered version cannot go straight to production; nothing is written."""
        await env.setup(1)
        commits = env.store.commits
        with pytest.raises(FailedPreconditionError) as exc:
            await env.promote("production", 1)
        assert exc.value.reason == "STAGING_REQUIRED"
        assert exc.value.metadata["version"] == "1"
        assert env.store.commits == commits

    async def test_production_needs_this_version_in_staging(self, env: Env) -> None:
        """Another version being in staging does not open production to this one."""
        await env.setup(2)
        await env.promote("staging", 1)
        with pytest.raises(FailedPreconditionError) as exc:
            await env.promote("production", 2)
        assert exc.value.reason == "STAGING_REQUIRED"

    @pytest.mark.parametrize("reason", ["", "   "])
    async def test_hotfix_without_reason_is_refused(self, env: Env, reason: str) -> None:
        """The hotfix path needs a reason that is not blank."""
        await env.setup(1)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.promote("production", 1, hotfix=True, reason=reason)
        assert field_of(exc.value) == "reason"

    async def test_hotfix_leads_to_production_only(self, env: Env) -> None:
        """A hotfix to staging is refused, naming the hotfix field."""
        await env.setup(1)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.promote("staging", 1, hotfix=True, reason="urgent")
        assert field_of(exc.value) == "hotfix"

    async def test_hotfix_skips_staging_and_is_flagged(self, env: Env) -> None:
        """A hotfix with a reason reaches production flagged hotfix and back-fill required."""
        await env.setup(2)
        await env.to_production(1)
        resp = await env.promote("production", 2, hotfix=True, reason="CVE-1234")
        assert resp.stage.version == 2
        assert resp.stage.hotfix
        assert resp.stage.backfill_required
        assert resp.archived_version == 1
        event = (await env.audit())[0]
        assert event.action == res.AUDIT_ACTION_PROMOTE
        assert event.hotfix
        assert event.reason == "CVE-1234"
        history = await env.reg.stages.history(
            svc.ListStageHistoryRequest(name=f"models/{MODEL}/stages/production")
        )
        assert history.entries[0].hotfix

    async def test_backfill_cleared_when_hotfix_version_reaches_staging(self, env: Env) -> None:
        """Promoting the hotfix version to staging clears production's back-fill flag."""
        await env.setup(2)
        await env.promote("production", 2, hotfix=True, reason="CVE-1234")
        await env.promote("staging", 2)
        production = await env.stage("production")
        assert production.version == 2
        assert production.hotfix
        assert not production.backfill_required

    async def test_backfill_stays_when_other_version_reaches_staging(self, env: Env) -> None:
        """Staging another version does not settle the hotfix's back-fill."""
        await env.setup(3)
        await env.promote("production", 2, hotfix=True, reason="CVE-1234")
        await env.promote("staging", 3)
        assert (await env.stage("production")).backfill_required

    async def test_hotfix_of_staged_version_needs_no_backfill(self, env: Env) -> None:
        """A hotfix of the version already in staging has nothing to back-fill."""
        await env.setup(1)
        await env.promote("staging", 1)
        resp = await env.promote("production", 1, hotfix=True, reason="fast lane")
        assert resp.stage.hotfix
        assert not resp.stage.backfill_required

    async def test_version_already_in_stage_is_refused(self, env: Env) -> None:
        """Promoting the version a stage already names is refused as ALREADY_IN_STAGE."""
        await env.setup(1)
        await env.promote("staging", 1)
        commits = env.store.commits
        with pytest.raises(FailedPreconditionError) as exc:
            await env.promote("staging", 1)
        assert exc.value.reason == "ALREADY_IN_STAGE"
        assert env.store.commits == commits

    async def test_latest_is_never_a_stage(self, env: Env) -> None:
        """A ``latest`` pointer is refused, naming the stage's resource name field."""
        await env.setup(1)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.promote("latest", 1)
        assert field_of(exc.value) == "name"

    async def test_undeclared_custom_stage_is_refused(self, env: Env) -> None:
        """A stage the model never declared is refused, so a typo makes no pointer."""
        await env.setup(1, custom_stages=("canary",))
        commits = env.store.commits
        with pytest.raises(InvalidArgumentError) as exc:
            await env.promote("canray", 1)
        assert field_of(exc.value) == "name"
        assert "canary" in exc.value.message
        assert env.store.commits == commits

    async def test_declared_custom_stage_accepts_any_version(self, env: Env) -> None:
        """A declared custom stage takes a registered version, without going through staging."""
        await env.setup(1, custom_stages=("canary",))
        resp = await env.promote("canary", 1)
        assert resp.stage.name == f"models/{MODEL}/stages/canary"
        assert resp.stage.version == 1
        assert (await env.stage("canary")).version == 1

    async def test_deprecated_version_cannot_be_promoted(self, env: Env) -> None:
        """A version with a sunset time is refused as VERSION_DEPRECATED."""
        await env.setup(1)
        await env.deprecate(1)
        with pytest.raises(FailedPreconditionError) as exc:
            await env.promote("staging", 1)
        assert exc.value.reason == "VERSION_DEPRECATED"

    async def test_unknown_version_is_not_found(self, env: Env) -> None:
        """Promoting a version number never registered is NOT_FOUND, naming the version."""
        await env.setup(1)
        with pytest.raises(NotFoundError) as exc:
            await env.promote("staging", 9)
        assert exc.value.resource == f"models/{MODEL}/versions/9"

    async def test_stale_etag_is_refused_with_current_one(self, env: Env) -> None:
        """A promotion with an outdated pointer etag fails and reports the current etag."""
        await env.setup(3)
        first = await env.promote("staging", 1)
        second = await env.promote("staging", 2)
        with pytest.raises(EtagMismatchError) as exc:
            await env.promote("staging", 3, etag=first.stage.etag)
        assert exc.value.current_etag == second.stage.etag
        assert exc.value.metadata["current_etag"] == second.stage.etag
        assert (await env.stage("staging")).version == 2

    async def test_current_etag_is_accepted(self, env: Env) -> None:
        """A promotion with the pointer's current etag (``"0"`` when never used) succeeds."""
        await env.setup(2)
        first = await env.promote("staging", 1, etag='"0"')
        resp = await env.promote("staging", 2, etag=first.stage.etag)
        assert resp.stage.version == 2
