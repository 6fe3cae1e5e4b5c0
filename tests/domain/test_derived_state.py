"""Domain rules of derived version states (registered, staging, production, archived, deprecated).

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite.
"""

from __future__ import annotations

from tests.domain.env import (
    VS,
    Env,
)


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
