"""The regional store under the domain: mutations made through a region commit on the primary,
and what a region reads agrees with the primary in etags and revisions; idempotency records,
node reports and read-your-writes live where the layout says.
"""

from __future__ import annotations

import aetcd
import pytest
from aetcd import rpc

from modelreg.replication import Replicator, layout
from modelreg.server.domain import keys
from modelreg.server.domain.errors import UnavailableError
from modelreg.server.domain.fleet import Fleet
from modelreg.server.domain.ports import Put
from modelreg.server.store.etcd import EtcdStore
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as svc
from tests.domain.env import MODEL, version_fields
from tests.replication.region_env import client, config
from tests.replication.regional_env import StoreEnv, regional


async def views(env: StoreEnv) -> list[object]:
    """Every read of the model the servicers offer, through one registry."""
    reg, model = env.reg, f"models/{MODEL}"
    return [
        await reg.models.get(svc.GetModelRequest(name=model)),
        await reg.models.list(svc.ListModelsRequest()),
        await reg.versions.get(svc.GetModelVersionRequest(name=f"{model}/versions/1")),
        await reg.versions.list(svc.ListModelVersionsRequest(parent=model)),
        await reg.stages.get(svc.GetStageRequest(name=f"{model}/stages/production")),
        await reg.stages.list(svc.ListStagesRequest(parent=model)),
        await reg.stages.history(svc.ListStageHistoryRequest(name=f"{model}/stages/production")),
        await reg.audit.list(svc.ListAuditEventsRequest(page_size=100)),
    ]


async def keys_under(etcd_client: aetcd.Client, prefix: bytes) -> list[bytes]:
    """Every key of one cluster under ``prefix``."""
    resp = await etcd_client.kvstub.Range(rpc.RangeRequest(
        key=prefix, range_end=layout.prefix_end(prefix), keys_only=True))
    return [bytes(kv.key) for kv in resp.kvs]


class TestRegistryOverRegion:
    async def test_promotions_through_a_region_commit_on_the_primary(self, pair, prefix):
        """A model, versions and promotions to production made through a registry over a
        RegionalStore are committed on the primary, and every read through the region returns
        what the same read through an EtcdStore on the primary returns, etags and revisions
        included.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        direct = EtcdStore([primary.endpoint], prefix)
        try:
            async with Replicator(config(primary, region, prefix)):
                await store.wait_applied(1)
                env = StoreEnv(store)
                await env.setup(2)
                await env.to_production(1)
                await env.promote("staging", 2)
                promoted = await env.promote("production", 2)
                through_region = await views(StoreEnv(store))
                through_primary = await views(StoreEnv(direct))
        finally:
            await store.close()
            await direct.close()
        assert through_region == through_primary
        stage = through_primary[4]
        assert stage.stage.version == 2 and stage.stage.etag == f'"{promoted.revision}"'
        assert stage.revision == promoted.revision  # nothing was written since
        async with client(primary) as p:
            on_primary = await keys_under(p, prefix.encode())
        assert prefix.encode() + keys.stage(MODEL, "production").encode() in on_primary

    async def test_a_retried_request_is_answered_from_the_primary_record(self, pair, prefix):
        """A request id retried through the region gets the first answer back and makes no
        second version: its idempotency record is written with the mutation on the primary, and
        read there, never in the regional etcd.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        try:
            async with Replicator(config(primary, region, prefix)):
                await store.wait_applied(1)
                env = StoreEnv(store)
                await env.create_model()
                req = svc.CreateModelVersionRequest(parent=f"models/{MODEL}", request_id="once",
                                                    model_version=version_fields(1))
                call = env.call("CreateModelVersion", req)
                first = await env.reg.versions.create(call, req)
                again = await env.reg.versions.create(call, req)
                assert again == first
                assert (await env.model()).version_count == 1
        finally:
            await store.close()
        record = (prefix + keys.request("once")).encode()
        async with client(primary) as p, client(region) as r:
            assert record in await keys_under(p, prefix.encode())
            assert not [k for k in await keys_under(r, prefix.encode())
                        if b"requests/" in k]


class TestRegionLocalKeys:
    async def test_node_reports_stay_in_their_region(self, pair, prefix):
        """A node report through a regional store lands in the regional etcd under the region's
        prefix, on a lease, and never on the primary; the fleet view lists it, answering with
        the region's applied primary revision; deleting it removes it from the region.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        fleet = Fleet(store)
        node = fs.Node(node_id="n1", region="eu")
        try:
            async with Replicator(config(primary, region, prefix)):
                await store.wait_applied(1)
                reported = await fleet.report(fs.ReportNodeRequest(node=node, ttl_seconds=30))
                applied = (await store.state()).applied
                listed = await fleet.list(fs.ListNodesRequest())
                async with client(primary) as p, client(region) as r:
                    local = (prefix + keys.node("n1")).encode()
                    kv = (await r.kvstub.Range(rpc.RangeRequest(key=local))).kvs
                    assert kv and kv[0].lease != 0
                    assert local not in await keys_under(p, prefix.encode())
                    deleted = await fleet.delete(fs.DeleteNodeRequest(name="nodes/n1"))
                    assert not (await r.kvstub.Range(rpc.RangeRequest(key=local))).kvs
        finally:
            await store.close()
        assert reported.revision == applied == listed.revision
        assert [n.node_id for n in listed.nodes] == ["n1"]
        assert deleted.revision == applied

    async def test_a_commit_may_not_touch_region_local_keys(self, pair, prefix):
        """A commit runs on the primary, so one that would write a node report is refused and
        writes nothing.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        try:
            with pytest.raises(ValueError, match="live in the region"):
                await store.commit([], [Put("models/m", b"1"), Put(keys.node("n1"), b"x")])
        finally:
            await store.close()
        async with client(primary) as p:
            assert await keys_under(p, prefix.encode()) == []


class TestMixedReads:
    async def test_a_scan_reads_each_family_from_its_home_in_key_order(self, pair, prefix):
        """A scan across replicated keys, node reports (regional etcd) and idempotency records
        (primary) returns them in key order, page by page with ``more`` right at every bound,
        forwards and in reverse, at the region's applied revision.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        direct = EtcdStore([primary.endpoint], prefix)
        replicated = ["a/1", "m/1", "o/1", "s/1"]
        try:
            async with Replicator(config(primary, region, prefix)):
                await store.wait_applied(1)
                await store.commit([], [Put(k, k.encode()) for k in replicated])
                await store.put_ephemeral(keys.node("n1"), b"node", 30)
                record = await direct.commit([], [Put(keys.request("r1"), b"rec", ttl=60)])
                await store.wait_applied(record.revision)
                every = sorted([*replicated, keys.node("n1"), keys.request("r1")])
                for reverse in (False, True):
                    want = sorted(every, reverse=reverse)
                    whole = await store.scan("a", "z", limit=0, reverse=reverse)
                    assert [e.key for e in whole.entries] == want and not whole.more
                    for size in range(1, len(want) + 1):
                        page = await store.scan("a", "z", limit=size, reverse=reverse)
                        assert [e.key for e in page.entries] == want[:size]
                        assert page.more == (size < len(want))
                        assert page.revision == whole.revision >= record.revision
        finally:
            await store.close()
            await direct.close()

    async def test_a_record_newer_than_the_region_waits_for_it(self, pair, prefix):
        """A read of an idempotency record that the region has not caught up with waits until
        it has, so the answer is one revision; past the bound it fails naming the region's
        applied revision.
        """
        primary, region = pair
        store = regional(primary, region, prefix, wait_timeout=0.3)
        direct = EtcdStore([primary.endpoint], prefix)
        cfg = config(primary, region, prefix)
        wanted = ["models/m", keys.request("r1")]
        try:
            async with Replicator(cfg):
                await store.wait_applied(1)
            written = await direct.commit([], [Put("models/m", b"1"),
                                               Put(keys.request("r1"), b"rec", ttl=60)])
            with pytest.raises(UnavailableError, match="applied the primary up to"):
                await store.read(wanted, fresh=True)
            store.wait_timeout = 60
            async with Replicator(cfg):
                snap = await store.read(wanted, fresh=True)
        finally:
            await store.close()
            await direct.close()
        assert snap.revision >= written.revision
        assert [snap.get(k).mod_revision for k in wanted] == [written.revision] * 2


class TestReadYourWrites:
    async def test_waiting_for_a_revision_the_region_lacks_names_what_it_has(self, pair,
                                                                             prefix):
        """With the replicator down, waiting for a revision committed on the primary fails
        after the bound, naming the region's applied revision; with it back, the same wait
        returns once the region has applied the revision, and reads then see the write.
        """
        primary, region = pair
        store = regional(primary, region, prefix, wait_timeout=0.3)
        direct = EtcdStore([primary.endpoint], prefix)
        cfg = config(primary, region, prefix)
        try:
            async with Replicator(cfg):
                before = await store.wait_applied(1)
            written = (await direct.commit([], [Put("models/m", b"1")])).revision
            with pytest.raises(UnavailableError) as err:
                await store.wait_applied(written)
            assert err.value.metadata["applied_revision"] == str(before)
            assert err.value.metadata["revision"] == str(written)
            assert f"up to revision {before}, not yet {written}" in err.value.message
            assert (await store.read(["models/m"], fresh=True)).get("models/m") is None
            async with Replicator(cfg):
                assert await store.wait_applied(written, timeout=60) >= written
                snap = await store.read(["models/m"], fresh=True)
        finally:
            await store.close()
            await direct.close()
        assert snap.revision >= written and snap.get("models/m").mod_revision == written

    async def test_a_commit_while_the_region_stalls_still_returns(self, pair, prefix):
        """A commit through a region whose replicator is down is durable on the primary: it
        returns its revision after the bounded wait rather than an error.
        """
        primary, region = pair
        store = regional(primary, region, prefix, wait_timeout=0.2)
        try:
            async with Replicator(config(primary, region, prefix)):
                await store.wait_applied(1)
            result = await store.commit([], [Put("models/m", b"1")])
            assert result.succeeded
        finally:
            await store.close()
        async with client(primary) as p:
            got = await p.get((prefix + "models/m").encode())
        assert got is not None and got.mod_revision == result.revision


class TestAvailability:
    async def test_a_region_without_its_first_copy_is_unavailable(self, pair, prefix):
        """Before the replicator's first copy, reads and watches answer UNAVAILABLE, saying
        so, rather than an empty registry.
        """
        primary, region = pair
        store = regional(primary, region, prefix)
        try:
            with pytest.raises(UnavailableError, match="first copy"):
                await store.read(["models/m"], fresh=True)
            with pytest.raises(UnavailableError, match="first copy"):
                await store.scan("models/", "models0", limit=0)
        finally:
            await store.close()

    async def test_without_the_primary_reads_go_on_and_commits_fail(self, pair, prefix):
        """With the primary stopped, the region still answers reads at its applied revision,
        and a commit fails UNAVAILABLE naming the primary's endpoint.
        """
        primary, region = pair
        store = regional(primary, region, prefix, timeout=1.0)
        try:
            async with Replicator(config(primary, region, prefix)):
                await store.wait_applied(1)
                written = (await store.commit([], [Put("models/m", b"1")])).revision
            primary.stop()
            snap = await store.read(["models/m"], fresh=True)
            with pytest.raises(UnavailableError) as err:
                await store.commit([], [Put("models/m", b"2")])
        finally:
            await store.close()
        assert snap.revision == written and snap.get("models/m").value == b"1"
        assert err.value.metadata["endpoint"] == primary.endpoint
