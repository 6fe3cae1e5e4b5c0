"""The coordinator's rule for one preparing rollout (``rollout_decision.decide``), on its own.

Pure: a rollout record and each region's readiness in, commit / abort (with its reason) / wait
out. The coordinator's loop, election and the regions it asks are tested against real servers
in ``tests/server/test_rollout_coordinator.py``.
"""

from __future__ import annotations

from modelreg.server.domain.rollout_decision import decide, stage_of
from modelreg.v1 import resources_pb2 as res

NAME = "models/m/stages/production/rollouts/3"
DEADLINE_NS = 1_000_000_000_000


def rollout(fraction: float = 0.0, regions: tuple[str, ...] = ("us", "eu")) -> res.Rollout:
    """A PREPARING rollout of version 7 to ``regions`` with a deadline at ``DEADLINE_NS``."""
    r = res.Rollout(name=NAME, state=res.ROLLOUT_STATE_PREPARING, target_version=7,
                    regions=regions, policy=res.RolloutPolicy(readiness_fraction=fraction))
    r.deadline.FromNanoseconds(DEADLINE_NS)
    return r


def region(name: str, live: int = 10, ready: int = 10, failed: int = 0, *, ok: bool | None = None,
           error: str = "", failures: tuple[tuple[str, str], ...] = ()) -> res.RegionReadiness:
    """A region's answer; ``ok`` defaults to what the counts say at fraction 1."""
    return res.RegionReadiness(
        region=name, live_nodes=live, ready_nodes=ready, failed_nodes=failed,
        ready=(ready == live) if ok is None else ok, error=error,
        failures=[res.NodeFailure(node=n, error=e) for n, e in failures])


BEFORE, AFTER = DEADLINE_NS - 1, DEADLINE_NS + 1


class TestDecide:
    def test_every_region_ready_commits(self):
        """Both regions ready: commit, before the deadline or after it."""
        for now in (BEFORE, AFTER):
            assert decide(rollout(), [region("us"), region("eu")], now).action == "commit"

    def test_a_region_not_ready_waits_until_the_deadline(self):
        """One region short of its fraction: wait while there is time."""
        assert decide(rollout(), [region("us"), region("eu", ready=9)], BEFORE).action == "wait"

    def test_the_deadline_aborts_naming_the_regions_not_ready_and_why(self):
        """Past the deadline the abort names each region not ready: counts, or its error."""
        decision = decide(rollout(regions=("us", "eu", "ap")), [
            region("us"), region("eu", ready=3, failed=0),
            region("ap", ok=False, error="region ap is unreachable: 10.0.0.1:1: transient_failure"),
        ], AFTER)
        assert (decision.action, decision.cause) == ("abort", "deadline")
        assert "us:" not in decision.reason
        assert "eu: 3 of 10 live nodes ready (needs 10)" in decision.reason
        assert "ap: region ap is unreachable: 10.0.0.1:1: transient_failure" in decision.reason

    def test_a_region_that_answered_an_error_is_never_ready(self):
        """An error with a ready flag (a confused answer) still does not commit."""
        answers = [region("us"), region("eu", ok=True, error="region eu has not yet replicated")]
        assert decide(rollout(), answers, BEFORE).action == "wait"

    def test_a_region_missing_from_the_answers_is_not_ready(self):
        """Only the regions asked count: a region with no answer blocks the commit."""
        assert decide(rollout(), [region("us")], BEFORE).action == "wait"
        assert "eu: not asked" in decide(rollout(), [region("us")], AFTER).reason

    def test_one_failure_at_fraction_one_aborts_with_the_first_error(self):
        """At fraction 1 (the default) any failed node aborts, quoting the first error."""
        decision = decide(rollout(), [region("us"), region(
            "eu", ready=9, failed=1, failures=(("nodes/eu-3", "sha256 mismatch"),))], BEFORE)
        assert (decision.action, decision.cause) == ("abort", "failures")
        assert decision.reason == (
            "region eu: 1 of 10 live nodes failed to prepare version 7, more than the policy "
            "allows (readiness fraction 1: at most 0); first error: nodes/eu-3: sha256 mismatch")

    def test_failures_within_the_fraction_do_not_abort(self):
        """Fraction 0.9 allows 1 failed node of 10 (no float surprise), not 2."""
        allowed = [region("us"), region("eu", ready=9, failed=1, ok=True)]
        assert decide(rollout(0.9), allowed, BEFORE).action == "commit"
        too_many = [region("us"), region("eu", ready=8, failed=2, ok=False)]
        decision = decide(rollout(0.9), too_many, BEFORE)
        assert (decision.action, decision.cause) == ("abort", "failures")
        assert "2 of 10" in decision.reason and "at most 1" in decision.reason

    def test_a_region_with_no_live_nodes_never_aborts_for_failures(self):
        """No live node following the stage: nothing can have failed (the region is ready)."""
        assert decide(rollout(), [region("us"), region("eu", 0, 0, 0, ok=True)],
                      BEFORE).action == "commit"

    def test_a_long_reason_is_clipped_to_an_operators_length(self):
        """Many regions' long errors make a reason no longer than an operator's may be."""
        regions = tuple(f"r{i}" for i in range(10))
        answers = [region(r, ok=False, error="x" * 500) for r in regions]
        reason = decide(rollout(regions=regions), answers, AFTER).reason
        assert len(reason) <= 1024 and reason.endswith("...")

    def test_no_regions_commits(self):
        """A rollout that names no region waits for nobody."""
        assert decide(rollout(regions=()), [], BEFORE).action == "commit"

    def test_stage_of_a_rollout(self):
        """The stage a rollout's name belongs to."""
        assert stage_of(NAME) == "models/m/stages/production"
