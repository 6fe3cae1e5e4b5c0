"""A region's readiness for a rollout's target, from node reports (pure)."""

from __future__ import annotations

import pytest

from modelreg.server.domain import readiness as rd
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res

STAGE = "models/fraud/stages/production"


def node(node_id: str, stage: str = STAGE, **served: object) -> fs.Node:
    return fs.Node(node_id=node_id, stages=[fs.ServedStage(stage=stage, **served)])  # type: ignore[arg-type]


class TestRegionReadiness:
    def test_no_live_node_means_ready(self) -> None:
        r = rd.region_readiness("eu", STAGE, 2, 1.0, [node("x", stage="models/fraud/stages/s")])
        assert (r.region, r.live_nodes, r.ready_nodes, r.failed_nodes, r.ready) == (
            "eu", 0, 0, 0, True)

    def test_prepared_or_serving_counts_as_ready(self) -> None:
        nodes = [node("a", serving_version=1, prepared_version=2), node("b", serving_version=2),
                 node("c", serving_version=1)]
        r = rd.region_readiness("eu", STAGE, 2, 0, nodes)
        assert (r.live_nodes, r.ready_nodes, r.ready) == (3, 2, False)
        assert rd.region_readiness("eu", STAGE, 2, 0.6, nodes).ready

    @pytest.mark.parametrize(("fraction", "live", "needed"), [
        (0, 10, 10), (1.0, 10, 10), (0.7, 10, 7), (0.5, 3, 2), (0.01, 3, 1), (0.9, 1, 1)])
    def test_needed(self, fraction: float, live: int, needed: int) -> None:
        assert rd.needed(live, fraction) == needed

    def test_failures_are_counted_and_listed_up_to_twenty(self) -> None:
        nodes = [node(f"n{i}", serving_version=1, failed_version=2, error=f"e{i}" + "x" * 900)
                 for i in range(25)]
        nodes.append(node("old", serving_version=1, failed_version=1, error="older failure"))
        r = rd.region_readiness("eu", STAGE, 2, 1.0, nodes)
        assert (r.live_nodes, r.failed_nodes, len(r.failures)) == (26, 25, rd.MAX_FAILURES)
        assert r.failures[0].node == "nodes/n0"
        assert len(r.failures[0].error) == rd.MAX_FAILURE_ERROR

    def test_a_node_ready_after_failing_counts_as_ready(self) -> None:
        r = rd.region_readiness("eu", STAGE, 2, 1.0, [
            node("a", prepared_version=2, failed_version=2, error="first try")])
        assert (r.ready_nodes, r.failed_nodes, r.ready) == (1, 0, True)

    @pytest.mark.parametrize(("fraction", "live", "failed", "too_many"), [
        (1.0, 10, 1, True), (0, 10, 1, True), (0.9, 10, 1, False), (0.9, 10, 2, True),
        (0.7, 10, 3, False), (0.5, 0, 0, False)])
    def test_too_many_failed(self, fraction: float, live: int, failed: int,
                             too_many: bool) -> None:
        r = res.RegionReadiness(live_nodes=live, failed_nodes=failed)
        assert rd.too_many_failed(r, fraction) is too_many
