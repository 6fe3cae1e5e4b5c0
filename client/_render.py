"""Pure helpers of the CLI: parsing ``k=v``, times and etags, and rendering resources as text.

The fleet's and ``watch``'s text is in :mod:`modelreg.client._render_fleet`. Every table follows
the same rules, so ``awk``/``cut`` work on any of them: every column has a header; an empty cell
prints ``-``; a version prints ``v5``; free text (description, reason, a node's error) only in
the last column, and lists are joined by ``,`` without spaces; etags without their quotes
(``11``), as ``--json`` prints them and ``--etag`` takes them.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from google.protobuf import timestamp_pb2

from modelreg.client._json import to_json as to_json  # re-exported: the commands' JSON
from modelreg.client._json import unquote_etag as unquote_etag  # re-exported: the commands use it
from modelreg.client._json import valid_time
from modelreg.v1 import resources_pb2 as res

_CLIP = 48
"""Longest free-text cell (description, reason) shown in a table."""


def parse_key_value(text: str) -> tuple[str, str]:
    """Parse ``key=value`` (the value may contain ``=``); an argparse ``type``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_metric(text: str) -> tuple[str, float]:
    """Parse ``name=number``; an argparse ``type``."""
    key, value = parse_key_value(text)
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"metric {key!r}: {value!r} is not a number") from None


def parse_guard(text: str) -> tuple[str, float]:
    """Parse ``FIGURE<=MAX`` (``error_rate<=0.05``), a rollout guard's threshold.

    An argparse ``type``; the server checks the figure's name.
    """
    figure, sep, value = text.partition("<=")
    figure = figure.strip()
    if not sep or not figure:
        raise argparse.ArgumentTypeError(
            f"expected FIGURE<=MAX (e.g. error_rate<=0.05), got {text!r}")
    try:
        return figure, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"guard {figure!r}: {value.strip()!r} is not a number") from None


def parse_etag(text: str) -> str:
    """Accept an etag as tables print it (``"11"``) or as the shell leaves it (``11``).

    The server's etags are quoted (AIP-154); a bare number gets its quotes back, so
    ``--etag 11`` and ``--etag '"11"'`` mean the same. Anything else goes to the server as is.
    """
    if not text:
        raise argparse.ArgumentTypeError("an etag is not empty")
    return f'"{text}"' if text.isdigit() else text


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 date or time (``2024-05-01``, ``...T12:00:00Z``); naive is local."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None


def file_digest(path: Path) -> tuple[str, int]:
    """Return the lowercase hex sha256 and the size in bytes of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render rows as left-aligned columns under upper-case headers, two spaces apart.

    An empty cell prints ``-``, so every row splits into as many words as the header has
    columns (the last column, free text, aside).
    """
    cells = [[str(h).upper() for h in headers]] + [[str(c) or "-" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def details(pairs: Iterable[tuple[str, object]]) -> str:
    """Render ``key: value`` lines with the values aligned; empty values are left out."""
    kept = [(k, str(v)) for k, v in pairs if v not in ("", None)]
    width = max((len(k) for k, _ in kept), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in kept)


def clip(text: str, limit: int = _CLIP) -> str:
    """Shorten one-line text to ``limit`` characters, marking the cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def by(ts: timestamp_pb2.Timestamp, who: str) -> str:
    """Format ``<time> by <who>``, or ``""`` when neither is known."""
    if not who and ts.seconds == 0 and ts.nanos == 0:
        return ""
    return f"{when(ts)} by {who or '?'}"


def when(ts: timestamp_pb2.Timestamp) -> str:
    """Format a Timestamp as ISO 8601 UTC to the second; ``-`` when unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return "-"
    if not valid_time(ts):
        return f"invalid time (seconds={ts.seconds}, nanos={ts.nanos})"
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")


def state_name(state: res.VersionState.ValueType) -> str:
    """Return ``staging`` for ``VERSION_STATE_STAGING``; ``-`` for unspecified."""
    if state == res.VERSION_STATE_UNSPECIFIED:
        return "-"
    return enum_name(res.VersionState.Name(state), "VERSION_STATE_")


def enum_name(name: str, prefix: str) -> str:
    """Return an enum value name without its prefix, lower-case (``PROMOTE`` → ``promote``)."""
    return name.removeprefix(prefix).lower()


def last_segment(name: str) -> str:
    """Return the last segment of a resource name (``models/m/stages/prod`` → ``prod``)."""
    return name.rsplit("/", 1)[-1]


def version_label(version: int) -> str:
    """Return ``v5`` for 5 and ``-`` for 0 (no version)."""
    return f"v{version}" if version else "-"


def pairs(mapping: Iterable[tuple[str, object]], sep: str = ", ") -> str:
    """Render ``a=1, b=2`` sorted by key (``a=1,b=2`` with ``sep=","``, in a table cell)."""
    return sep.join(f"{k}={v}" for k, v in sorted(mapping))


def model_details(m: res.RegisteredModel) -> str:
    """Describe one model."""
    return details(
        [
            ("name", m.name),
            ("description", m.description),
            ("tags", pairs(m.tags.items())),
            ("custom stages", ", ".join(m.custom_stages)),
            ("rollout policies", "; ".join(
                f"{stage}: {policy_text(m.rollout_policies[stage])}"
                for stage in sorted(m.rollout_policies))),
            ("versions", m.version_count),
            ("created", when(m.create_time)),
            ("updated", when(m.update_time)),
            ("etag", unquote_etag(m.etag)),
        ]
    )


def policy_text(p: res.RolloutPolicy) -> str:
    """``regions us, eu; 90% ready; deadline 300s; margin 2s`` (unset parts: the defaults).

    With a guard: ``...; guard error_rate<=0.05 for 60s after the switch (breach 10s, 50%
    of nodes)``.
    """
    parts = [f"regions {', '.join(p.regions)}" if p.regions else "every region",
             f"{(p.readiness_fraction or 1.0):.0%} ready"]
    if p.HasField("prepare_deadline"):
        parts.append(f"deadline {p.prepare_deadline.ToTimedelta().total_seconds():g}s")
    if p.HasField("activation_margin"):
        parts.append(f"margin {p.activation_margin.ToTimedelta().total_seconds():g}s")
    if p.guard.max_values:
        parts.append(guard_text(p.guard))
    return "; ".join(parts)


def guard_text(g: res.RolloutGuard) -> str:
    """A rollout guard, its defaults written out.

    E.g. ``guard error_rate<=0.05, latency_p99_ms<=250 for 600s after the switch (breach 0s,
    50% of nodes)``.
    """
    bake = g.bake_window.ToTimedelta().total_seconds() if g.HasField("bake_window") else 600
    figures = ", ".join(f"{name}<={g.max_values[name]:g}" for name in sorted(g.max_values))
    return (f"guard {figures} for {bake:g}s after the switch (breach "
            f"{g.breach_duration.ToTimedelta().total_seconds():g}s, "
            f"{(g.node_fraction or 0.5):.0%} of nodes)")


def models_table(models: Iterable[res.RegisteredModel]) -> str:
    """List models, one per row."""
    rows = [
        (
            last_segment(m.name),
            m.version_count,
            ",".join(m.custom_stages) or "-",
            when(m.update_time),
            clip(m.description),
        )
        for m in models
    ]
    return table(["model", "versions", "custom stages", "updated", "description"], rows)


def version_details(v: res.ModelVersion) -> str:
    """Describe one version, lineage included."""
    lin = v.lineage
    return details(
        [
            ("name", v.name),
            ("state", state_name(v.state)),
            ("stages", ", ".join(v.stages)),
            ("artifact", v.artifact_uri),
            ("sha256", v.sha256),
            ("size", f"{v.size_bytes} bytes"),
            ("framework", v.framework),
            ("metrics", pairs((k, f"{x:g}") for k, x in v.metrics.items())),
            ("params", pairs(v.params.items())),
            ("training run", lin.training_run),
            ("code commit", lin.code_commit),
            ("dataset", lin.dataset_version),
            ("dataset sha256", lin.dataset_sha256),
            ("description", v.description),
            ("tags", pairs(v.tags.items())),
            ("sunset", when(v.sunset_time) if v.HasField("sunset_time") else ""),
            ("created", by(v.create_time, v.created_by)),
            ("etag", unquote_etag(v.etag)),
        ]
    )


def versions_table(versions: Iterable[res.ModelVersion]) -> str:
    """List versions, one per row."""
    rows = [
        (
            version_label(v.version),
            state_name(v.state),
            ",".join(v.stages) or "-",
            v.framework or "-",
            v.sha256[:12],
            when(v.create_time),
            v.created_by or "-",
            clip(v.description),
        )
        for v in versions
    ]
    headers = ["version", "state", "stages", "framework", "sha256", "created", "by", "description"]
    return table(headers, rows)


def _flags(p: res.StagePointer | res.PointerHistoryEntry | res.AuditEvent) -> str:
    """The FLAGS cell of every table: its flags joined by ``,`` (``-``: none).

    ``hotfix``, ``backfill-required``, and for break glass ``PINNED`` (a pointer) or
    ``in-REGION`` and ``not-yet-on-primary`` (an event).
    """
    flags = [("hotfix", p.hotfix), ("backfill-required", getattr(p, "backfill_required", False)),
             ("PINNED", isinstance(p, res.StagePointer) and p.HasField("local_pin"))]
    if isinstance(p, res.AuditEvent) and p.region:  # break glass: made in one region only
        flags += [(f"in-{last_segment(p.region)}", True),
                  ("not-yet-on-primary", not p.HasField("report_time"))]
    return ",".join(name for name, on in flags if on) or "-"


def pin_warnings(stages: Iterable[res.StagePointer], model: str) -> str:
    """One loud line per stage a region pinned (break glass), with how to clear it; or ""."""
    lines = []
    for p in stages:
        if not p.HasField("local_pin"):
            continue
        pin, stage = p.local_pin, last_segment(p.name)
        region = last_segment(pin.region)
        lines.append(
            f"WARNING: {stage} is PINNED (break glass) in {region} to {version_label(pin.version)}"
            f" over the primary's {version_label(pin.primary_version)}, by {pin.actor or '-'} "
            f"{when(pin.pin_time)}: {clip(pin.reason)} (reported to the primary: "
            f"{'yes' if pin.reported else 'not yet'}); clear it with: modelreg stages unpin "
            f"{model} {stage} --region {region} --reason ...")
    return "\n".join(lines)


def stage_details(p: res.StagePointer) -> str:
    """Describe one stage pointer."""
    return details(
        [
            ("stage", p.name),
            ("version", version_label(p.version)),
            ("previous", version_label(p.previous_version)),
            ("rollback to", ", ".join(map(version_label, p.rollback_candidates))),
            ("former", ", ".join(map(version_label, p.former_versions))),
            ("generation", p.generation),
            ("flags", _flags(p)),
            ("reason", p.reason),
            ("updated", by(p.update_time, p.updated_by)),
            ("etag", unquote_etag(p.etag)),
            *([("PINNED", f"(break glass) {version_label(p.local_pin.version)} in "
                f"{last_segment(p.local_pin.region)} over the primary's "
                f"{version_label(p.local_pin.primary_version)}, by {p.local_pin.actor} "
                f"{when(p.local_pin.pin_time)}: {p.local_pin.reason}")]
              if p.HasField("local_pin") else []),
        ]
    )


def stages_table(stages: Iterable[res.StagePointer]) -> str:
    """List stage pointers, one per row (what ``modelreg status`` prints)."""
    rows = [
        (
            last_segment(p.name),
            version_label(p.version),
            version_label(p.previous_version),
            _flags(p),
            when(p.update_time),
            p.updated_by or "-",
            unquote_etag(p.etag),
        )
        for p in stages
    ]
    return table(["stage", "version", "previous", "flags", "updated", "by", "etag"], rows)


def history_table(entries: Iterable[res.PointerHistoryEntry]) -> str:
    """List pointer moves, newest first."""
    rows = [
        (
            e.generation,
            enum_name(res.PointerMoveKind.Name(e.kind), "POINTER_MOVE_KIND_"),
            version_label(e.from_version),
            version_label(e.to_version),
            _flags(e),
            when(e.time),
            e.actor,
            clip(e.reason),
        )
        for e in entries
    ]
    return table(["gen", "kind", "from", "to", "flags", "time", "actor", "reason"], rows)


def audit_table(events: Iterable[res.AuditEvent]) -> str:
    """List audit events, newest first."""
    rows = [
        (
            when(e.time),
            e.actor,
            enum_name(res.AuditAction.Name(e.action), "AUDIT_ACTION_"),
            e.resource,
            _audit_value(e, e.from_value),
            _audit_value(e, e.to_value),
            _flags(e),
            clip(e.reason),
        )
        for e in events
    ]
    return table(["time", "actor", "action", "resource", "from", "to", "flags", "reason"], rows)


def _audit_value(e: res.AuditEvent, value: str) -> str:
    """A FROM/TO cell: a stage event's version as ``v5`` (as history prints it), else clipped."""
    if e.stage and value.isascii() and value.isdigit():
        return version_label(int(value))
    return clip(value, 24)
