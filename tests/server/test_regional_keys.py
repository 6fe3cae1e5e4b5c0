"""Where a regional server finds each key: pure routing, no etcd."""

from __future__ import annotations

from modelreg.replication import layout
from modelreg.server.domain import keys
from modelreg.server.store.regional_keys import PRIMARY_HELD, REGION_HELD, Source, segments, source


class TestRouting:
    def test_every_family_the_replicator_skips_has_a_home(self):
        """The families kept out of the replica are exactly the region's and the primary's own,
        so no key is read from a replica that never receives it.
        """
        assert {f.encode() for f in REGION_HELD + PRIMARY_HELD} == set(layout.LOCAL_FAMILIES)
        assert source(keys.node("n1")) is Source.REGION
        assert source(keys.pin("m", "s")) is source(keys.local_audit(1, 2)) is Source.REGION
        assert source(keys.request("r1")) is Source.PRIMARY
        for key in (keys.model("m"), keys.stage("m", "s"), keys.version("m", 1), "nodes"):
            assert source(key) is Source.REPLICA

    def test_a_range_splits_where_its_source_changes(self):
        """A range crossing region-local families is cut at their bounds, in key order, and a
        range inside one family stays whole.
        """
        assert segments("a", "z") == [
            (Source.REPLICA, "a", "localaudit/"), (Source.REGION, "localaudit/", "localaudit0"),
            (Source.REPLICA, "localaudit0", "nodes/"), (Source.REGION, "nodes/", "nodes0"),
            (Source.REPLICA, "nodes0", "pins/"), (Source.REGION, "pins/", "pins0"),
            (Source.REPLICA, "pins0", "requests/"), (Source.PRIMARY, "requests/", "requests0"),
            (Source.REPLICA, "requests0", "z"),
        ]
        assert segments("nodes/a", "nodes/b") == [(Source.REGION, "nodes/a", "nodes/b")]
        assert segments("stages/", "stages0") == [(Source.REPLICA, "stages/", "stages0")]
        assert segments("m", "nodes/x") == [(Source.REPLICA, "m", "nodes/"),
                                            (Source.REGION, "nodes/", "nodes/x")]
