"""``modelreg regions`` and the regional ``modelreg status``: ask every region's own servers.

The server the CLI talks to lists the deployment's regions (``ListRegions``, from its
topology) and says which one it is in; every other region is asked through its own servers,
in the topology's order until one answers, since a server speaks for its own region only
(``GetRegionStatus``: applied revision, lag, whether it reaches the primary). A region none of
whose servers answers is shown as such, with the error, rather than failing the command.

Health, one word per region:

* ``ok``: it answered; it is the primary, or it reaches the primary and its replicator's lag
  figures are current;
* ``degraded``: it answered, but cannot reach the primary (its mutations fail, reads go on) or
  has no current replication figures (nobody applies: its reads grow stale);
* ``unreachable``: none of its servers answered.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelreg.client import _render as r
from modelreg.client._json import error_to_json
from modelreg.client._sync_client import RegistryClient
from modelreg.client.errors import DeadlineExceededError, RegistryError, UnavailableError
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import model_service_pb2 as pb
from modelreg.v1 import region_service_pb2 as rs

NO_ANSWER = (UnavailableError, DeadlineExceededError)
"""What an unreachable server raises: try the region's next server."""


@dataclass(frozen=True)
class RegionView:
    """What one region's servers said (or why none did)."""

    region: rs.Region
    server: str
    """The address that answered (``target`` for the server the CLI was pointed at), or ""."""
    status: rs.RegionStatus | None = None
    stages: pb.ListStagesResponse | None = None
    rollout: fs.GetRolloutStatusResponse | None = None
    error: RegistryError | None = None

    @property
    def health(self) -> str:
        """``ok``, ``degraded`` or ``unreachable`` (see the module docstring)."""
        if self.status is None:
            return "unreachable"
        s = self.status
        if s.primary or (s.primary_reachable and s.HasField("lag") and s.lag.current):
            return "ok"
        return "degraded"

    @property
    def detail(self) -> str:
        """Why a region is not ``ok``, in a few words (the table's last column)."""
        if self.error is not None:
            return str(self.error)
        s = self.status
        if s is None or s.primary:
            return ""
        why = [] if s.primary_reachable else ["primary unreachable: mutations fail here"]
        if not s.HasField("lag"):
            why.append("no replication figures yet")
        elif not s.lag.current:
            why.append("replication figures overdue: is its replicator running?")
        return "; ".join(why)


def list_regions(client: RegistryClient) -> tuple[str, list[rs.Region]]:
    """The region the client's server is in, and every region of its topology."""
    page = client.list_regions(page_size=1000)
    found = list(page.regions)
    while page.next_page_token:
        page = client.list_regions(page_size=1000, page_token=page.next_page_token)
        found.extend(page.regions)
    return page.region, found


def survey(
    client: RegistryClient,
    args: argparse.Namespace,
    ask: Callable[[RegistryClient, rs.Region], RegionView],
    listed: tuple[str, list[rs.Region]] | None = None,
) -> list[RegionView]:
    """Every region's view, each from its own servers (the client's own for its region).

    ``listed`` is what :func:`list_regions` returned, if the caller has it already.
    """
    own, regions = listed or list_regions(client)
    views = []
    for region in regions:
        if region.name == own:
            views.append(ask(client, region))
            continue
        view = RegionView(region, "", error=UnavailableError("the topology lists no servers"))
        for address in region.servers:
            # One attempt per server: the next server is the retry.
            with RegistryClient(address, actor=args.actor, timeout=args.timeout,
                                retries=0) as other:
                try:
                    view = ask(other, region)
                    break
                except NO_ANSWER as exc:
                    view = RegionView(region, "", error=exc)
                except RegistryError as exc:  # it answered, with a refusal: shown, not fatal
                    view = RegionView(region, address, error=exc)
                    break
        views.append(view)
    return views


def region_status(client: RegistryClient, region: rs.Region) -> RegionView:
    """What ``modelreg regions`` asks a region's server."""
    got = client.region_status(region.name)
    return RegionView(region, client.config.target, status=got.region_status)


def model_status(model: str) -> Callable[[RegistryClient, rs.Region], RegionView]:
    """What ``modelreg status MODEL`` asks a region's server: its status and the stages."""

    def ask(client: RegistryClient, region: rs.Region) -> RegionView:
        status = client.region_status(region.name).region_status
        try:
            stages = client.list_stages(model)
        except NO_ANSWER:
            raise
        except RegistryError as exc:  # e.g. NOT_FOUND: the model has not reached the region
            return RegionView(region, client.config.target, status=status, error=exc)
        return RegionView(region, client.config.target, status=status, stages=stages)

    return ask


def model_rollout(model: str, stage: str) -> Callable[[RegistryClient, rs.Region], RegionView]:
    """What ``modelreg rollout MODEL STAGE`` asks a region's server: its own fleet's view.

    Node reports stay in their region, so each region's servers are the ones to ask; the
    command adds the figures up.
    """

    def ask(client: RegistryClient, region: rs.Region) -> RegionView:
        try:
            got = client.rollout_status(model, stage)
        except NO_ANSWER:
            raise
        except RegistryError as exc:  # e.g. NOT_FOUND: the model has not reached the region
            return RegionView(region, client.config.target, error=exc)
        return RegionView(region, client.config.target, rollout=got)

    return ask


def rollouts_by_region(views: list[RegionView]) -> str:
    """One row per region (its committed version, nodes, how many serve it), and the total."""
    rows: list[tuple[object, ...]] = []
    total = on_committed = 0
    for v in views:
        if v.rollout is None:
            rows.append((r.last_segment(v.region.name), "-", "-", "-", _error_text(v)))
            continue
        got = v.rollout
        serving = sum(c.nodes for c in got.serving if c.version == got.stage.version)
        total, on_committed = total + got.total_nodes, on_committed + serving
        rows.append((r.last_segment(v.region.name), r.version_label(got.stage.version),
                     got.total_nodes, serving, got.summary or "-"))
    rows.append(("all", "-", total, on_committed, f"{on_committed}/{total} nodes serve the "
                 "version their region has committed"))
    return r.table(["region", "committed", "nodes", "on committed", "summary"], rows)


def rollout_json(views: list[RegionView]) -> dict[str, Any]:
    """``--json`` of a rollout across regions: each region's answer (or error) and the totals."""
    regions: list[dict[str, Any]] = []
    total = on_committed = 0
    for v in views:
        entry: dict[str, Any] = {"region": r.last_segment(v.region.name), "server": v.server}
        if v.rollout is not None:
            got = v.rollout
            total += got.total_nodes
            on_committed += sum(c.nodes for c in got.serving if c.version == got.stage.version)
            entry["rollout"] = r.to_json(got)
        else:
            entry["error"] = error_to_json(v.error) if v.error is not None else None
        regions.append(entry)
    return {"regions": regions, "total_nodes": total, "on_committed": on_committed}


def _error_text(view: RegionView) -> str:
    if view.error is None:
        return "no answer"
    return f"{view.error.code.name}: {view.error.message}"


def _lag(view: RegionView) -> tuple[str, str]:
    s = view.status
    if s is None or not s.HasField("lag"):
        return "-", "-"
    return str(s.lag.revisions), f"{s.lag.seconds:.1f}"


def regions_table(views: list[RegionView]) -> str:
    """One row per region: role, health, applied revision, lag, primary reachable."""
    rows = []
    for v in views:
        s = v.status
        rows.append((
            r.last_segment(v.region.name),
            "primary" if v.region.primary else "replica",
            v.health,
            s.applied_revision if s is not None else "-",
            *_lag(v),
            ("yes" if s.primary_reachable else "no") if s is not None else "-",
            v.server or "-",
            r.clip(v.detail, 120),
        ))
    headers = ["region", "role", "health", "applied", "lag revisions", "lag seconds",
               "reaches primary", "server", "detail"]
    return r.table(headers, rows)


def view_json(view: RegionView) -> dict[str, Any]:
    """A region in ``--json``: the Region's fields, health, who answered, status, error."""
    data = r.to_json(view.region)
    data.update(
        health=view.health,
        server=view.server,
        status=r.to_json(view.status) if view.status is not None else None,
        error=error_to_json(view.error)["error"] if view.error is not None else None,
    )
    if view.stages is not None or view.error is not None:
        data["stages"] = ([r.to_json(p) for p in view.stages.stages]
                          if view.stages is not None else None)
    return data


def pin_warnings(views: list[RegionView], model: str) -> str:
    """The break-glass warnings of every region that answered (one line per pinned stage)."""
    lines = [r.pin_warnings(v.stages.stages, model) for v in views if v.stages is not None]
    return "\n".join(line for line in lines if line)


def stages_by_region(views: list[RegionView]) -> str:
    """A stage-by-region table of the version each region's store has; ``?``: no answer.

    A region that pinned a stage (break glass) shows the version it serves marked
    ``[PINNED]``; :func:`pin_warnings` says more.
    """
    names: list[str] = []
    for v in views:
        for p in v.stages.stages if v.stages is not None else ():
            stage = r.last_segment(p.name)
            if stage not in names:
                names.append(stage)
    headers = ["stage", *(r.last_segment(v.region.name) + ("*" if v.region.primary else "")
                          for v in views)]
    rows = []
    for stage in names:
        cells: list[str] = [stage]
        for v in views:
            if v.stages is None:
                cells.append("?")
                continue
            pointers = {r.last_segment(p.name): p for p in v.stages.stages}
            found = pointers.get(stage)
            pinned = found is not None and found.HasField("local_pin")
            cells.append(r.version_label(found.version if found else 0)
                         + ("[PINNED]" if pinned else ""))
        rows.append(cells)
    return r.table(headers, rows)
