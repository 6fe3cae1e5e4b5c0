"""The CLI's text for rollouts: one rollout's details, a stage's list, and progress lines.

The tables follow the rules of :mod:`modelreg.client._render`. A progress line is what
``modelreg promote`` and ``modelreg rollouts watch`` print each time a rollout changes: its
state and, per region, how many live nodes have prepared the target.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from google.protobuf import timestamp_pb2

from modelreg.client._render import (
    clip,
    details,
    enum_name,
    guard_text,
    table,
    version_label,
    when,
)
from modelreg.client._render_fleet import short_error
from modelreg.v1 import resources_pb2 as res


def state(rollout: res.Rollout) -> str:
    """``preparing``, ``committed`` or ``aborted``."""
    return enum_name(res.RolloutState.Name(rollout.state), "ROLLOUT_STATE_")


def kind(rollout: res.Rollout) -> str:
    """``promote`` or ``rollback``."""
    return enum_name(res.RolloutKind.Name(rollout.kind), "ROLLOUT_KIND_")


def _move(rollout: res.Rollout) -> str:
    return f"{version_label(rollout.from_version)} -> v{rollout.target_version}"


def region_cell(readiness: res.RegionReadiness) -> str:
    """``eu 3/4`` (ready of live nodes), ``eu ready 4/4``, or ``eu unreachable: ...``."""
    if readiness.error:
        return f"{readiness.region} {short_error(readiness.error, 60)}"
    counts = f"{readiness.ready_nodes}/{readiness.live_nodes}"
    if readiness.failed_nodes:
        counts += f" ({readiness.failed_nodes} failed)"
    return f"{readiness.region} {'ready ' if readiness.ready else ''}{counts}"


def progress_line(rollout: res.Rollout) -> str:
    """One line for a rollout's progress, e.g. ``preparing v7 -> v8: us ready 3/3, eu 1/2``."""
    head = f"{state(rollout)} {_move(rollout)}"
    if rollout.state == res.ROLLOUT_STATE_COMMITTED:
        line = f"{head}: committed at revision {rollout.commit_revision}; nodes switch at " \
               f"{_instant(rollout.activation_time)}"
        if rollout.HasField("guard"):
            line += f"; {guard_status(rollout)}"
        return line
    if rollout.state == res.ROLLOUT_STATE_ABORTED:
        return f"{head}: aborted: {clip(rollout.abort_reason, 200)}"
    waiting = [r for r in rollout.regions if r not in {x.region for x in rollout.readiness}]
    cells = [region_cell(x) for x in rollout.readiness] + [f"{r} not asked yet" for r in waiting]
    return f"{head}: {', '.join(cells) or 'no region asked yet'}"


def _instant(ts: timestamp_pb2.Timestamp) -> str:
    """Like ``when`` but to the millisecond, since activation times are that close."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "on receipt"
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def guard_status(rollout: res.Rollout, now_ns: int | None = None) -> str:
    """What the rollout guard did or does; "" without a guard.

    ``rolled back by its guard at T (.../rollouts/4)``, ``watching until T``, or ``watched
    until T; never fired``.
    """
    verdict = rollout.guard
    if rollout.HasField("guard"):
        if verdict.error:
            return (f"its guard fired at {_instant(verdict.fire_time)} but could not roll "
                    f"back: {verdict.error}")
        made = f" ({verdict.rollback})" if verdict.rollback else ""
        return f"rolled back by its guard at {_instant(verdict.fire_time)}{made}"
    guard = rollout.policy.guard
    if (not guard.max_values or rollout.kind != res.ROLLOUT_KIND_PROMOTE
            or rollout.state != res.ROLLOUT_STATE_COMMITTED):
        return ""
    bake_ns = guard.bake_window.ToNanoseconds() if guard.HasField("bake_window") else 600 * 10**9
    end = timestamp_pb2.Timestamp()
    end.FromNanoseconds(rollout.activation_time.ToNanoseconds() + bake_ns)
    now_ns = time.time_ns() if now_ns is None else now_ns
    if now_ns < end.ToNanoseconds():
        return f"watching until {_instant(end)}"
    return f"watched until {_instant(end)}; never fired"


def _health_rows(verdict: res.GuardVerdict) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for h in verdict.health:
        if h.error:
            rows.append((h.region, "", "", "", "", short_error(h.error)))
        for f in h.figures:
            worst = (f"{f.worst_value:g} ({f.worst_node.removeprefix('nodes/')})"
                     if f.reporting_nodes else "-")
            rows.append((h.region, f.figure, f"{f.max_value:g}",
                         f"{f.breaching_nodes}/{h.live_nodes}", worst,
                         "BREACHED" if f.breached else ""))
    return rows


def rollout_details(rollout: res.Rollout) -> str:
    """Every field of a rollout worth reading, then its per-region readiness table.

    With a guard that fired: its evidence, and each region's health on the look that fired.
    """
    head = details([
        ("name", rollout.name),
        ("state", state(rollout)),
        ("kind", kind(rollout)),
        ("move", _move(rollout)),
        ("regions", ", ".join(rollout.regions)),
        ("started", f"{when(rollout.create_time)} by {rollout.actor or '?'}"),
        ("reason", rollout.reason),
        ("hotfix", "yes" if rollout.hotfix else ""),
        ("deadline", when(rollout.deadline) if rollout.state == res.ROLLOUT_STATE_PREPARING
         else ""),
        ("activation", _instant(rollout.activation_time)
         if rollout.state == res.ROLLOUT_STATE_COMMITTED else ""),
        ("ended", when(rollout.end_time) if rollout.done else ""),
        ("aborted", rollout.abort_reason),
        ("cancelled by", rollout.cancelled_by),
        ("guard", guard_text(rollout.policy.guard).removeprefix("guard ")
         if rollout.policy.guard.max_values else ""),
        ("guard status", guard_status(rollout)),
        ("evidence", rollout.guard.evidence),
        ("breach since", _instant(rollout.guard.breach_start_time)
         if rollout.HasField("guard") else ""),
    ])
    text = head
    if rollout.readiness:
        rows = [
            (x.region, "yes" if x.ready else "no", x.ready_nodes, x.live_nodes, x.failed_nodes,
             short_error(x.error or _first_failure(x)))
            for x in rollout.readiness
        ]
        text += "\n\n" + table(("region", "ready", "prepared", "live", "failed", "error"), rows)
    if rollout.guard.health:
        text += "\n\n" + table(("region", "figure", "max", "breaching", "worst", ""),
                                _health_rows(rollout.guard))
    return text


def _first_failure(readiness: res.RegionReadiness) -> str:
    if not readiness.failures:
        return ""
    first = readiness.failures[0]
    return f"{first.node.removeprefix('nodes/')}: {first.error}"


def rollouts_table(rollouts: Iterable[res.Rollout]) -> str:
    """One row per rollout, newest first as listed: id, state, kind, move, who, when, why."""
    rows = [
        (r.name.rsplit("/", 1)[-1], state(r), kind(r), _move(r), r.actor, when(r.create_time),
         clip(r.abort_reason or r.reason, 80))
        for r in rollouts
    ]
    return table(("id", "state", "kind", "move", "by", "started", "reason"), rows)
