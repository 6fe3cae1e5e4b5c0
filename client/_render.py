"""Pure helpers of the CLI: parsing ``k=v`` and times, and rendering resources as text.

Every table follows the same rules, so ``awk``/``cut`` work on any of them: every column has
a header; an empty cell prints ``-``; a version prints ``v5``; free text (description, reason,
a node's error) only in the last column, and lists are joined by ``,`` without spaces; etags
without their quotes (``11``), as ``--json`` prints them and ``--etag`` takes them.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from google.protobuf import timestamp_pb2

from modelreg.client._json import to_json as to_json  # re-exported: the commands' JSON
from modelreg.client._json import unquote_etag as unquote_etag  # re-exported: the commands use it
from modelreg.client._json import valid_time
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws

_CLIP = 48
"""Longest free-text cell (description, reason) shown in a table."""

_ERROR_CHARS = 120
"""Longest node error shown in a table (the full text is in ``--json`` and on the node)."""

_DIRECTORIES = re.compile(
    r"(?<![^\s'\"(=])"  # at the start of a word: a URI's scheme, or an absolute path's "/"
    r"(?P<root>[A-Za-z][A-Za-z0-9+.-]*://[^/\s'\"]*/|/)"  # scheme://authority/ or /
    r"(?P<dirs>(?:[^/\s'\"]+/){2,})"  # two or more directories ...
    r"(?=[^/\s'\"])"  # ... followed by the file name, which stays
)
"""The directories of a URI or absolute path in free text, which :func:`short_error` drops."""


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


def short_error(text: str, limit: int = _ERROR_CHARS) -> str:
    """Shorten an error for a table, keeping its type and its cause.

    Errors name a file first and say what went wrong last (``DigestMismatchError:
    file:///srv/models/a/b/m.tmdl: more than the registered 44 bytes``), so a plain cut keeps
    the path and loses the cause. Paths and URIs lose their directories instead
    (``file:///…/m.tmdl``); if that is not enough, the middle goes, marked with an ellipsis.
    """
    text = _DIRECTORIES.sub(lambda m: f"{m['root']}…/", " ".join(text.split()))
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + "…" + text[len(text) - (limit - head - 1) :]


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
            ("versions", m.version_count),
            ("created", when(m.create_time)),
            ("updated", when(m.update_time)),
            ("etag", unquote_etag(m.etag)),
        ]
    )


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
    """The FLAGS cell of every table: ``hotfix``, ``backfill-required``, joined by ``,``."""
    flags = [("hotfix", p.hotfix), ("backfill-required", getattr(p, "backfill_required", False))]
    return ",".join(name for name, on in flags if on) or "-"


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


def stage_label(name: str) -> str:
    """Return ``m/production`` for ``models/m/stages/production``; other names pass through."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == "models" and parts[2] == "stages":
        return f"{parts[1]}/{parts[3]}"
    return name


def _failed(s: fs.ServedStage) -> str:
    """The FAILED cell (the last column): ``v3: DigestMismatchError: file:///…/m.tmdl: cause``."""
    if not s.failed_version:
        return "-"
    error = short_error(s.error)
    return f"v{s.failed_version}: {error}" if error else f"v{s.failed_version}"


def nodes_table(nodes: Iterable[fs.Node]) -> str:
    """List nodes, one row per node and stage it follows (one row if it follows none)."""
    rows: list[tuple[str, ...]] = []
    for n in nodes:
        stages: list[fs.ServedStage | None] = [*n.stages] or [None]
        for s in stages:
            served = (
                (
                    stage_label(s.stage),
                    version_label(s.serving_version),
                    version_label(s.prepared_version),
                )
                if s is not None
                else ("-", "-", "-")
            )
            node = (n.node_id or last_segment(n.name), n.region or "-")
            report = (when(n.report_time), pairs(n.labels.items(), ",") or "-")
            rows.append((*node, *served, *report, _failed(s) if s is not None else "-"))
    headers = ["node", "region", "stage", "serving", "prepared", "last report", "labels", "failed"]
    return table(headers, rows)


def rollout_text(resp: fs.GetRolloutStatusResponse) -> str:
    """Describe a rollout: the server's summary, node counts per version, the lagging nodes."""
    committed = resp.stage.version
    parts = [resp.summary]
    if resp.serving:
        rows = [
            (version_label(c.version), c.nodes, "yes" if c.version == committed else "-")
            for c in resp.serving
        ]
        parts.append(table(["version", "nodes", "committed"], rows))
    if resp.lagging:
        on_target = sum(c.nodes for c in resp.serving if c.version == committed)
        behind = resp.total_nodes - on_target
        title = "lagging nodes"
        if behind > len(resp.lagging):
            title += f" (first {len(resp.lagging)} of {behind})"
        lagging: list[tuple[str, ...]] = []
        for n in resp.lagging:
            s = next((s for s in n.stages if s.stage == resp.stage.name), fs.ServedStage())
            lagging.append(
                (
                    n.node_id or last_segment(n.name),
                    n.region or "-",
                    version_label(s.serving_version),
                    version_label(s.prepared_version),
                    when(n.report_time),
                    _failed(s),
                )
            )
        headers = ["node", "region", "serving", "prepared", "last report", "failed"]
        parts.append(f"{title}:\n{table(headers, lagging)}")
    return "\n\n".join(parts)


def _move(p: res.StagePointer) -> str:
    kind = enum_name(res.PointerMoveKind.Name(p.last_move), "POINTER_MOVE_KIND_")
    kind = "set" if kind == "unspecified" else kind
    return f"{kind}, hotfix" if p.hotfix else kind


def _who(p: res.StagePointer) -> str:
    reason = " ".join(p.reason.split())
    return f"by {p.updated_by or '?'}" + (f"  {reason}" if reason else "")


def watch_lines(msg: ws.WatchStagesResponse, *, bookmarks: bool = False) -> list[str]:
    """Render one WatchStages message as log lines (none for a bookmark unless ``bookmarks``).

    A change reads ``REVISION  models/m/stages/s  v1 -> v2  (promote)  by ACTOR  reason``; a
    snapshot gives one ``REVISION  models/m/stages/s  v2  (snapshot)  by ACTOR  reason`` line
    per pointer.
    """
    rev = msg.revision
    if msg.type == ws.WATCH_MESSAGE_TYPE_SNAPSHOT:
        tag = "reset snapshot" if msg.reset else "snapshot"
        if not msg.snapshot:
            return [f"{rev}  ({tag}: no matching stage pointer yet)"]
        return [
            f"{rev}  {p.name}  {version_label(p.version)}  ({tag})  {_who(p)}" for p in msg.snapshot
        ]
    if msg.type == ws.WATCH_MESSAGE_TYPE_CHANGES:
        lines = []
        for c in msg.changes:
            p = c.stage
            if c.deleted:
                lines.append(f"{rev}  {p.name}  {version_label(c.from_version)} -> deleted")
            else:
                moved = f"{version_label(c.from_version)} -> {version_label(p.version)}"
                lines.append(f"{rev}  {p.name}  {moved}  ({_move(p)})  {_who(p)}")
        return lines
    if msg.type == ws.WATCH_MESSAGE_TYPE_BOOKMARK:
        return [f"{rev}  (bookmark)"] if bookmarks else []
    return [f"{rev}  (unknown message type {msg.type})"]
