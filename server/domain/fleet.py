"""The fleet view: serving nodes report on a lease what they prepared and serve.

A report is presence, not a change of the registry: it is written with ``put_ephemeral``
(no guard, no audit event) and vanishes when the node stops reporting for ``ttl_seconds``
(default 15 s), so a node that dies drops out of every count: no ghost models. A node that
stops cleanly deletes itself at once (``DeleteNode``). What a report says a version did in a
stage (served, failed) is also recorded durably, once (``outcomes``): rollbacks rely on it.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable

from modelreg.server.domain import (
    health,
    keys,
    names,
    outcomes,
    pin_view,
    readiness,
    records,
    validation,
)
from modelreg.server.domain.errors import InvalidArgumentError, NotFoundError
from modelreg.server.domain.ports import Entry, Guard, LocalStore, ModelStore, Put, Unchanged
from modelreg.server.domain.transaction import DEFAULT_REGION, now_timestamp
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import resources_pb2 as res

DEFAULT_TTL = 15
MIN_TTL, MAX_TTL = 5, 300
MAX_STAGES_PER_NODE = 64
MAX_ERROR = 1024
MAX_LAGGING_LISTED = 100
SUMMARY_ERROR_CHARS = 120
"""Longest node error quoted in a rollout summary (the node's whole report is in ``lagging``)."""

_DIRECTORIES = re.compile(
    r"(?<![^\s'\"(=])"  # at the start of a word: a URI's scheme, or an absolute path's "/"
    r"(?P<root>[A-Za-z][A-Za-z0-9+.-]*://[^/\s'\"]*/|/)"  # scheme://authority/ or /
    r"(?P<dirs>(?:[^/\s'\"]+/){2,})"  # two or more directories ...
    r"(?=[^/\s'\"])"  # ... followed by the file name, which stays
)


def _check_node(v: validation.Violations, node: fs.Node) -> None:
    validation.label(v, "node.node_id", node.node_id)
    if node.region:
        validation.label(v, "node.region", node.region)
    validation.tags(v, "node.labels", node.labels)
    v.check(len(node.stages) <= MAX_STAGES_PER_NODE, "node.stages",
            f"at most {MAX_STAGES_PER_NODE} stages per node")
    for i, served in enumerate(node.stages):
        for name in ("serving_version", "prepared_version", "failed_version"):
            v.check(getattr(served, name) >= 0, f"node.stages[{i}].{name}",
                    "must be a version number, or 0 for none")
        try:
            names.parse_stage(f"node.stages[{i}].stage", served.stage)
        except InvalidArgumentError as err:  # collect it with the rest
            v.items.extend(err.violations)
        validation.text(v, f"node.stages[{i}].error", served.error, MAX_ERROR)
        if served.HasField("swap_time"):
            validation.timestamp(v, f"node.stages[{i}].swap_time", served.swap_time)
        validation.figures(v, f"node.stages[{i}].health", served.health,
                           what="a health figure")


class Fleet:
    """Node reports, node listings and rollout status."""

    def __init__(self, store: ModelStore, clock: Callable[[], int] = time.time_ns, *,
                 region: str = DEFAULT_REGION, local: LocalStore | None = None) -> None:
        self._store = store
        self._local = local
        """The region's own store, outside the primary: a stage it pinned (break glass) is
        committed at the pinned version, for this region's fleet."""
        self._clock = clock
        self._memo = outcomes.Memo()
        self._region = region
        """This server's region: the one whose node reports its store holds (``nodes/`` is
        region-held) and that ``readiness`` answers for."""

    async def report(self, req: fs.ReportNodeRequest) -> fs.ReportNodeResponse:
        """Registers or refreshes a node on a lease of ``ttl_seconds``."""
        v = validation.Violations()
        _check_node(v, req.node)
        ttl = req.ttl_seconds or DEFAULT_TTL
        v.check(MIN_TTL <= ttl <= MAX_TTL, "ttl_seconds",
                f"must be {MIN_TTL}-{MAX_TTL} seconds (0: {DEFAULT_TTL})")
        v.raise_if_any()
        node = fs.Node()
        node.CopyFrom(req.node)
        node.name = f"nodes/{node.node_id}"
        node.report_time.CopyFrom(now_timestamp(self._clock()))
        revision = await self._store.put_ephemeral(
            keys.node(node.node_id), node.SerializeToString(deterministic=True), ttl)
        revision = max(revision, await self._record(node))
        return fs.ReportNodeResponse(revision=revision, ttl_seconds=ttl)

    async def _record(self, node: fs.Node) -> int:
        """Records the outcomes this report is the first to tell; the commit revision, or 0.

        Each record is created only if absent and only while its version exists (guarded on
        the version key), so a report never resurrects anything of a deleted model. A lost
        race (another server recorded it first) is simply left to the next report.
        """
        wanted = [w for w in outcomes.wanted(node, node.report_time)
                  if not self._memo.known(w.key)]
        if not wanted:
            return 0
        version_keys = sorted({w.version_key for w in wanted})
        snap = await self._store.read([w.key for w in wanted] + version_keys, fresh=True)
        self._memo.add(w.key for w in wanted if snap.get(w.key) is not None)
        todo = [w for w in wanted
                if snap.get(w.key) is None and snap.get(w.version_key) is not None]
        if not todo:
            return 0
        guards: list[Guard] = [Unchanged(w.key, 0) for w in todo]
        guards += [Unchanged(k, snap.mod_revision(k)) for k in {w.version_key for w in todo}]
        result = await self._store.commit(guards, [Put(w.key, w.value) for w in todo])
        if not result.succeeded:
            return 0
        self._memo.add(w.key for w in todo)
        return result.revision

    async def delete(self, req: fs.DeleteNodeRequest) -> fs.DeleteNodeResponse:
        """Removes a node's report at once: a node that stops cleanly leaves no ghost."""
        node_id = req.name.removeprefix("nodes/")
        v = validation.Violations()
        if req.name.startswith("nodes/"):
            validation.label(v, "name", node_id)
        else:
            v.add("name", "must be a node name: nodes/{node_id}")
        v.raise_if_any()
        revision, existed = await self._store.delete_ephemeral(keys.node(node_id))
        if not existed:
            raise NotFoundError(req.name)
        return fs.DeleteNodeResponse(revision=revision)

    async def list(self, req: fs.ListNodesRequest) -> fs.ListNodesResponse:
        """Live nodes in id order, by region and model if asked."""
        v = validation.Violations()
        size = validation.page_size(v, req.page_size)
        if req.region:
            validation.label(v, "region", req.region)
        if req.model:
            validation.model_id(v, "model", req.model)
        v.raise_if_any()
        prefix = f"models/{req.model}/stages/"

        def accept(e: Entry) -> bool:
            node = fs.Node.FromString(e.value)
            return (not req.region or node.region == req.region) and (
                not req.model or any(s.stage.startswith(prefix) for s in node.stages))

        page = await records.list_page(
            self._store, keys.NODES_START, keys.NODES_END, page_size=size, token=req.page_token,
            accept=accept if (req.region or req.model) else None)
        return fs.ListNodesResponse(nodes=[fs.Node.FromString(e.value) for e in page.entries],
                                    next_page_token=page.next_token, revision=page.revision)

    async def readiness(
        self, req: fs.GetRegionReadinessRequest
    ) -> fs.GetRegionReadinessResponse:
        """How ready this region is for a rollout's target, from its own live node reports.

        Every live node in this server's store counts: the store holds its region's reports
        only (``nodes/`` is region-held), whatever region a node names in its report.
        """
        names.parse_stage("name", req.name)
        v = validation.Violations()
        v.check(req.version > 0, "version", "must be the rollout's target version (positive)")
        fraction = req.readiness_fraction
        v.check(math.isfinite(fraction) and 0.0 <= fraction <= 1.0, "readiness_fraction",
                "must be between 0 and 1 (0 means 1: every live node)")
        v.raise_if_any()
        page = await self._store.scan(keys.NODES_START, keys.NODES_END, limit=0)
        found = readiness.region_readiness(
            self._region, req.name, req.version, fraction,
            (fs.Node.FromString(e.value) for e in page.entries))
        return fs.GetRegionReadinessResponse(readiness=found, revision=page.revision)

    async def health(self, req: fs.GetRegionHealthRequest) -> fs.GetRegionHealthResponse:
        """How healthy this region's nodes on a committed version are, per guarded figure.

        As ``readiness``: every live node in this server's store counts (the store holds its
        region's reports only), here those serving ``version``.
        """
        names.parse_stage("name", req.name)
        v = validation.Violations()
        v.check(req.version > 0, "version", "must be the committed version (positive)")
        if req.guard.max_values:
            validation.rollout_guard(v, "guard", req.guard)
        else:
            v.add("guard.max_values", "name at least one figure and its maximum")
        v.raise_if_any()
        page = await self._store.scan(keys.NODES_START, keys.NODES_END, limit=0)
        found = health.region_health(
            self._region, req.name, req.version, req.guard,
            (fs.Node.FromString(e.value) for e in page.entries))
        return fs.GetRegionHealthResponse(health=found, revision=page.revision)

    async def rollout(self, req: fs.GetRolloutStatusRequest) -> fs.GetRolloutStatusResponse:
        """The committed version of a stage and how many live nodes serve it."""
        model_id, stage = names.parse_stage("name", req.name)
        v = validation.Violations()
        if req.region:
            validation.label(v, "region", req.region)
        v.raise_if_any()
        stage_key = keys.stage(model_id, stage)
        snap = await self._store.read([keys.model(model_id), stage_key], fresh=True)
        if snap.get(keys.model(model_id)) is None:
            raise NotFoundError(names.model_name(model_id))
        entry = snap.get(stage_key)
        pointer = (records.decode(entry, res.StagePointer) if entry is not None
                   else res.StagePointer(name=req.name, etag='"0"'))
        pin = (await pin_view.served_pins(self._local, model_id)).get(stage)
        if pin is not None:
            pointer = pin_view.overlay(pointer, pin)
        page = await self._store.scan(keys.NODES_START, keys.NODES_END, limit=0)
        following: list[tuple[fs.Node, fs.ServedStage]] = []
        for e in page.entries:
            node = fs.Node.FromString(e.value)
            if req.region and node.region != req.region:
                continue
            following += [(node, s) for s in node.stages if s.stage == req.name]
        for _, s in following:
            if s.failed_version and s.failed_version != pointer.version:
                # A failure of a version the stage no longer names no longer applies (e.g. the
                # version a rollback left): nodes of older SDKs still report it, so drop it here.
                s.failed_version, s.error = 0, ""
        counts = Counter(s.serving_version for _, s in following)
        order = sorted(counts, key=lambda ver: (ver != pointer.version, -counts[ver], ver))
        lagging = [n for n, s in following if s.serving_version != pointer.version]
        return fs.GetRolloutStatusResponse(
            stage=pointer,
            total_nodes=len(following),
            serving=[fs.VersionCount(version=ver, nodes=counts[ver]) for ver in order],
            lagging=lagging[:MAX_LAGGING_LISTED],
            summary=_summary(stage, pointer, len(following), counts, lagging,
                             entry.mod_revision if entry is not None else 0),
            revision=max(page.revision, snap.revision),
        )


def _summary(stage: str, pointer: res.StagePointer, total: int, counts: Counter[int],
             lagging: list[fs.Node], revision: int) -> str:
    """E.g. ``production -> v8 at revision 120; 97/100 nodes serve v8; 3 not yet: a (v7)``.

    ``revision`` is the one the pointer moved at, so it can be matched with the audit trail.
    """
    target = f"v{pointer.version}" if pointer.version else "nothing"
    text = (f"{stage} -> {target} at revision {revision}; "
            f"{counts.get(pointer.version, 0)}/{total} nodes serve {target}")
    if pointer.HasField("local_pin"):
        pin = pointer.local_pin
        text += (f"; PINNED here (break glass) in {pin.region.removeprefix('regions/')}, "
                 f"the primary says v{pin.primary_version}")
    if lagging:
        shown = ", ".join(
            f"{n.node_id} ({_served(n, pointer.name)})" for n in lagging[:10])
        more = f", +{len(lagging) - 10} more" if len(lagging) > 10 else ""
        text += f"; {len(lagging)} not yet: {shown}{more}"
    return text


def _served(node: fs.Node, stage_name: str) -> str:
    for s in node.stages:
        if s.stage == stage_name:
            state = f"v{s.serving_version}" if s.serving_version else "nothing"
            if s.failed_version:
                state += f", v{s.failed_version} failed: {_brief(s.error)}"
            return state
    return "?"


def _brief(error: str) -> str:
    """A node's error as the summary quotes it: short, and still saying what went wrong.

    Errors name a file first and the cause last (``DigestMismatchError: file:///srv/a/b/m.tmdl:
    more than the registered 44 bytes``), so a plain cut keeps the path and drops the cause.
    Paths and URIs lose their directories instead (``file:///.../m.tmdl``); if that is not
    enough, the middle goes, marked ``...``.
    """
    text = _DIRECTORIES.sub(lambda m: f"{m['root']}.../", " ".join(error.split()))
    if len(text) <= SUMMARY_ERROR_CHARS:
        return text
    head = SUMMARY_ERROR_CHARS // 3
    return text[:head] + "..." + text[len(text) - (SUMMARY_ERROR_CHARS - head - 3):]
