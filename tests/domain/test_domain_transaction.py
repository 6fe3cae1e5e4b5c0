"""Domain unit tests of how mutations commit: idempotency, a lagging cache, races, contention.

Over the in-memory store only: fast and deterministic, not the proof against real etcd. A
``YieldingStore`` hands control to the event loop before every store call, so concurrent
tasks really interleave between their reads and their commits.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Sequence

import pytest
from google.protobuf.message import Message

from modelreg.server.domain import keys
from modelreg.server.domain.errors import (
    AbortedError,
    ContentionError,
    EtagMismatchError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from modelreg.server.domain.ports import (
    CommitResult,
    Entry,
    Guard,
    ModelStore,
    Page,
    Snapshot,
    Write,
)
from modelreg.server.domain.registry import Registry
from modelreg.server.domain.transaction import MAX_ATTEMPTS, Call
from modelreg.server.store.memory import MemoryStore
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res

SERVICE = "/modelreg.v1.ModelService/"
MODEL = "fraud"
STAGING_KEY = keys.stage(MODEL, "staging")


class YieldingStore:
    """A MemoryStore that yields to the event loop before every call, as a network would."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner

    async def read(self, keys: Sequence[str], *, fresh: bool) -> Snapshot:
        await asyncio.sleep(0)
        return await self.inner.read(keys, fresh=fresh)

    async def scan(self, start: str, end: str, *, limit: int, reverse: bool = False) -> Page:
        await asyncio.sleep(0)
        return await self.inner.scan(start, end, limit=limit, reverse=reverse)

    async def commit(
        self, guards: Sequence[Guard], writes: Sequence[Write], *, refresh: Sequence[str] = ()
    ) -> CommitResult:
        await asyncio.sleep(0)
        return await self.inner.commit(guards, writes, refresh=refresh)


class LosingStore:
    """A MemoryStore whose next ``losses`` commits fail as if another writer always got in first.

    Each lost commit returns a fresh read of the refreshed keys, as etcd's Txn else-branch does.
    """

    def __init__(self, inner: MemoryStore, losses: int) -> None:
        self.inner = inner
        self.losses = losses
        self.attempts = 0

    async def read(self, keys: Sequence[str], *, fresh: bool) -> Snapshot:
        return await self.inner.read(keys, fresh=fresh)

    async def scan(self, start: str, end: str, *, limit: int, reverse: bool = False) -> Page:
        return await self.inner.scan(start, end, limit=limit, reverse=reverse)

    async def commit(
        self, guards: Sequence[Guard], writes: Sequence[Write], *, refresh: Sequence[str] = ()
    ) -> CommitResult:
        self.attempts += 1
        if self.attempts <= self.losses:
            fresh = await self.inner.read(refresh, fresh=True)
            return CommitResult(False, self.inner.revision, fresh)
        return await self.inner.commit(guards, writes, refresh=refresh)


def digest(n: int) -> str:
    """A valid lowercase sha256 for artifact ``n``."""
    return hashlib.sha256(f"artifact-{n}".encode()).hexdigest()


class Env:
    """A registry over ``store`` (a MemoryStore, or a wrapper around ``memory``)."""

    def __init__(self, store: ModelStore | None = None, memory: MemoryStore | None = None) -> None:
        self.memory = memory or MemoryStore()
        self.reg = Registry.over(store or self.memory)

    @staticmethod
    def call(method: str, request: Message, actor: str = "alice") -> Call:
        return Call(actor=actor, method=SERVICE + method, request=request)

    async def setup(self, versions: int) -> None:
        """The model ``fraud`` with versions 1..``versions``."""
        req = svc.CreateModelRequest(model_id=MODEL)
        await self.reg.models.create(self.call("CreateModel", req), req)
        for n in range(1, versions + 1):
            await self.create_version(n)

    def version_request(self, n: int, request_id: str = "") -> svc.CreateModelVersionRequest:
        return svc.CreateModelVersionRequest(
            parent=f"models/{MODEL}",
            model_version=res.ModelVersion(
                artifact_uri=f"s3://models/fraud/{n}", sha256=digest(n), size_bytes=n
            ),
            request_id=request_id,
        )

    async def create_version(self, n: int, request_id: str = "") -> svc.CreateModelVersionResponse:
        req = self.version_request(n, request_id)
        return await self.reg.versions.create(self.call("CreateModelVersion", req), req)

    async def promote(
        self, stage: str, version: int, *, etag: str = "", request_id: str = "",
        actor: str = "alice",
    ) -> svc.PromoteVersionResponse:
        req = svc.PromoteVersionRequest(
            name=f"models/{MODEL}/stages/{stage}", version=version, etag=etag,
            request_id=request_id,
        )
        return await self.reg.stages.promote(self.call("PromoteVersion", req, actor), req)

    async def pointer(self, stage: str = "staging") -> res.StagePointer:
        req = svc.GetStageRequest(name=f"models/{MODEL}/stages/{stage}")
        return (await self.reg.stages.get(req)).stage

    async def audit(self) -> list[res.AuditEvent]:
        resp = await self.reg.audit.list(svc.ListAuditEventsRequest(page_size=1000))
        return list(resp.audit_events)


@pytest.fixture
def env() -> Env:
    """A registry over an empty in-memory store."""
    return Env()


class TestIdempotency:
    async def test_same_request_id_is_applied_once(self, env: Env) -> None:
        """A retried request_id gets the first response at its revision, and changes nothing."""
        await env.setup(1)
        commits = env.memory.commits
        first = await env.promote("staging", 1, request_id="deploy-42")
        again = await env.promote("staging", 1, request_id="deploy-42")
        assert env.memory.commits == commits + 1
        assert again == first
        assert again.revision == first.revision
        assert again.stage.etag == first.stage.etag
        assert (await env.pointer()).generation == 1
        events = await env.audit()
        assert [e.action for e in events].count(res.AUDIT_ACTION_PROMOTE) == 1
        assert events[0].request_id == "deploy-42"
        assert events[0].revision == first.revision

    async def test_replay_after_later_changes_returns_first_answer(self, env: Env) -> None:
        """A request_id retried after others moved the pointer replays, and moves nothing."""
        await env.setup(2)
        first = await env.promote("staging", 1, request_id="deploy-1")
        await env.promote("staging", 2)
        commits = env.memory.commits
        again = await env.promote("staging", 1, request_id="deploy-1")
        assert again == first
        assert env.memory.commits == commits
        assert (await env.pointer()).version == 2

    async def test_create_version_retry_registers_one_version(self, env: Env) -> None:
        """A version registration retried with its request_id is numbered and stored once."""
        await env.setup(0)
        first = await env.create_version(1, request_id="ci-run-7")
        again = await env.create_version(1, request_id="ci-run-7")
        assert again == first
        assert first.model_version.version == 1
        model = await env.reg.models.get(svc.GetModelRequest(name=f"models/{MODEL}"))
        assert model.model.version_count == 1

    async def test_request_id_reused_for_other_request_is_refused(self, env: Env) -> None:
        """Reusing a request_id with different content is refused, naming request_id."""
        await env.setup(2)
        await env.promote("staging", 1, request_id="deploy-1")
        commits = env.memory.commits
        with pytest.raises(InvalidArgumentError) as exc:
            await env.promote("staging", 2, request_id="deploy-1")
        assert exc.value.violations[0].field == "request_id"
        assert exc.value.metadata["field"] == "request_id"
        assert env.memory.commits == commits
        assert (await env.pointer()).version == 1

    async def test_request_id_reused_by_other_method_is_refused(self, env: Env) -> None:
        """A request_id is bound to its method: another RPC with it is refused."""
        req = svc.CreateModelRequest(model_id=MODEL, request_id="shared")
        await env.reg.models.create(env.call("CreateModel", req), req)
        with pytest.raises(InvalidArgumentError) as exc:
            await env.create_version(1, request_id="shared")
        assert exc.value.violations[0].field == "request_id"

    async def test_replay_found_even_when_cache_misses_the_record(self, env: Env) -> None:
        """A retry whose idempotency record the cache has not seen yet still replays."""
        await env.setup(1)
        first = await env.promote("staging", 1, request_id="deploy-1")
        env.memory.stale[keys.request("deploy-1")] = None
        commits = env.memory.commits
        again = await env.promote("staging", 1, request_id="deploy-1")
        assert again == first
        assert env.memory.commits == commits

    async def test_concurrent_retries_apply_once(self) -> None:
        """Many concurrent sends of one request_id register one version and all get it."""
        memory = MemoryStore()
        env = Env(YieldingStore(memory), memory)
        await env.setup(0)
        replies = await asyncio.gather(
            *(env.create_version(1, request_id="ci-run-9") for _ in range(8))
        )
        assert {r.model_version.version for r in replies} == {1}
        assert len({r.revision for r in replies}) == 1
        model = await env.reg.models.get(svc.GetModelRequest(name=f"models/{MODEL}"))
        assert model.model.version_count == 1
        assert len(await env.audit()) == 2


class TestStaleCache:
    async def _staging_moved(self, env: Env) -> tuple[svc.PromoteVersionResponse, Entry]:
        """Staging went 1 → 2, and the cache still holds the pointer at 1."""
        await env.setup(3)
        await env.promote("staging", 1)
        old = env.memory.data[STAGING_KEY]
        current = await env.promote("staging", 2)
        env.memory.stale[STAGING_KEY] = old
        return current, old

    async def test_current_etag_wins_over_stale_cache(self, env: Env) -> None:
        """A caller with the current etag succeeds even though the cache shows an older one."""
        current, _ = await self._staging_moved(env)
        resp = await env.promote("staging", 3, etag=current.stage.etag)
        assert resp.stage.version == 3
        assert resp.stage.previous_version == 2
        assert list(resp.stage.rollback_candidates) == [2, 1]

    async def test_stale_pointer_costs_a_retry_not_a_wrong_move(self, env: Env) -> None:
        """Deciding on a stale pointer fails the commit; the retry decides on the real one."""
        await self._staging_moved(env)
        failed = env.memory.failed_commits
        resp = await env.promote("staging", 3)
        assert env.memory.failed_commits == failed + 1
        assert resp.stage.previous_version == 2
        assert resp.stage.generation == 3
        assert list(resp.stage.former_versions) == [1, 2]

    async def test_violation_seen_only_in_cache_is_rechecked(self, env: Env) -> None:
        """A rule broken only in stale data (version already in stage) does not refuse the call."""
        await env.setup(3)
        await env.promote("staging", 2)
        old = env.memory.data[STAGING_KEY]
        await env.promote("staging", 3)
        env.memory.stale[STAGING_KEY] = old  # the cache says staging already has 2
        resp = await env.promote("staging", 2)
        assert resp.stage.version == 2
        assert resp.stage.previous_version == 3

    async def test_version_missing_from_cache_is_found_fresh(self, env: Env) -> None:
        """A version the cache has not seen yet is promoted, not reported NOT_FOUND."""
        await env.setup(1)
        env.memory.stale[keys.version(MODEL, 1)] = None
        resp = await env.promote("staging", 1)
        assert resp.stage.version == 1

    async def test_stale_etag_is_refused_even_if_cache_agrees(self, env: Env) -> None:
        """A caller's stale etag is refused with the store's current etag, not the cache's."""
        current, old = await self._staging_moved(env)
        first_etag = f'"{old.mod_revision}"'
        with pytest.raises(EtagMismatchError) as exc:
            await env.promote("staging", 3, etag=first_etag)
        assert exc.value.current_etag == current.stage.etag

    async def test_violation_hidden_by_cache_is_still_refused(self, env: Env) -> None:
        """A stale cache that hides a rule violation cannot let the change through."""
        await self._staging_moved(env)  # truth: staging has 2; cache: staging has 1
        commits = env.memory.commits
        with pytest.raises(FailedPreconditionError) as exc:
            await env.promote("staging", 2)
        assert exc.value.reason == "ALREADY_IN_STAGE"
        assert env.memory.commits == commits
        assert env.memory.failed_commits >= 1


class TestConcurrency:
    async def test_one_of_many_same_etag_promotions_wins(self) -> None:
        """Of many promotions racing on one etag, exactly one lands; the rest get ETAG_MISMATCH."""
        memory = MemoryStore()
        env = Env(YieldingStore(memory), memory)
        await env.setup(9)
        base = await env.promote("staging", 1)
        events_before = len(await env.audit())
        results = await asyncio.gather(
            *(env.promote("staging", n, etag=base.stage.etag) for n in range(2, 10)),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, svc.PromoteVersionResponse)]
        losses = [r for r in results if isinstance(r, EtagMismatchError)]
        assert len(wins) == 1
        assert len(losses) == len(results) - 1
        assert memory.failed_commits >= 1, "the tasks did not actually race"
        assert all(e.current_etag == wins[0].stage.etag for e in losses)
        pointer = await env.pointer()
        assert pointer.version == wins[0].stage.version
        assert pointer.generation == 2
        assert len(await env.audit()) - events_before == len(wins)

    async def test_racing_promotions_without_etag_all_land_in_order(self) -> None:
        """Promotions without an etag are serialised: each lands once, in one unbroken chain."""
        memory = MemoryStore()
        env = Env(YieldingStore(memory), memory)
        await env.setup(6)
        results = await asyncio.gather(*(env.promote("staging", n) for n in range(1, 7)))
        assert sorted(r.stage.generation for r in results) == [1, 2, 3, 4, 5, 6]
        history = await env.reg.stages.history(
            svc.ListStageHistoryRequest(name=f"models/{MODEL}/stages/staging")
        )
        chain = list(reversed(history.entries))
        assert [e.generation for e in chain] == [1, 2, 3, 4, 5, 6]
        assert chain[0].from_version == 0
        for before, after in itertools.pairwise(chain):
            assert after.from_version == before.to_version
        assert sorted(e.to_version for e in chain) == [1, 2, 3, 4, 5, 6]
        promotions = [e for e in await env.audit() if e.action == res.AUDIT_ACTION_PROMOTE]
        assert len(promotions) == 6

    async def test_racing_registrations_get_distinct_numbers(self) -> None:
        """Concurrent version registrations get the numbers 1..n, each exactly once."""
        memory = MemoryStore()
        env = Env(YieldingStore(memory), memory)
        await env.setup(0)
        replies = await asyncio.gather(*(env.create_version(n) for n in range(1, 11)))
        assert sorted(r.model_version.version for r in replies) == list(range(1, 11))
        model = await env.reg.models.get(svc.GetModelRequest(name=f"models/{MODEL}"))
        assert model.model.version_count == 10
        by_number = {r.model_version.version: r.model_version.sha256 for r in replies}
        for number, sha in by_number.items():
            got = await env.reg.versions.get(
                svc.GetModelVersionRequest(name=f"models/{MODEL}/versions/{number}")
            )
            assert got.model_version.sha256 == sha
        assert len(await env.audit()) == 11


class TestContention:
    async def test_gives_up_after_max_attempts(self) -> None:
        """When every commit loses, the call fails with CONTENTION after MAX_ATTEMPTS tries."""
        memory = MemoryStore()
        await Env(memory=memory).setup(1)
        commits = memory.commits
        store = LosingStore(memory, losses=10**6)
        env = Env(store, memory)
        with pytest.raises(ContentionError) as exc:
            await env.promote("staging", 1)
        assert isinstance(exc.value, AbortedError)
        assert exc.value.reason == "CONTENTION"
        assert store.attempts == MAX_ATTEMPTS
        assert memory.commits == commits
        assert STAGING_KEY not in memory.data

    async def test_last_attempt_still_counts(self) -> None:
        """A commit that wins on the last allowed attempt succeeds."""
        memory = MemoryStore()
        await Env(memory=memory).setup(1)
        store = LosingStore(memory, losses=MAX_ATTEMPTS - 1)
        env = Env(store, memory)
        resp = await env.promote("staging", 1)
        assert resp.stage.version == 1
        assert store.attempts == MAX_ATTEMPTS
