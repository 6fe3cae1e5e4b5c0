"""The CLI's text for what the fleet serves (``nodes``, ``rollout``) and for ``watch`` lines.

The tables follow the rules of :mod:`modelreg.client._render`; a node's error, free text, is
the last column, shortened by :func:`short_error` so that it keeps its cause.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from modelreg.client._render import (
    enum_name,
    last_segment,
    pairs,
    table,
    version_label,
    when,
)
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws

_ERROR_CHARS = 120
"""Longest node error shown in a table (the full text is in ``--json`` and on the node)."""

_DIRECTORIES = re.compile(
    r"(?<![^\s'\"(=])"  # at the start of a word: a URI's scheme, or an absolute path's "/"
    r"(?P<root>[A-Za-z][A-Za-z0-9+.-]*://[^/\s'\"]*/|/)"  # scheme://authority/ or /
    r"(?P<dirs>(?:[^/\s'\"]+/){2,})"  # two or more directories ...
    r"(?=[^/\s'\"])"  # ... followed by the file name, which stays
)
"""The directories of a URI or absolute path in free text, which :func:`short_error` drops."""


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
