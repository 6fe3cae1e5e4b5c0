"""Domain rules of models: create, update, delete and their refusals.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite.
"""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2

from modelreg.server.domain.errors import (
    AlreadyExistsError,
    EtagMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.domain.env import (
    MODEL,
    Env,
    field_of,
)


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
