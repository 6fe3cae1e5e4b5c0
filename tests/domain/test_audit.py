"""Domain rules of the audit trail written with every mutation.

Unit tests over the in-memory store: the rules pinned fast; the proof is the etcd suite.
"""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from modelreg.server.domain.errors import (
    AlreadyExistsError,
    EtagMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from modelreg.v1 import resources_pb2 as res
from tests.domain.env import (
    MODEL,
    Env,
    field_of,
)


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
