"""The rollout coordinator's rule: commit, abort (and why) or wait, from each region's readiness.

Pure, beside the readiness rules it builds on (:mod:`modelreg.server.domain.readiness`, whose
fraction arithmetic the regions use for their own ``ready`` flags): the coordinator
(``modelreg.server.rollout_coordinator``) gathers the readiness and applies the decision;
this module only says what it should be, and the abort's words, which the rollout record and
its audit event keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from google.protobuf import timestamp_pb2

from modelreg.server.domain import readiness as rules
from modelreg.server.domain.errors import clip
from modelreg.server.domain.validation import MAX_REASON
from modelreg.v1 import resources_pb2 as res


@dataclass(frozen=True)
class Decision:
    """What to do with a PREPARING rollout now."""

    action: Literal["wait", "commit", "abort"]
    reason: str = ""
    """Why it aborts (recorded in the rollout and its audit event), at most ``MAX_REASON``
    characters, as an operator's reason."""
    cause: Literal["", "failures", "deadline"] = ""
    """The abort's kind, for the coordinator's metric (which also counts ``lifecycle``: a
    commit the lifecycle rules refused, aborted by the domain)."""


def _format_time(ts: timestamp_pb2.Timestamp) -> str:
    return str(ts.ToJsonString())


def _first_error(r: res.RegionReadiness) -> str:
    if not r.failures:
        return ""
    first = r.failures[0]
    return f"; first error: {first.node}: {first.error or 'no error given'}"


def _not_ready(r: res.RegionReadiness | None, region: str, fraction: float) -> str:
    """One region's "why not ready", for an abort at the deadline."""
    if r is None:
        return f"{region}: not asked"
    if r.error:
        return f"{region}: {r.error}"
    text = (f"{region}: {r.ready_nodes} of {r.live_nodes} live nodes ready "
            f"(needs {rules.needed(r.live_nodes, fraction)})")
    if r.failed_nodes:
        text += f", {r.failed_nodes} failed{_first_error(r)}"
    return text


def decide(
    rollout: res.Rollout, readiness: Sequence[res.RegionReadiness], now_ns: int
) -> Decision:
    """The coordinator's rule for one PREPARING rollout, given each region's readiness now.

    Pure, so the rule is testable on its own; the order matters only for the wording (a region
    with too many failures cannot also meet the fraction). The fraction arithmetic is the
    domain's (``domain.readiness``), which the regions use for their ``ready`` flags too.
    """
    fraction = rules.fraction_of(rollout.policy.readiness_fraction)
    by_region = {r.region: r for r in readiness}
    for region in rollout.regions:
        r = by_region.get(region)
        if r is None or r.error or not rules.too_many_failed(r, fraction):
            continue
        allowed = r.live_nodes - rules.needed(r.live_nodes, fraction)
        return Decision("abort", clip(
            f"region {region}: {r.failed_nodes} of {r.live_nodes} live nodes failed to "
            f"prepare version {rollout.target_version}, more than the policy allows "
            f"(readiness fraction {fraction:g}: at most {allowed}){_first_error(r)}",
            MAX_REASON), "failures")
    ready = [region for region in rollout.regions
             if (r := by_region.get(region)) is not None and r.ready and not r.error]
    if len(ready) == len(rollout.regions):
        return Decision("commit")
    if rollout.HasField("deadline") and now_ns > rollout.deadline.ToNanoseconds():
        missing = [_not_ready(by_region.get(region), region, fraction)
                   for region in rollout.regions if region not in ready]
        return Decision("abort", clip(
            f"not ready by the deadline {_format_time(rollout.deadline)}: "
            + "; ".join(missing), MAX_REASON), "deadline")
    return Decision("wait")


def stage_of(rollout_name: str) -> str:
    """``models/m/stages/s`` of ``models/m/stages/s/rollouts/7``."""
    return rollout_name.rsplit("/rollouts/", 1)[0]
