"""The layout contract and the commit planner, as pure functions (no etcd)."""

from __future__ import annotations

import pytest

import modelreg.replication
from modelreg.replication import AgentConfig, layout
from modelreg.replication.lag import LagTracker
from modelreg.replication.layout import Envelope, Kind, State, Status
from modelreg.replication.plan import KeyChange, Limits, Revision, chunks, next_commit

R = b"/modelreg/"


def rev(n: int, *keys: bytes, delete: bytes = b"", size: int = 1) -> Revision:
    changes = [KeyChange(k, Envelope(b"x" * size, n, 1, 1)) for k in keys]
    if delete:
        changes.append(KeyChange(delete, None))
    return Revision(n, tuple(changes))


class TestEncoding:
    def test_envelope_round_trips_any_value(self):
        """An envelope keeps the primary's bytes unchanged, empty and binary ones included."""
        for value in (b"", b"\x00\xff" * 100, b"x" * 100_000):
            env = Envelope(value, 2**40, 7, 3)
            assert Envelope.decode(env.encode()) == env
            assert len(env.encode()) == len(value) + layout.ENVELOPE_OVERHEAD

    def test_bad_envelopes_and_states_are_refused(self):
        """Bytes that are no envelope, state or status raise ValueError instead of decoding."""
        for bad in (b"", b"\x02" + bytes(30), b"\x01" + bytes(5)):
            with pytest.raises(ValueError, match="envelope"):
                Envelope.decode(bad)
        with pytest.raises(ValueError, match="state"):
            State.decode(b"\x01" + bytes(10))
        with pytest.raises(ValueError, match="status"):
            Status.decode(b"nope")

    def test_state_and_status_round_trip(self):
        """State and status decode to what was encoded."""
        state = State(3, 12345, Kind.SWITCHED, 2)
        assert State.decode(state.encode()) == state
        status = Status("eu-replica-0", 10, 12, 150, 1_700_000_000_000, 5000)
        assert Status.decode(status.encode()) == status

    def test_status_ages_only_once_overdue(self):
        """A status record's lag is taken as measured until two intervals pass; after that,
        its age adds up (nobody is applying).
        """
        status = Status("r", 10, 12, 300, 1000, 5000)
        assert status.seconds_behind(1000 + 9000) == 0.3
        assert status.seconds_behind(1000 + 20_000) == 20.3


class TestKeys:
    def test_keys_map_both_ways(self):
        """A primary key maps into a generation and back; another generation's key is refused."""
        regional = layout.regional_key(R, 5, b"stages/m/production")
        assert regional == b"/modelreg/replica/g/0000000000000005/stages/m/production"
        assert layout.primary_key(R, 5, regional) == b"stages/m/production"
        with pytest.raises(ValueError, match="generation 6"):
            layout.primary_key(R, 6, regional)

    def test_other_generations_cover_every_generation_but_one(self):
        """The garbage ranges hold every other generation's marker and data, never the
        current one's.
        """
        ranges = layout.other_generations(R, 0x1F)

        def covered(key: bytes) -> bool:
            return any(start <= key < end for start, end in ranges)

        for g in (0, 1, 0x1E, 0x20, 0xF0, 2**63):
            assert covered(layout.generation_key(R, g))
            assert covered(layout.regional_key(R, g, b"models/m"))
        assert not covered(layout.generation_key(R, 0x1F))
        assert not covered(layout.regional_key(R, 0x1F, b"\xff\xff"))
        assert not covered(layout.state_key(R)) and not covered(layout.leader_key(R))

    def test_local_families_are_not_replicated(self):
        """Node reports and idempotency records stay in their region; everything else goes,
        and a snapshot's ranges skip exactly the local families.
        """
        assert not layout.is_replicated(b"nodes/n1")
        assert not layout.is_replicated(b"requests/abc")
        for key in (b"models/m", b"stages/m/production", b"audit/1", b"nodesx", b"requestsx"):
            assert layout.is_replicated(key)
        ranges = layout.replicated_ranges(R)

        def read(key: bytes) -> bool:
            return any(start <= R + key < end for start, end in ranges)

        for key in (b"", b"audit/1", b"models/m", b"nodesx", b"requests0", b"versions/m/1",
                    b"\xff"):
            assert read(key) == layout.is_replicated(key)
        assert not read(b"nodes/n1") and not read(b"requests/abc")
        assert not any(start <= R[:-1] < end or start <= b"/modelreg0" < end
                       for start, end in ranges)


class TestPlan:
    def test_consecutive_revisions_share_a_commit(self):
        """Revisions with distinct keys go into one commit, up to the operation limit (one
        operation kept for the state).
        """
        pending = [rev(n, b"k%d" % n) for n in range(1, 301)]
        assert next_commit(pending, Limits(max_ops=128), 30) == 127
        assert next_commit(pending[:5], Limits(max_ops=128), 30) == 5

    def test_a_key_never_repeats_in_a_commit(self):
        """A second change of a key starts a new commit, so no primary revision is folded."""
        pending = [rev(1, b"a"), rev(2, b"b"), rev(3, b"a"), rev(4, b"c")]
        assert next_commit(pending, Limits(), 30) == 2

    def test_a_deleting_revision_ends_its_commit(self):
        """Deletes carry no revision of their own, so they are the commit's last revision."""
        pending = [rev(1, b"a"), rev(2, b"b", delete=b"c"), rev(3, b"d")]
        assert next_commit(pending, Limits(), 30) == 2
        assert next_commit(pending[2:], Limits(), 30) == 1

    def test_the_byte_budget_cuts_commits(self):
        """A commit stays within the byte budget, and a revision alone over it is reported
        oversized (0): it needs a new generation.
        """
        pending = [rev(n, b"k%d" % n, size=40_000) for n in range(1, 100)]
        n = next_commit(pending, Limits(max_bytes=1_000_000), 30)
        assert 0 < n < 26
        assert next_commit([rev(1, b"huge", size=2_000_000)], Limits(), 30) == 0
        assert next_commit([rev(1, *[b"k%d" % i for i in range(200)])], Limits(), 30) == 0

    def test_revisions_without_changes_cost_nothing(self):
        """Revisions that touched only local keys ride along for free."""
        pending = [Revision(n, ()) for n in range(1, 1000)]
        assert next_commit(pending, Limits(), 30) == 999

    def test_chunks_fit_limits(self):
        """A snapshot page is cut into Txns within both limits; a lone big item goes alone."""
        items = [(b"k%d" % i, b"v" * 10) for i in range(300)]
        groups = list(chunks(items, Limits(max_ops=128)))
        assert [len(g) for g in groups] == [127, 127, 46]
        assert [item for g in groups for item in g] == items
        big = [(b"a", b"x" * 2000), (b"b", b"x" * 5000), (b"c", b"x" * 10)]
        assert [len(g) for g in chunks(big, Limits(max_bytes=4096))] == [1, 1, 1]


class TestLagTracker:
    def test_lag_counts_from_the_oldest_pending_revision(self):
        """Seconds of lag run from when the oldest unapplied revision was heard of, and are
        zero once applied while the primary answers; revisions count what is unapplied.
        """
        now = [100.0]
        lag = LagTracker(live_window=3.0, clock=lambda: now[0])
        lag.heard(50)
        lag.applied_to(40)
        lag.pending(99.0)
        now[0] = 101.5
        assert lag.seconds() == 2.5 and lag.head - lag.applied == 10
        lag.applied_to(50)
        lag.pending(None)
        assert lag.seconds() == 0.0

    def test_a_silent_primary_shows_as_growing_lag(self):
        """With nothing pending but no answer from the primary, the lag is the time since it
        last answered.
        """
        now = [0.0]
        lag = LagTracker(live_window=3.0, clock=lambda: now[0])
        lag.heard(10)
        now[0] = 10.0
        assert not lag.connected() and lag.seconds() == 10.0


class TestConfig:
    def base(self, **kw) -> dict:
        return {"primary": "127.0.0.1:2379", "region_etcd": "127.0.0.2:2379", "region": "eu",
                **kw}

    def test_flags_override_the_environment(self):
        """Settings come from the environment, flags win, and lists are comma-separated."""
        env = {"MODELREG_PRIMARY_ETCD": "10.0.0.1:2379, 10.0.0.2:2379",
               "MODELREG_REGION_ETCD": "127.0.0.1:2379", "MODELREG_REGION": "us",
               "MODELREG_REPLICA_LEASE_TTL": "7", "MODELREG_REGION_ETCD_PASSWORD": "s3cret"}
        config = AgentConfig.from_sources({"region": "eu", "lease_ttl": None}, env)
        assert config.primary == ("10.0.0.1:2379", "10.0.0.2:2379")
        assert config.region == "eu" and config.lease_ttl == 7
        assert config.region_password == "s3cret" and "s3cret" not in repr(config)

    @pytest.mark.parametrize(("setting", "value"), [
        ("primary", ""), ("region_etcd", "nohost"), ("region", "EU"), ("region", ""),
        ("prefix", "modelreg"), ("region_prefix", "/x"), ("replica_id", "a/b"),
        ("lease_ttl", "1"), ("probe_interval", "0"), ("max_txn_ops", "1"),
        ("metrics_listen", "localhost"), ("log_level", "loud"), ("lease_ttl", "ten"),
    ])
    def test_bad_settings_are_named(self, setting, value):
        """A bad setting is refused with its name in the message."""
        with pytest.raises(ValueError, match=setting):
            AgentConfig.from_sources(self.base(**{setting: value}), {})

    def test_own_cluster_with_overlapping_prefixes_is_refused(self):
        """Replicating a cluster into itself under an overlapping prefix would copy its own
        writes forever: refused; a disjoint regional prefix is fine.
        """
        same = {"primary": "127.0.0.1:2379", "region_etcd": "127.0.0.1:2379", "region": "eu"}
        with pytest.raises(ValueError, match="region_prefix"):
            AgentConfig.from_sources(same, {})
        AgentConfig.from_sources({**same, "region_prefix": "/eu/"}, {})


class TestExports:
    def test_all_is_pinned(self):
        """__all__ lists exactly the documented public names."""
        assert sorted(modelreg.replication.__all__) == sorted([
            "AgentConfig", "AgentState", "Envelope", "Kind", "Lag", "LagSource", "Replicator",
            "State", "Status", "main", "register_metrics",
        ])
