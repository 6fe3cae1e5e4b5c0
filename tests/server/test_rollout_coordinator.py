"""The rollout coordinator over real regions: it commits a governed promotion only once every
region's nodes have prepared it, aborts at the deadline or on failures beyond the policy, one
coordinator acts among several, and a successor finishes what a stopped or killed one started.

``us`` (the primary, whose servers run coordinators) and ``eu`` (its own etcd, a real
replicator, a regional server) as in ``rollout_env``; serving nodes are ``ReportNode`` calls
through each region's server. Tests wait on the rollout record (a bound, never a timing).
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, ActorStub, start_server
from tests.helpers import on_each_etcd_build as etcd_server  # noqa: F401 (a fixture)
from tests.server.forward_env import address
from tests.server.rollout_env import (
    FAST,
    STAGE,
    Regions,
    aborted,
    committed,
    eu_etcd,  # noqa: F401 (a fixture)
    regions,
    until,
)
from tests.up_process import MODELREG, end_pid

COMMITTED = res.ROLLOUT_STATE_COMMITTED
ABORTED = res.ROLLOUT_STATE_ABORTED
SECOND = duration_pb2.Duration(seconds=1)


def readiness(rollout: res.Rollout) -> dict[str, res.RegionReadiness]:
    """The rollout's recorded readiness, by region."""
    return {r.region: r for r in rollout.readiness}


async def recorded(env: Regions, name: str, check: object) -> res.Rollout:
    """Waits until the record's readiness satisfies ``check(by_region)``; the record then."""
    assert callable(check)

    async def seen() -> res.Rollout | None:
        r = await env.rollout(name)
        return r if check(readiness(r)) else None
    return await until(seen, f"{name}'s readiness as expected")


async def nodes(env: Regions, *, us: int = 2, eu: int = 1, **served: object) -> None:
    """``us`` nodes report through the front us server (or the first running), ``eu`` through
    eu's.
    """
    us_server = env.front or next(s for s in env.us if s in env.started)
    for i in range(1, us + 1):
        await env.report(us_server, f"us-{i}", "us", **served)
    assert env.eu is not None
    for i in range(1, eu + 1):
        await env.report(env.eu, f"eu-{i}", "eu", **served)


async def child_answers(target: str) -> bool:
    """Whether the server at ``target`` answers a read."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await ActorStub(channel, "alice").ListModels(svc.ListModelsRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
    return True


async def counted(condition: object) -> None:
    """Waits for a metric: the coordinator counts once its commit or abort call returned,
    which may be just after the record shows it (a regional store returns once its region
    applied the commit).
    """
    await until(condition, "the coordinator's metric")  # type: ignore[arg-type]


async def coordinator_events(env: Regions) -> list[res.AuditEvent]:
    """The model's audit events by the coordinator."""
    resp = await env.models().ListAuditEvents(svc.ListAuditEventsRequest(
        parent=f"models/{MODEL}", actor="modelreg-coordinator"))
    return list(resp.audit_events)


class TestCommit:
    async def test_commits_once_every_region_has_prepared(self, etcd_server, eu_etcd,
                                                          etcd_prefix, tmp_path):
        """With us prepared and eu not, the rollout stays PREPARING (readiness recorded, the
        pointer unmoved); once eu's node prepares too, the coordinator commits: the pointer
        names the target and the rollout, with an activation time, audited as a PROMOTE by the
        coordinator, counted once.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            await env.governed_model()
            await nodes(env)
            name = await env.promote(1)
            await nodes(env, eu=0, prepared_version=1, rollout=name)
            waiting = await recorded(env, name, lambda r: (
                "us" in r and r["us"].ready and r["us"].ready_nodes == 2
                and "eu" in r and not r["eu"].ready and r["eu"].live_nodes == 1
                and not r["eu"].error))
            assert waiting.state == res.ROLLOUT_STATE_PREPARING
            pointer = await env.pointer()
            assert (pointer.version, pointer.pending_version, pointer.pending_rollout) == (
                0, 1, name)

            await nodes(env, us=0, prepared_version=1, rollout=name)
            done = await env.settled(name)
            assert done.state == COMMITTED, done.abort_reason
            assert readiness(done)["eu"].ready
            pointer = await env.pointer()
            assert (pointer.version, pointer.rollout, pointer.pending_version) == (1, name, 0)
            assert pointer.activation_time.ToNanoseconds() > 0
            assert [(e.action, e.rollout) for e in await coordinator_events(env)] == [
                (res.AUDIT_ACTION_PROMOTE, name)]
            await counted(lambda: committed(env.us[0]) == 1)

    async def test_a_deployment_of_one_region_commits_on_its_own_nodes(
            self, etcd_server, etcd_prefix):
        """Without a topology the server's own region ("default") is the only one: its nodes'
        readiness, asked in-process, is what the commit waits for.
        """
        server = await start_server(etcd_server.endpoint, etcd_prefix, **FAST)
        env = Regions(etcd_server.endpoint, "", etcd_prefix, Path(), [], "", us=[server],
                      started=[server])
        try:
            await env.governed_model()
            await env.report(server, "n1", "")
            name = await env.promote(1)
            await recorded(env, name, lambda r: "default" in r and not r["default"].ready)
            await env.report(server, "n1", "", prepared_version=1, rollout=name)
            done = await env.settled(name)
            assert done.state == COMMITTED, done.abort_reason
            assert list(done.regions) == ["default"]
            assert (await env.pointer()).version == 1
        finally:
            await env.close()


class TestAbort:
    async def test_the_deadline_aborts_naming_the_region_not_ready(self, etcd_server, eu_etcd,
                                                                   etcd_prefix, tmp_path):
        """With us prepared and eu's node never: at the deadline the rollout aborts, naming eu and
        its counts (not us); the pointer never moved and no longer names a pending rollout.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            await env.governed_model(prepare_deadline=SECOND)
            await nodes(env)
            name = await env.promote(1)
            await nodes(env, eu=0, prepared_version=1, rollout=name)
            done = await env.settled(name)
            assert done.state == ABORTED
            assert "not ready by the deadline" in done.abort_reason
            assert "eu: 0 of 1 live nodes ready (needs 1)" in done.abort_reason
            assert "us:" not in done.abort_reason
            pointer = await env.pointer()
            assert (pointer.version, pointer.pending_rollout) == (0, "")
            assert [e.action for e in await coordinator_events(env)] == [
                res.AUDIT_ACTION_ABORT_ROLLOUT]
            await counted(lambda: aborted(env.us[0], "deadline") == 1)
            assert committed(env.us[0]) == 0

    async def test_failures_beyond_the_fraction_abort_with_the_first_error(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """At readiness fraction 0.5, one failed node of two in us is allowed; two of two in eu
        are not: the rollout aborts at once (long before its deadline), naming eu, the counts
        and eu's first error.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            await env.governed_model(readiness_fraction=0.5)
            await nodes(env, eu=2)
            name = await env.promote(1)
            assert env.eu is not None
            await env.report(env.us[0], "us-1", "us", prepared_version=1, rollout=name)
            await env.report(env.us[0], "us-2", "us", failed_version=1, rollout=name,
                             error="loader: out of memory")
            for node in ("eu-1", "eu-2"):
                await env.report(env.eu, node, "eu", failed_version=1, rollout=name,
                                 error="sha256 mismatch")
            done = await env.settled(name)
            assert done.state == ABORTED
            assert done.abort_reason.startswith(
                "region eu: 2 of 2 live nodes failed to prepare version 1")
            assert "first error: nodes/eu-1: sha256 mismatch" in done.abort_reason
            assert (await env.pointer()).version == 0
            await counted(lambda: aborted(env.us[0], "failures") == 1)


class TestAsking:
    async def test_a_dead_server_of_a_region_is_skipped(self, etcd_server, eu_etcd,
                                                        etcd_prefix, tmp_path):
        """The topology lists a dead eu server before the live one: the coordinator fails
        over to the live one, and eu's readiness carries no error; the rollout commits.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path,
                           dead_eu=(address(),)) as env:
            await env.governed_model()
            await nodes(env)
            name = await env.promote(1)
            await nodes(env, prepared_version=1, rollout=name)
            done = await env.settled(name)
            assert done.state == COMMITTED, done.abort_reason
            assert not readiness(done)["eu"].error and readiness(done)["eu"].ready


class TestNeverWithoutEveryRegion:
    async def test_an_unreachable_region_blocks_the_commit_until_the_deadline_aborts(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """Every node prepared, but eu's server is down: the coordinator never commits (the
        pointer stays put throughout), and the deadline aborts naming eu as unreachable.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            await env.governed_model(prepare_deadline=duration_pb2.Duration(seconds=2))
            await nodes(env, prepared_version=1)
            assert env.eu is not None
            await env.stop(env.eu)
            name = await env.promote(1)
            moved: list[int] = []

            async def watch_pointer() -> None:
                while True:
                    pointer = await env.pointer()
                    if pointer.version != 0:
                        moved.append(pointer.version)
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch_pointer())
            try:
                done = await env.settled(name)
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            assert done.state == ABORTED
            assert moved == [] and (await env.pointer()).version == 0
            assert "eu: region eu is unreachable" in done.abort_reason
            assert "unreachable" in readiness(done)["eu"].error
            assert readiness(done)["us"].ready

    async def test_a_region_that_has_not_replicated_the_rollout_is_not_ready(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """With eu's replicator stopped before the promotion, eu's server answers that it has not
        applied the rollout's revision, so eu is not ready (however its nodes report) and the
        deadline aborts saying so.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path) as env:
            await env.governed_model(prepare_deadline=duration_pb2.Duration(seconds=2))
            await nodes(env, prepared_version=1)
            await env.stop_replicator()
            name = await env.promote(1)
            done = await env.settled(name)
            assert done.state == ABORTED
            assert "eu: region eu has not yet replicated the rollout" in done.abort_reason
            assert (await env.pointer()).version == 0


class TestElection:
    async def test_two_coordinators_one_acts(self, etcd_server, eu_etcd, etcd_prefix,
                                             tmp_path):
        """Two us servers run coordinators: one holds the leader key and leads, the other
        follows; the rollout is committed once, by the leader.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path, us_servers=2) as env:
            await env.governed_model()
            await nodes(env)
            assert env.leaders() == [] and await env.leader_key() is None  # nothing to do yet
            name = await env.promote(1)
            leaders = await until(env.leaders, "a leader")
            assert len(leaders) == 1
            holder = await env.leader_key()
            assert holder is not None and holder.endswith(leaders[0].app.address)
            await nodes(env, prepared_version=1, rollout=name)
            done = await env.settled(name)
            assert done.state == COMMITTED, done.abort_reason
            assert env.leaders() == leaders
            await counted(lambda: committed(leaders[0]) == 1)
            assert [committed(s) for s in env.us] == [
                1 if s is leaders[0] else 0 for s in env.us]
            assert len(await coordinator_events(env)) == 1

    async def test_the_leader_stopped_mid_prepare_its_successor_commits(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """The leading server stops while the rollout prepares (it resigns); the other us
        server takes over from etcd alone and commits once eu is ready.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path, us_servers=2) as env:
            await env.governed_model()
            await nodes(env)
            name = await env.promote(1)
            (leader,) = await until(env.leaders, "a leader")
            await nodes(env, eu=0, prepared_version=1, rollout=name)
            await recorded(env, name, lambda r: "us" in r and r["us"].ready)
            await env.stop(leader)
            (successor,) = await until(env.leaders, "a successor")
            assert successor is not leader
            await nodes(env, us=0, prepared_version=1, rollout=name)
            done = await env.settled(name)
            assert done.state == COMMITTED, done.abort_reason
            await counted(lambda: committed(successor) == 1)
            assert committed(leader) == 0

    async def test_the_leader_process_sigkilled_mid_prepare_its_successor_commits(
            self, etcd_server, eu_etcd, etcd_prefix, tmp_path):
        """The leader is a ``modelreg serve`` child process, SIGKILLed while the rollout
        prepares (its lease is left to lapse): the in-process us server takes over and
        commits; the rollout is committed once, the pointer moved once.
        """
        child_listen = address()
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path, start=False,
                           extra_us=(child_listen,)) as env:
            await env.start_replicator()
            log_path = tmp_path / "child.log"
            with log_path.open("wb") as log:
                child = await asyncio.create_subprocess_exec(
                    MODELREG, "serve", "--etcd", etcd_server.endpoint, "--prefix", etcd_prefix,
                    "--listen", child_listen, "--metrics-listen", "", "--topology",
                    str(env.topology), "--region", "us", "--rollout-interval", "0.05",
                    "--coordinator-lease", "2", "--log-format", "json", "--grace", "0",
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
            try:
                # The child is the only us server when the rollout starts: it leads.
                env.front = child_listen
                async def serving() -> bool:
                    assert child.returncode is None, "the child exited"
                    return await child_answers(child_listen)
                await until(serving, "the child serving")
                await env.start_eu()
                await env.governed_model()
                await nodes(env)
                name = await env.promote(1)
                holder = await until(env.leader_key, "the child leads")
                assert holder.endswith(child_listen), holder
                await nodes(env, eu=0, prepared_version=1, rollout=name)
                await recorded(env, name, lambda r: "us" in r and r["us"].ready)
                await env.start_us(env.us_listens[0])
                assert env.leaders() == []
                os.kill(child.pid, signal.SIGKILL)
                await child.wait()
                env.front = ""  # the in-process us server from now on
                await nodes(env, us=0, prepared_version=1, rollout=name)
                done = await env.settled(name)
                assert done.state == COMMITTED, done.abort_reason
                await counted(lambda: committed(env.us[0]) == 1)
                assert env.leaders() == env.us
                assert len(await coordinator_events(env)) == 1
                history = await env.models().ListStageHistory(
                    svc.ListStageHistoryRequest(name=STAGE))
                assert [h.to_version for h in history.entries] == [1]
            except BaseException:
                print(log_path.read_text()[-5000:])
                raise
            finally:
                end_pid(child.pid)
                await child.wait()


class TestPlacement:
    async def test_on_outside_the_primary_off_in_it(self, etcd_server, eu_etcd, etcd_prefix,
                                                    tmp_path):
        """``--coordinator off`` on the us server runs none there; ``on`` on the eu server runs
        one that elects through the primary etcd, asks us over gRPC and eu in-process, and
        commits through its regional store.
        """
        async with regions(etcd_server, eu_etcd, etcd_prefix, tmp_path, start=False) as env:
            await env.start_replicator()
            us = await env.start_us(env.us_listens[0], coordinator="off")
            eu = await env.start_eu(coordinator="on")
            assert us.app.coordinator is None
            await env.governed_model()
            await nodes(env)
            name = await env.promote(1)
            assert await until(env.leaders, "eu leads") == [eu]
            await nodes(env, prepared_version=1, rollout=name)
            done = await env.settled(name)
            assert done.state == COMMITTED, done.abort_reason
            await counted(lambda: committed(eu) == 1)
            assert (await env.pointer()).version == 1
