"""How healthy one region's fleet is on a committed version, against a rollout guard's thresholds.

Pure, like :mod:`modelreg.server.domain.readiness`: the fleet domain reads the region's live
node reports (``nodes/``, region-local) and hands them here; the rollout coordinator asks every
region for this summary while a guarded rollout bakes (``FleetService.GetRegionHealth``) and
decides from it (:mod:`modelreg.server.domain.guard`). The rules (``RolloutGuard``):

* **live**: nodes whose report follows the stage and serves the committed version; nodes still
  on another version (not yet switched, or refusing it) say nothing about the version's health;
* a node **breaches** a figure when it reports a value above the guard's maximum; a node that
  does not report the figure does not breach it (the guard acts on evidence only);
* a figure **breaches** in the region when at least ``node_fraction`` (0 means 0.5) of the live
  nodes breach it, and always at least one node; the region breaches when some figure does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res

DEFAULT_NODE_FRACTION = 0.5
EPSILON = 1e-9
"""Slack in fraction comparisons (0.7 of 10 nodes needs 7, not 8)."""


def fraction_of(node_fraction: float) -> float:
    """The guard's node fraction in force: 0 (unset) means 0.5."""
    return node_fraction if node_fraction > 0 else DEFAULT_NODE_FRACTION


def needed(live: int, node_fraction: float) -> int:
    """How many of ``live`` nodes must breach a figure for the region to breach: at least 1."""
    return max(1, math.ceil(fraction_of(node_fraction) * live - EPSILON))


def region_health(
    region: str,
    stage_name: str,
    version: int,
    guard: res.RolloutGuard,
    nodes: Iterable[fs.Node],
) -> res.RegionHealth:
    """The health of ``region``'s nodes serving ``version`` of ``stage_name``, per guarded figure.

    ``nodes`` are the region's live node reports; a node listing the stage twice counts once,
    by its first entry. Figures come in name order; a figure's worst value is the highest
    reported (0 and no node when none reports it).
    """
    live = 0
    figures = {name: res.FigureHealth(figure=name, max_value=guard.max_values[name])
               for name in sorted(guard.max_values)}
    for node in nodes:
        served = next((s for s in node.stages if s.stage == stage_name), None)
        if served is None or served.serving_version != version:
            continue
        live += 1
        for name, figure in figures.items():
            if name not in served.health:
                continue
            value = served.health[name]
            if not math.isfinite(value):
                continue  # never stored (reports are validated); ignored rather than trusted
            figure.reporting_nodes += 1
            if value > figure.max_value:
                figure.breaching_nodes += 1
            if figure.reporting_nodes == 1 or value > figure.worst_value:
                figure.worst_value, figure.worst_node = value, f"nodes/{node.node_id}"
    need = needed(live, guard.node_fraction)
    for figure in figures.values():
        figure.breached = live > 0 and figure.breaching_nodes >= need
    return res.RegionHealth(
        region=region,
        live_nodes=live,
        figures=list(figures.values()),
        breached=any(f.breached for f in figures.values()),
    )
