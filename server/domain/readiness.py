"""How ready one region is for a rollout's target, from that region's own node reports.

Pure: the fleet domain reads the region's live node reports (``nodes/``, region-local) and
hands them here; the rollout coordinator asks every region for this summary and decides from
it. The rules (issue 9):

* **live**: nodes whose report follows the stage (a ``ServedStage`` naming it); a node that
  died is no longer reported (its lease expired), so it counts nowhere;
* **ready**: of those, nodes that prepared the target (``prepared_version``) or already serve
  it (``serving_version``);
* **failed**: of the others, nodes whose last failure is the target (``failed_version``);
* the region is **ready** when it has no live node following the stage, or when
  ``ready / live`` reaches the policy's readiness fraction (0 means 1: every node);
* the rollout cannot succeed in a region once more nodes failed than ``1 - fraction`` of its
  live nodes allows (``too_many_failed``): the coordinator aborts then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res

MAX_FAILURES = 20
"""Failed nodes listed with their errors per region (the counts cover them all)."""
MAX_FAILURE_ERROR = 512
"""Characters of one node's error kept in a failure (reports allow 1024)."""
EPSILON = 1e-9
"""Slack in fraction comparisons, so 0.7 of 10 nodes needs 7 (not 8, as 0.7*10 = 7.000...1)."""


def fraction_of(readiness_fraction: float) -> float:
    """The policy's readiness fraction in force: 0 (unset) means 1, every node."""
    return readiness_fraction if readiness_fraction > 0 else 1.0


def needed(live: int, readiness_fraction: float) -> int:
    """How many of ``live`` nodes must be ready for the region to be."""
    return math.ceil(fraction_of(readiness_fraction) * live - EPSILON)


def too_many_failed(readiness: res.RegionReadiness, readiness_fraction: float) -> bool:
    """Whether more nodes failed than the policy allows: ``failed > (1 - fraction) * live``.

    Then the region cannot become ready (unless failed nodes recover), so the rollout aborts.
    """
    allowed = (1.0 - fraction_of(readiness_fraction)) * readiness.live_nodes
    return readiness.failed_nodes > allowed + EPSILON


def region_readiness(
    region: str,
    stage_name: str,
    version: int,
    readiness_fraction: float,
    nodes: Iterable[fs.Node],
) -> res.RegionReadiness:
    """The readiness of ``region`` for ``version`` of ``stage_name`` (``models/m/stages/s``).

    ``nodes`` are the region's live node reports; every node following the stage counts, since
    a region's reports are its own (``nodes/`` is region-held). A node listing the stage twice
    counts once, by its first entry.
    """
    live = ready = failed = 0
    failures: list[res.NodeFailure] = []
    for node in nodes:
        served = next((s for s in node.stages if s.stage == stage_name), None)
        if served is None:
            continue
        live += 1
        if version in (served.prepared_version, served.serving_version):
            ready += 1
        elif served.failed_version == version:
            failed += 1
            if len(failures) < MAX_FAILURES:
                failures.append(res.NodeFailure(node=f"nodes/{node.node_id}",
                                                error=served.error[:MAX_FAILURE_ERROR]))
    return res.RegionReadiness(
        region=region,
        live_nodes=live,
        ready_nodes=ready,
        failed_nodes=failed,
        failures=failures,
        ready=live == 0 or ready >= needed(live, readiness_fraction),
    )
