"""Domain unit tests of the lifecycle rules, over the in-memory store.

These are not the proof that the feature works (that is the suite against real etcd); they pin
the rules of ``modelreg.server.domain`` precisely and fast: derived states, promotion, hotfix,
rollback, models, versions, request validation and the audit trail.
"""

from __future__ import annotations

import hashlib

import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from modelreg.server.domain.errors import (
    AlreadyExistsError,
    EtagMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.transaction import Call
from modelreg.server.store.memory import MemoryStore
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res

SERVICE = "/modelreg.v1.ModelService/"
MODEL = "fraud"
T0 = 1_700_000_000_000_000_000
VS = res.VersionState


class FakeClock:
    """Unix nanoseconds that advance one second per reading."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        self.now += 1_000_000_000
        return self.now


def digest(n: int) -> str:
    """A valid lowercase sha256 for artifact ``n``."""
    return hashlib.sha256(f"artifact-{n}".encode()).hexdigest()


def version_fields(n: int = 1) -> res.ModelVersion:
    """The immutable fields of a valid version to register."""
    return res.ModelVersion(
        artifact_uri=f"file:///models/fraud/{n}.bin", sha256=digest(n), size_bytes=1000 + n
    )


class Env:
    """A registry over a fresh MemoryStore, with shorthands for the calls tests make."""

    def __init__(self, *, clock: FakeClock | None = None, default_clock: bool = False) -> None:
        self.store = MemoryStore()
        self.clock = clock or FakeClock()
        self.reg = (
            Registry.over(self.store) if default_clock else Registry.over(self.store, self.clock)
        )

    @staticmethod
    def call(method: str, request: Message, actor: str = "alice") -> Call:
        return Call(actor=actor, method=SERVICE + method, request=request)

    async def create_model(
        self, model_id: str = MODEL, *, custom_stages: tuple[str, ...] = (), actor: str = "alice"
    ) -> res.RegisteredModel:
        req = svc.CreateModelRequest(
            model_id=model_id, model=res.RegisteredModel(custom_stages=custom_stages)
        )
        return (await self.reg.models.create(self.call("CreateModel", req, actor), req)).model

    async def create_version(
        self, model_id: str = MODEL, n: int = 1, *, actor: str = "alice"
    ) -> res.ModelVersion:
        req = svc.CreateModelVersionRequest(
            parent=f"models/{model_id}", model_version=version_fields(n)
        )
        resp = await self.reg.versions.create(self.call("CreateModelVersion", req, actor), req)
        return resp.model_version

    async def setup(self, versions: int, *, custom_stages: tuple[str, ...] = ()) -> None:
        """The model ``fraud`` with versions 1..``versions`` registered."""
        await self.create_model(custom_stages=custom_stages)
        for n in range(1, versions + 1):
            await self.create_version(n=n)

    async def promote(
        self,
        stage: str,
        version: int,
        *,
        model_id: str = MODEL,
        hotfix: bool = False,
        reason: str = "",
        etag: str = "",
        actor: str = "alice",
    ) -> svc.PromoteVersionResponse:
        req = svc.PromoteVersionRequest(
            name=f"models/{model_id}/stages/{stage}", version=version, hotfix=hotfix,
            reason=reason, etag=etag,
        )
        return await self.reg.stages.promote(self.call("PromoteVersion", req, actor), req)

    async def to_production(self, version: int) -> svc.PromoteVersionResponse:
        """The regular path: staging, then production."""
        await self.promote("staging", version)
        return await self.promote("production", version)

    async def rollback(
        self, stage: str = "production", to_version: int = 0, *, actor: str = "alice"
    ) -> svc.RollbackStageResponse:
        req = svc.RollbackStageRequest(
            name=f"models/{MODEL}/stages/{stage}", to_version=to_version, reason="bad p99"
        )
        return await self.reg.stages.rollback(self.call("RollbackStage", req, actor), req)

    async def version(self, number: int, model_id: str = MODEL) -> res.ModelVersion:
        req = svc.GetModelVersionRequest(name=f"models/{model_id}/versions/{number}")
        return (await self.reg.versions.get(req)).model_version

    async def stage(self, stage: str) -> res.StagePointer:
        req = svc.GetStageRequest(name=f"models/{MODEL}/stages/{stage}")
        return (await self.reg.stages.get(req)).stage

    async def model(self, model_id: str = MODEL) -> res.RegisteredModel:
        return (await self.reg.models.get(svc.GetModelRequest(name=f"models/{model_id}"))).model

    async def update_version(
        self, number: int, paths: list[str], **fields: object
    ) -> svc.UpdateModelVersionResponse:
        mv = res.ModelVersion(name=f"models/{MODEL}/versions/{number}", **fields)  # type: ignore[arg-type]
        req = svc.UpdateModelVersionRequest(
            model_version=mv, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return await self.reg.versions.update(self.call("UpdateModelVersion", req), req)

    async def deprecate(self, number: int) -> svc.UpdateModelVersionResponse:
        return await self.update_version(
            number, ["sunset_time"], sunset_time=timestamp_pb2.Timestamp(seconds=1_900_000_000)
        )

    async def audit(self, **filters: object) -> list[res.AuditEvent]:
        req = svc.ListAuditEventsRequest(page_size=1000, **filters)  # type: ignore[arg-type]
        return list((await self.reg.audit.list(req)).audit_events)


@pytest.fixture
def env() -> Env:
    """A registry over an empty in-memory store with a fake clock."""
    return Env()


def field_of(err: InvalidArgumentError) -> str:
    """The (first) field an InvalidArgumentError names, as sent in ErrorInfo metadata."""
    assert err.metadata["field"] == err.violations[0].field
    return err.violations[0].field


class TestDeriveState:
    async def test_new_version_is_registered(self, env: Env) -> None:
        """A version no pointer names and without sunset time is REGISTERED, in no stage."""
        await env.setup(1)
        mv = await env.version(1)
        assert mv.state == VS.VERSION_STATE_REGISTERED
        assert list(mv.stages) == []

    async def test_version_in_staging_is_staging(self, env: Env) -> None:
        """The version the staging pointer names is STAGING."""
        await env.setup(1)
        await env.promote("staging", 1)
        mv = await env.version(1)
        assert mv.state == VS.VERSION_STATE_STAGING
        assert list(mv.stages) == ["staging"]

    async def test_version_in_production_is_production(self, env: Env) -> None:
        """The version the production pointer names is PRODUCTION, whatever else names it."""
        await env.setup(1)
        await env.to_production(1)
        mv = await env.version(1)
        assert mv.state == VS.VERSION_STATE_PRODUCTION
        assert list(mv.stages) == ["production", "staging"]

    async def test_replaced_production_version_is_archived(self, env: Env) -> None:
        """A version that left production for another one is ARCHIVED and in no stage."""
        await env.setup(2)
        await env.to_production(1)
        await env.to_production(2)
        mv = await env.version(1)
        assert mv.state == VS.VERSION_STATE_ARCHIVED
        assert list(mv.stages) == []

    async def test_version_with_sunset_time_is_deprecated(self, env: Env) -> None:
        """Setting a sunset time on an unstaged version makes it DEPRECATED, in the reply too."""
        await env.setup(1)
        resp = await env.deprecate(1)
        assert resp.model_version.state == VS.VERSION_STATE_DEPRECATED
        assert (await env.version(1)).state == VS.VERSION_STATE_DEPRECATED

    async def test_pointer_outranks_sunset_time(self, env: Env) -> None:
        """A version still in staging stays STAGING even once it has a sunset time."""
        await env.setup(1)
        await env.promote("staging", 1)
        await env.deprecate(1)
        assert (await env.version(1)).state == VS.VERSION_STATE_STAGING

    async def test_custom_stage_alone_leaves_version_registered(self, env: Env) -> None:
        """A version only a custom stage names is REGISTERED but lists that stage."""
        await env.setup(1, custom_stages=("canary",))
        await env.promote("canary", 1)
        mv = await env.version(1)
        assert mv.state == VS.VERSION_STATE_REGISTERED
        assert list(mv.stages) == ["canary"]


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


class TestModels:
    async def test_duplicate_create_is_refused(self, env: Env) -> None:
        """Creating a model id that exists is ALREADY_EXISTS, and nothing is written."""
        await env.create_model()
        commits = env.store.commits
        with pytest.raises(AlreadyExistsError) as exc:
            await env.create_model()
        assert exc.value.resource == f"models/{MODEL}"
        assert env.store.commits == commits

    async def test_delete_refused_while_a_stage_names_a_version(self, env: Env) -> None:
        """A model with a staged version is not deleted: MODEL_HAS_STAGED_VERSIONS."""
        await env.setup(1)
        await env.promote("staging", 1)
        req = svc.DeleteModelRequest(name=f"models/{MODEL}")
        with pytest.raises(FailedPreconditionError) as exc:
            await env.reg.models.delete(env.call("DeleteModel", req), req)
        assert exc.value.reason == "MODEL_HAS_STAGED_VERSIONS"
        assert exc.value.metadata["stages"] == "staging"
        assert (await env.version(1)).version == 1

    async def test_delete_unstaged_model_removes_it_and_its_versions(self, env: Env) -> None:
        """Deleting a model without staged versions removes it; its id then starts over."""
        await env.setup(2)
        req = svc.DeleteModelRequest(name=f"models/{MODEL}")
        await env.reg.models.delete(env.call("DeleteModel", req), req)
        with pytest.raises(NotFoundError):
            await env.model()
        with pytest.raises(NotFoundError):
            await env.version(1)
        await env.create_model()
        assert (await env.create_version()).version == 1

    async def test_removing_custom_stage_in_use_is_refused(self, env: Env) -> None:
        """A custom stage that points at a version cannot be undeclared: STAGE_IN_USE."""
        await env.setup(1, custom_stages=("canary", "shadow"))
        await env.promote("canary", 1)
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}", custom_stages=["shadow"]),
            update_mask=field_mask_pb2.FieldMask(paths=["custom_stages"]),
        )
        with pytest.raises(FailedPreconditionError) as exc:
            await env.reg.models.update(env.call("UpdateModel", req), req)
        assert exc.value.reason == "STAGE_IN_USE"
        assert list((await env.model()).custom_stages) == ["canary", "shadow"]

    async def test_removing_unused_custom_stage_is_allowed(self, env: Env) -> None:
        """A custom stage that never pointed anywhere can be undeclared."""
        await env.setup(1, custom_stages=("canary", "shadow"))
        await env.promote("canary", 1)
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}", custom_stages=["canary"]),
            update_mask=field_mask_pb2.FieldMask(paths=["custom_stages"]),
        )
        resp = await env.reg.models.update(env.call("UpdateModel", req), req)
        assert list(resp.model.custom_stages) == ["canary"]

    async def test_update_with_stale_etag_is_refused(self, env: Env) -> None:
        """An update carrying an outdated etag fails with the current etag attached."""
        created = await env.create_model()
        await env.create_version()  # bumps the model record (version_count)
        current = await env.model()
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(
                name=f"models/{MODEL}", description="new", etag=created.etag
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
        with pytest.raises(EtagMismatchError) as exc:
            await env.reg.models.update(env.call("UpdateModel", req), req)
        assert exc.value.current_etag == current.etag
        assert current.etag != created.etag
        assert (await env.model()).description == ""

    async def test_update_with_current_etag_changes_masked_fields_only(self, env: Env) -> None:
        """An update with the current etag changes the masked fields and returns a new etag."""
        created = await env.create_model(custom_stages=("canary",))
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(
                name=f"models/{MODEL}", description="fraud scorer", tags={"team": "risk"},
                etag=created.etag,
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        )
        resp = await env.reg.models.update(env.call("UpdateModel", req), req)
        assert resp.model.description == "fraud scorer"
        assert dict(resp.model.tags) == {}
        assert list(resp.model.custom_stages) == ["canary"]
        assert resp.model.etag == f'"{resp.revision}"' != created.etag
        assert await env.model() == resp.model

    @pytest.mark.parametrize(
        "paths", [[], ["name"], ["version_count"], ["create_time"], ["description", "bogus"]]
    )
    async def test_update_mask_outside_mutable_fields_is_refused(
        self, env: Env, paths: list[str]
    ) -> None:
        """An empty mask, or one naming an immutable or unknown field, is refused."""
        await env.create_model()
        commits = env.store.commits
        req = svc.UpdateModelRequest(
            model=res.RegisteredModel(name=f"models/{MODEL}", description="x"),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.models.update(env.call("UpdateModel", req), req)
        assert field_of(exc.value) == "update_mask"
        assert env.store.commits == commits


class TestVersions:
    async def test_numbers_are_assigned_in_order(self, env: Env) -> None:
        """Versions are numbered 1, 2, 3 by the server, and the model counts them."""
        await env.create_model()
        created = [await env.create_version(n=n) for n in (1, 2, 3)]
        assert [mv.version for mv in created] == [1, 2, 3]
        assert [mv.name for mv in created] == [f"models/{MODEL}/versions/{n}" for n in (1, 2, 3)]
        assert created[0].created_by == "alice"
        assert (await env.model()).version_count == 3

    async def test_numbering_is_per_model(self, env: Env) -> None:
        """Each model numbers its own versions from 1."""
        await env.setup(2)
        await env.create_model("churn")
        assert (await env.create_version("churn")).version == 1

    async def test_client_chosen_number_is_refused(self, env: Env) -> None:
        """A request that sets the version number itself is refused."""
        await env.create_model()
        mv = version_fields()
        mv.version = 7
        req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", model_version=mv)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.create(env.call("CreateModelVersion", req), req)
        assert field_of(exc.value) == "model_version"

    async def test_version_of_unknown_model_is_not_found(self, env: Env) -> None:
        """Registering a version under a model that does not exist is NOT_FOUND."""
        with pytest.raises(NotFoundError):
            await env.create_version("nobody")

    @pytest.mark.parametrize("path", ["artifact_uri", "sha256", "size_bytes", "version"])
    async def test_immutable_fields_cannot_be_updated(self, env: Env, path: str) -> None:
        """An update mask naming an immutable field is refused, and the version is unchanged."""
        await env.setup(1)
        before = await env.version(1)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.update_version(1, [path], artifact_uri="file:///evil.bin",
                                     sha256=digest(99), size_bytes=1, version=5)
        assert field_of(exc.value) == "update_mask"
        assert await env.version(1) == before

    async def test_annotations_can_change(self, env: Env) -> None:
        """Description and tags of a version change; its immutable fields do not."""
        await env.setup(1)
        resp = await env.update_version(
            1, ["description", "tags"], description="good one", tags={"eval": "passed"},
            artifact_uri="file:///ignored.bin",
        )
        mv = await env.version(1)
        assert mv == resp.model_version
        assert mv.description == "good one"
        assert dict(mv.tags) == {"eval": "passed"}
        assert mv.artifact_uri == version_fields(1).artifact_uri

    async def test_list_filters_by_state(self, env: Env) -> None:
        """Listing with a state returns exactly the versions in that state."""
        await env.setup(5)
        await env.to_production(1)
        await env.to_production(2)  # 1 archived
        await env.promote("staging", 3)
        await env.deprecate(5)  # 4 stays registered
        expected = {
            VS.VERSION_STATE_ARCHIVED: [1],
            VS.VERSION_STATE_PRODUCTION: [2],
            VS.VERSION_STATE_STAGING: [3],
            VS.VERSION_STATE_REGISTERED: [4],
            VS.VERSION_STATE_DEPRECATED: [5],
        }
        for state, numbers in expected.items():
            resp = await env.reg.versions.list(
                svc.ListModelVersionsRequest(parent=f"models/{MODEL}", state=state)
            )
            assert [mv.version for mv in resp.model_versions] == numbers, state
            assert all(mv.state == state for mv in resp.model_versions)
        everything = await env.reg.versions.list(
            svc.ListModelVersionsRequest(parent=f"models/{MODEL}")
        )
        assert [mv.version for mv in everything.model_versions] == [1, 2, 3, 4, 5]

    async def test_unknown_state_filter_is_refused(self, env: Env) -> None:
        """A state number the enum does not define is refused, naming the state field."""
        await env.setup(1)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.list(
                svc.ListModelVersionsRequest(parent=f"models/{MODEL}", state=42)  # type: ignore[arg-type]
            )
        assert field_of(exc.value) == "state"

    @pytest.mark.parametrize("count", [4, 5])
    async def test_pagination_walks_every_version_once(self, env: Env, count: int) -> None:
        """Pages of two walk all versions exactly once and in order, ending with no token."""
        await env.setup(count)
        pages: list[list[int]] = []
        token = ""
        for _ in range(count):
            resp = await env.reg.versions.list(svc.ListModelVersionsRequest(
                parent=f"models/{MODEL}", page_size=2, page_token=token
            ))
            pages.append([mv.version for mv in resp.model_versions])
            token = resp.next_page_token
            if not token:
                break
        assert token == ""
        assert [n for page in pages for n in page] == list(range(1, count + 1))
        assert all(len(page) == 2 for page in pages[:-1])

    async def test_filtered_pagination_walks_every_match_once(self, env: Env) -> None:
        """Pages of two under a state filter walk every matching version exactly once."""
        await env.setup(6)
        await env.promote("staging", 3)
        seen: list[int] = []
        token = ""
        for _ in range(6):
            resp = await env.reg.versions.list(svc.ListModelVersionsRequest(
                parent=f"models/{MODEL}", page_size=2, page_token=token,
                state=VS.VERSION_STATE_REGISTERED,
            ))
            seen.extend(mv.version for mv in resp.model_versions)
            token = resp.next_page_token
            if not token:
                break
        assert seen == [1, 2, 4, 5, 6]

    @pytest.mark.parametrize("token", ["bogus!", "Ym9ndXM=", "not base64 at all"])
    async def test_bogus_page_token_is_refused(self, env: Env, token: str) -> None:
        """A page token this listing did not hand out is refused, naming page_token."""
        await env.setup(1)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.list(
                svc.ListModelVersionsRequest(parent=f"models/{MODEL}", page_token=token)
            )
        assert field_of(exc.value) == "page_token"

    async def test_token_of_another_model_is_refused(self, env: Env) -> None:
        """A page token from one model's listing is not accepted for another model."""
        await env.setup(3)
        await env.create_model("churn")
        await env.create_version("churn")
        resp = await env.reg.versions.list(
            svc.ListModelVersionsRequest(parent=f"models/{MODEL}", page_size=1)
        )
        assert resp.next_page_token
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.list(svc.ListModelVersionsRequest(
                parent="models/churn", page_token=resp.next_page_token
            ))
        assert field_of(exc.value) == "page_token"


def _with(**changes: object) -> res.ModelVersion:
    mv = version_fields()
    for name, value in changes.items():
        if name == "tags":
            mv.tags.update(value)  # type: ignore[call-overload]
        elif name == "lineage":
            mv.lineage.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(mv, name, value)
    return mv


class TestValidation:
    @pytest.mark.parametrize(
        "model_id",
        ["", "a", "Fraud", "fraud_detector", "-fraud", "fraud-", "1fraud", "x" * 64, "fr aud"],
    )
    async def test_bad_model_id_is_refused(self, env: Env, model_id: str) -> None:
        """A model id that is not a 2-63 character lowercase slug is refused, unwritten."""
        with pytest.raises(InvalidArgumentError) as exc:
            await env.create_model(model_id)
        assert field_of(exc.value) == "model_id"
        assert env.store.commits == 0

    async def test_longest_model_id_is_accepted(self, env: Env) -> None:
        """A 63-character model id is within the limit."""
        model = await env.create_model("m" * 63)
        assert model.name == "models/" + "m" * 63

    @pytest.mark.parametrize(
        ("mv", "field"),
        [
            pytest.param(_with(sha256=digest(1).upper()), "model_version.sha256", id="upper"),
            pytest.param(_with(sha256=digest(1)[:63]), "model_version.sha256", id="short"),
            pytest.param(_with(sha256="sha256:" + digest(1)), "model_version.sha256",
                         id="prefixed"),
            pytest.param(_with(sha256=""), "model_version.sha256", id="missing-digest"),
            pytest.param(_with(artifact_uri="models/fraud.bin"), "model_version.artifact_uri",
                         id="no-scheme"),
            pytest.param(_with(artifact_uri=""), "model_version.artifact_uri", id="no-uri"),
            pytest.param(_with(size_bytes=0), "model_version.size_bytes", id="zero-size"),
            pytest.param(_with(description="é" * 2049), "model_version.description",
                         id="description-4098-bytes"),
            pytest.param(_with(tags={f"k{i}": "v" for i in range(65)}), "model_version.tags",
                         id="65-tags"),
            pytest.param(_with(lineage=res.Lineage(dataset_sha256="abc")),
                         "model_version.lineage.dataset_sha256", id="dataset-digest"),
        ],
    )
    async def test_bad_version_field_is_named(
        self, env: Env, mv: res.ModelVersion, field: str
    ) -> None:
        """Each malformed version field is refused under its exact path, and nothing is written."""
        await env.create_model()
        commits = env.store.commits
        req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", model_version=mv)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.create(env.call("CreateModelVersion", req), req)
        assert [v.field for v in exc.value.violations] == [field]
        assert exc.value.metadata["field"] == field
        assert env.store.commits == commits
        assert (await env.model()).version_count == 0

    async def test_limits_themselves_are_accepted(self, env: Env) -> None:
        """A 4096-byte description and 64 tags are within the limits."""
        await env.create_model()
        mv = _with(description="a" * 4096, tags={f"k{i}": "v" for i in range(64)})
        req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", model_version=mv)
        resp = await env.reg.versions.create(env.call("CreateModelVersion", req), req)
        assert resp.model_version.version == 1

    async def test_every_bad_field_is_named_at_once(self, env: Env) -> None:
        """One error names every bad field of the request, not just the first."""
        await env.create_model()
        mv = _with(sha256="XYZ", artifact_uri="nowhere")
        req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", model_version=mv)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.versions.create(env.call("CreateModelVersion", req), req)
        fields = {v.field for v in exc.value.violations}
        assert fields == {"model_version.artifact_uri", "model_version.sha256"}

    @pytest.mark.parametrize(
        ("model", "field"),
        [
            (res.RegisteredModel(description="x" * 4097), "model.description"),
            (res.RegisteredModel(tags={f"k{i}": "v" for i in range(65)}), "model.tags"),
            (res.RegisteredModel(custom_stages=["latest"]), "model.custom_stages[0]"),
            (res.RegisteredModel(custom_stages=["canary", "staging"]), "model.custom_stages[1]"),
            (res.RegisteredModel(custom_stages=["Canary"]), "model.custom_stages[0]"),
        ],
    )
    async def test_bad_model_field_is_named(
        self, env: Env, model: res.RegisteredModel, field: str
    ) -> None:
        """Each malformed model field is refused under its exact path, and nothing is written."""
        req = svc.CreateModelRequest(model_id=MODEL, model=model)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.reg.models.create(env.call("CreateModel", req), req)
        assert [v.field for v in exc.value.violations] == [field]
        assert env.store.commits == 0

    async def test_overlong_reason_is_refused(self, env: Env) -> None:
        """A promotion reason over 1024 bytes is refused, naming reason, unwritten."""
        await env.setup(1)
        commits = env.store.commits
        with pytest.raises(InvalidArgumentError) as exc:
            await env.promote("staging", 1, reason="r" * 1025)
        assert field_of(exc.value) == "reason"
        assert env.store.commits == commits


class TestAudit:
    async def test_every_successful_mutation_writes_one_event(self, env: Env) -> None:
        """The audit trail has exactly one event per successful mutation, none for refusals."""
        successes = 0

        async def attempt(op: object) -> None:
            nonlocal successes
            try:
                await op  # type: ignore[misc]
            except (InvalidArgumentError, FailedPreconditionError, AlreadyExistsError,
                    NotFoundError, EtagMismatchError):
                return
            successes += 1

        await attempt(env.create_model())
        await attempt(env.create_model())  # duplicate
        await attempt(env.create_model("Bad"))  # invalid
        for n in (1, 2, 3):
            await attempt(env.create_version(n=n))
        await attempt(env.promote("production", 1))  # skips staging
        await attempt(env.promote("staging", 1))
        await attempt(env.promote("staging", 1))  # already there
        await attempt(env.promote("production", 1))
        await attempt(env.promote("staging", 2))
        await attempt(env.promote("production", 2))
        await attempt(env.rollback())
        await attempt(env.rollback())  # no candidate left
        await attempt(env.deprecate(3))
        await attempt(env.promote("staging", 3))  # deprecated
        assert successes == 10
        events = await env.audit()
        assert len(events) == successes
        assert len({e.name for e in events}) == successes
        assert events[0].action == res.AUDIT_ACTION_UPDATE_VERSION
        assert events[-1].action == res.AUDIT_ACTION_CREATE_MODEL

    async def test_event_shares_the_revision_of_its_change(self, env: Env) -> None:
        """A promotion's audit event records who, what, from, to and why at its own revision."""
        await env.setup(2)
        await env.to_production(1)
        await env.promote("staging", 2)
        resp = await env.promote("production", 2, reason="better AUC", actor="carol")
        event = (await env.audit())[0]
        assert event.revision == resp.revision
        assert event.actor == "carol"
        assert event.action == res.AUDIT_ACTION_PROMOTE
        assert event.resource == f"models/{MODEL}/stages/production"
        assert (event.model, event.stage) == (MODEL, "production")
        assert (event.from_value, event.to_value) == ("1", "2")
        assert event.reason == "better AUC"
        assert not event.hotfix

    async def test_filter_by_model(self, env: Env) -> None:
        """Filtering by model returns only that model's events."""
        await env.setup(2)
        await env.create_model("churn")
        await env.create_version("churn")
        churn = await env.audit(parent="models/churn")
        assert [e.action for e in churn] == [
            res.AUDIT_ACTION_CREATE_VERSION, res.AUDIT_ACTION_CREATE_MODEL
        ]
        assert all(e.model == "churn" for e in churn)
        assert len(await env.audit(parent=f"models/{MODEL}")) == 3

    async def test_filter_by_actor(self, env: Env) -> None:
        """Filtering by actor returns only the events that principal caused."""
        await env.create_model(actor="alice")
        await env.create_version(n=1, actor="bob")
        await env.create_version(n=2, actor="alice")
        await env.create_version(n=3, actor="bob")
        bob = await env.audit(actor="bob")
        assert [e.resource for e in bob] == [
            f"models/{MODEL}/versions/3", f"models/{MODEL}/versions/1"
        ]
        assert len(await env.audit(actor="alice")) == 2
        assert await env.audit(actor="mallory") == []

    async def test_filter_by_time_range(self) -> None:
        """A time range returns the events in [start_time, end_time), newest first."""
        env = Env(default_clock=True)
        await env.setup(3)
        events = list(reversed(await env.audit()))  # oldest first
        times = [e.time.ToNanoseconds() for e in events]
        assert times == sorted(set(times)), "events need distinct times for this test"
        start = timestamp_pb2.Timestamp()
        start.FromNanoseconds(times[1])
        end = timestamp_pb2.Timestamp()
        end.FromNanoseconds(times[3])
        window = await env.audit(start_time=start, end_time=end)
        assert [e.name for e in window] == [events[2].name, events[1].name]
        since = await env.audit(start_time=end)
        assert [e.name for e in since] == [events[3].name]

    async def test_inverted_time_range_is_refused(self, env: Env) -> None:
        """An end time not after the start time is refused, naming end_time."""
        ts = timestamp_pb2.Timestamp(seconds=1_800_000_000)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.audit(start_time=ts, end_time=ts)
        assert field_of(exc.value) == "end_time"

    async def test_event_time_follows_the_registry_clock(self, env: Env) -> None:
        """The audit event of a change is stamped by the registry's clock, like the change."""
        model = await env.create_model()
        event = (await env.audit())[0]
        assert event.time == model.create_time
