"""Domain rules of versions: registration, immutability, annotations.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite.
"""

from __future__ import annotations

import pytest

from modelreg.server.domain.errors import (
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.v1 import model_service_pb2 as svc
from tests.domain.env import (
    MODEL,
    VS,
    Env,
    digest,
    field_of,
    version_fields,
)


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
