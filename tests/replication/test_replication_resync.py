"""Resync after compaction: the primary compacted past what the region applied, while its
replicator was down. The region switches to a fresh copy in one step, deletions included.
"""

from __future__ import annotations

import asyncio

from aetcd import rpc

from modelreg.replication import Kind, Replicator, layout
from tests.replication.region_env import (
    Writer,
    check_history,
    check_invariants,
    config,
    converged,
    reading,
    region_history,
    region_keyspace,
)


async def generations(c, prefix: bytes) -> set[int]:
    """The generations present in the regional etcd (current, being built, or not yet
    collected).
    """
    root = layout.generations_root(prefix)
    resp = await c.kvstub.Range(rpc.RangeRequest(key=root, range_end=layout.prefix_end(root),
                                                 keys_only=True))
    digits = layout.GENERATION_DIGITS
    return {int(bytes(kv.key)[len(root):len(root) + digits], 16) for kv in resp.kvs}


class TestResync:
    async def test_compaction_while_down_resyncs_without_a_mixture(self, pair, clients, prefix):
        """Writes and deletions made while the replicator was down, then compacted away on the
        primary, reach the region as one switch: a reader polling all along only ever sees a
        state every primary Txn could have left, and the old copy is deleted after.
        """
        p, r = clients
        key_prefix = prefix.encode()
        writer = Writer(p, key_prefix)
        await writer.setup()
        cfg = config(*pair, prefix)
        async with reading(r, key_prefix) as reader:
            async with Replicator(cfg):
                await writer.run(60)
                before, old_keys = await converged(p, r, key_prefix)
            k = b"k/"
            deleted = {key for key in old_keys if key.startswith((k, b"r/", b"set/m/"))}
            assert deleted, "the writer left nothing to delete"
            await writer.txn([rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=key_prefix + k, range_end=layout.prefix_end(key_prefix + k)))])
            await writer.run(80)  # more deletions among them (set members, r/)
            compacted = (await p.kvstub.Range(rpc.RangeRequest(key=b"\0", count_only=True))
                         ).header.revision
            await p.kvstub.Compact(rpc.CompactionRequest(revision=compacted, physical=True))
            state, stale = await region_keyspace(r, key_prefix)
            assert state == before and stale == old_keys  # nothing moved while it was down
            async with Replicator(cfg) as replicator:
                after, keys = await converged(p, r, key_prefix)
                assert replicator.lag().resyncs == 1
            # The reader polls on its own schedule: let it take a sample of the new copy (on a
            # loaded machine the region converges before its next read).
            async with asyncio.timeout(30):
                while after.generation not in reader.generations:
                    await asyncio.sleep(0.01)
        assert after.kind is Kind.RESYNCED and after.generation > before.generation
        assert after.applied >= compacted
        check_invariants(keys, after.applied)
        assert deleted - set(keys), "no deletion made while down was checked"
        assert await generations(r, key_prefix) == {after.generation}
        check_history(await region_history(r, key_prefix), key_prefix)
        assert {before.generation, after.generation} <= reader.generations

    async def test_a_build_cut_short_is_never_switched_to(self, pair, clients, prefix):
        """A generation left half-built (its builder died) is collected by the next leader, and
        the region still converges on a complete copy.
        """
        p, r = clients
        key_prefix = prefix.encode()
        writer = Writer(p, key_prefix)
        await writer.setup()
        cfg = config(*pair, prefix)
        async with Replicator(cfg):
            await writer.run(10)
            state, _ = await converged(p, r, key_prefix)
        # What a builder that died after its marker and first pages leaves behind.
        orphan = state.generation + 1
        await r.put(layout.generation_key(key_prefix, orphan), b"dead-builder/0")
        await r.put(layout.regional_key(key_prefix, orphan, b"k/zz"), b"half")
        async with reading(r, key_prefix), Replicator(cfg):
            await writer.run(10)
            await writer.big()  # needs a new generation: built from scratch, orphan or not
            after, keys = await converged(p, r, key_prefix)
        assert after.generation > state.generation
        assert await generations(r, key_prefix) == {after.generation}
        assert b"k/zz" not in keys or keys[b"k/zz"].value != b"half"
