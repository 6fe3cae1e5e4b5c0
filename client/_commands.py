"""What each ``modelreg`` command does: call the client, return JSON data and a text rendering."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from modelreg.client import _regions as rg
from modelreg.client import _render as r
from modelreg.client import _render_fleet as rf
from modelreg.client import _render_rollouts as ro
from modelreg.client import _requests as rq
from modelreg.client._sync_client import RegistryClient
from modelreg.client.errors import AbortedError, RegistryError
from modelreg.v1 import resources_pb2 as res
from modelreg.v1 import watch_service_pb2 as ws

STATES = {r.state_name(v): v for v in res.VersionState.values() if v}


class UsageError(Exception):
    """Local input the CLI cannot use (exit code 2)."""


@dataclass(frozen=True)
class Output:
    """What a command prints: ``data`` with ``--json``, ``text`` otherwise.

    A command that follows something live sets ``stream`` instead: each of its items is
    printed as it arrives (``data`` as one JSON line, ``text`` as is; ``None``/``""``: nothing).
    """

    data: Any
    text: str
    stream: Generator[Output, None, None] | None = None
    """A generator, so the CLI can close it (and cancel its call) however printing ends."""


Handler = Callable[[RegistryClient, argparse.Namespace], Output]
"""A command: run it with a client and the parsed arguments."""

_T = TypeVar("_T")


def models_create(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.create_model(
        a.model, description=a.description or "", tags=dict(a.tag), custom_stages=a.custom_stage
    )
    return Output(r.to_json(resp), r.model_details(resp.model))


def models_get(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.get_model(a.model)
    return Output(r.to_json(resp), r.model_details(resp.model))


def models_list(c: RegistryClient, a: argparse.Namespace) -> Output:
    models = _take(c.iter_models(), a.limit)
    return Output({"models": [r.to_json(m) for m in models]}, r.models_table(models))


def models_update(c: RegistryClient, a: argparse.Namespace) -> Output:
    tags = {} if a.clear_tags else (dict(a.tag) if a.tag else None)
    stages = [] if a.clear_custom_stages else (a.custom_stage or None)
    if a.description is None and tags is None and stages is None:
        raise UsageError("nothing to update: give --description, --tag or --custom-stage")
    resp = c.update_model(
        a.model, description=a.description, tags=tags, custom_stages=stages, etag=a.etag
    )
    return Output(r.to_json(resp), r.model_details(resp.model))


def models_set_policy(c: RegistryClient, a: argparse.Namespace) -> Output:
    guard = dict(a.guard or ())
    if not guard and (a.bake_window is not None or a.breach_duration is not None
                      or a.node_fraction):
        raise UsageError("--bake-window, --breach-duration and --node-fraction shape "
                         "a rollout guard: name its figures with --guard FIGURE<=MAX")
    policy = rq.rollout_policy(
        regions=a.region, readiness_fraction=a.readiness_fraction,
        prepare_deadline=a.prepare_deadline, activation_margin=a.activation_margin,
        guard=guard, bake_window=a.bake_window, breach_duration=a.breach_duration,
        guard_node_fraction=a.node_fraction)
    return _change_policies(c, a.model, lambda policies: policies.update({a.stage: policy}))


def models_clear_policy(c: RegistryClient, a: argparse.Namespace) -> Output:
    def clear(policies: dict[str, res.RolloutPolicy]) -> None:
        if a.stage not in policies:
            raise UsageError(f"stage {a.stage} of {a.model} has no rollout policy to clear")
        del policies[a.stage]

    return _change_policies(c, a.model, clear)


def _change_policies(
    c: RegistryClient, model_id: str, change: Callable[[dict[str, res.RolloutPolicy]], None]
) -> Output:
    """Read-modify-write of a model's rollout policies, guarded by the model's etag."""
    model = c.get_model(model_id).model
    policies = {stage: model.rollout_policies[stage] for stage in model.rollout_policies}
    change(policies)
    resp = c.update_model(model_id, rollout_policies=policies, etag=model.etag)
    return Output(r.to_json(resp), r.model_details(resp.model))


def models_delete(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.delete_model(a.model, etag=a.etag)
    return Output(r.to_json(resp), f"deleted {a.model} at revision {resp.revision}")


def versions_create(c: RegistryClient, a: argparse.Namespace) -> Output:
    uri, sha256, size = a.artifact_uri, a.sha256, a.size
    if a.artifact is not None:
        try:
            sha256, size = r.file_digest(a.artifact)
        except OSError as exc:
            raise UsageError(f"--artifact: {exc}") from None
        uri = uri or a.artifact.resolve().as_uri()
    if not uri or not sha256 or size is None:
        raise UsageError(
            "give --artifact FILE, or all of --artifact-uri, --sha256 and --size-bytes"
        )
    try:
        card = a.model_card_file.read_text(encoding="utf-8") if a.model_card_file else ""
    except OSError as exc:
        raise UsageError(f"--model-card-file: {exc}") from None
    lineage = res.Lineage(
        training_run=a.training_run,
        code_commit=a.code_commit,
        dataset_version=a.dataset_version,
        dataset_sha256=a.dataset_sha256,
    )
    resp = c.create_version(
        a.model,
        artifact_uri=uri,
        sha256=sha256,
        size_bytes=size,
        framework=a.framework,
        signature=a.signature,
        metrics=dict(a.metric),
        params=dict(a.param),
        lineage=lineage,
        model_card=card,
        description=a.description,
        tags=dict(a.tag),
    )
    return Output(r.to_json(resp), r.version_details(resp.model_version))


def versions_get(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.get_version(a.model, a.version)
    return Output(r.to_json(resp), r.version_details(resp.model_version))


def versions_list(c: RegistryClient, a: argparse.Namespace) -> Output:
    state = STATES[a.state] if a.state else None
    versions = _take(c.iter_versions(a.model, state=state), a.limit)
    return Output({"model_versions": [r.to_json(v) for v in versions]}, r.versions_table(versions))


def versions_update(c: RegistryClient, a: argparse.Namespace) -> Output:
    tags = {} if a.clear_tags else (dict(a.tag) if a.tag else None)
    if a.description is None and tags is None and a.sunset is None and not a.clear_sunset:
        raise UsageError(
            "nothing to update: give --description, --tag, --sunset-time or --clear-sunset-time"
        )
    resp = c.update_version(
        a.model,
        a.version,
        description=a.description,
        tags=tags,
        sunset_time=a.sunset,
        clear_sunset_time=a.clear_sunset,
        etag=a.etag,
    )
    return Output(r.to_json(resp), r.version_details(resp.model_version))


def stages_list(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.list_stages(a.model)
    warnings = r.pin_warnings(resp.stages, rq.model_id(a.model))
    return Output(r.to_json(resp), r.stages_table(resp.stages)
                  + (f"\n\n{warnings}" if warnings else ""))


def status(c: RegistryClient, a: argparse.Namespace) -> Output:
    """Every stage of a model; with regions, also the version each region has, and its lag."""
    listed = _regions_or_none(c) or ("", [])
    if len(listed[1]) <= 1:
        return stages_list(c, a)
    views = rg.survey(c, a, rg.model_status(a.model), listed)
    own = next(v for v in views if v.region.name == listed[0])
    if own.stages is None:
        raise own.error or RuntimeError("no stages")  # the model is missing here: exit 1
    warnings = rg.pin_warnings(views, rq.model_id(a.model))
    text = "\n\n".join((r.stages_table(own.stages.stages), rg.stages_by_region(views),
                         rg.regions_table(views), *([warnings] if warnings else [])))
    data = {**r.to_json(own.stages), "regions": [rg.view_json(v) for v in views]}
    return Output(data, text)


def regions(c: RegistryClient, a: argparse.Namespace) -> Output:
    """Every region of the topology, each asked through its own servers."""
    views = rg.survey(c, a, rg.region_status)
    return Output({"regions": [rg.view_json(v) for v in views]}, rg.regions_table(views))


def stages_get(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.get_stage(a.model, a.stage)
    return Output(r.to_json(resp), r.stage_details(resp.stage))


def promote(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.promote(a.model, a.stage, a.version, etag=a.etag, reason=a.reason, hotfix=a.hotfix)
    if resp.rollout.name:
        started = (f"rollout {resp.rollout.name} started: {ro.progress_line(resp.rollout)}"
                   f"\nrevision {resp.revision}")
        if a.no_wait:
            return Output(r.to_json(resp), started)
        return Output(None, "", stream=_follow_rollout(c, resp.rollout, started))
    p = resp.stage
    text = f"{r.last_segment(p.name)}: {r.version_label(p.previous_version)} -> v{p.version}"
    if resp.archived_version:
        text += f" (archived v{resp.archived_version})"
    if p.backfill_required:
        text += " [hotfix: back-fill through staging required]"
    etag = r.unquote_etag(p.etag)
    return Output(r.to_json(resp), f"{text}\netag {etag}, revision {resp.revision}")


def rollback(c: RegistryClient, a: argparse.Namespace) -> Output:
    if a.local or a.region:
        return _pin(c, a)
    resp = c.rollback(
        a.model,
        a.stage,
        to_version=a.to,
        etag=a.etag,
        reason=a.reason,
        allow_unserved=a.allow_unserved,
    )
    p = resp.stage
    text = f"{r.last_segment(p.name)}: rolled back v{resp.rolled_back_version} -> v{p.version}"
    skipped = "".join(f"\nskipped v{s.version}: {s.detail}" for s in resp.skipped)
    etag = r.unquote_etag(p.etag)
    return Output(r.to_json(resp), f"{text}{skipped}\netag {etag}, revision {resp.revision}")


def _pin(c: RegistryClient, a: argparse.Namespace) -> Output:
    """``rollback --local --region R``: break glass in region R, through R's own server."""
    if not (a.local and a.region):
        raise UsageError("a rollback in one region only is break glass: give both --local and "
                         "--region REGION (the region of the --target server)")
    if a.etag:
        raise UsageError("--etag does not apply to --local (the pin is not the primary's pointer)")
    if not a.reason.strip():
        raise UsageError("--local needs --reason (break glass is audited)")
    resp = c.pin_stage(a.model, a.stage, region=a.region, reason=a.reason, to_version=a.to,
                       allow_unserved=a.allow_unserved)
    p, pin = resp.stage, resp.stage.local_pin
    text = (f"{r.last_segment(p.name)}: PINNED (break glass) in {r.last_segment(pin.region)} to "
            f"v{pin.version} (the primary says {r.version_label(pin.primary_version)}); "
            f"audited as {resp.audit_event.name}, reported to the primary once it is reachable")
    skipped = "".join(f"\nskipped v{s.version}: {s.detail}" for s in resp.skipped)
    return Output(r.to_json(resp), f"{text}{skipped}\nrevision {resp.revision}")


def stages_unpin(c: RegistryClient, a: argparse.Namespace) -> Output:
    """Clear a region's break-glass pin: it follows the primary again."""
    resp = c.unpin_stage(a.model, a.stage, region=a.region, reason=a.reason)
    region = r.last_segment(resp.cleared_pin.region)
    text = (f"{r.last_segment(resp.stage.name)}: pin cleared in {region} (was "
            f"v{resp.cleared_pin.version}); following the primary's "
            f"{r.version_label(resp.stage.version)}")
    return Output(r.to_json(resp), f"{text}\nrevision {resp.revision}")


def stages_clear(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.clear_stage(a.model, a.stage, etag=a.etag, reason=a.reason, force=a.force)
    p = resp.stage
    text = f"{r.last_segment(p.name)}: cleared (was v{resp.cleared_version})"
    etag = r.unquote_etag(p.etag)
    return Output(r.to_json(resp), f"{text}\netag {etag}, revision {resp.revision}")


def history(c: RegistryClient, a: argparse.Namespace) -> Output:
    entries = _take(c.iter_stage_history(a.model, a.stage), a.limit)
    return Output({"entries": [r.to_json(e) for e in entries]}, r.history_table(entries))


def audit(c: RegistryClient, a: argparse.Namespace) -> Output:
    events = _take(
        c.iter_audit_events(
            model=a.model, actor=a.actor_filter, start_time=a.since, end_time=a.until
        ),
        a.limit,
    )
    return Output({"audit_events": [r.to_json(e) for e in events]}, r.audit_table(events))


def nodes(c: RegistryClient, a: argparse.Namespace) -> Output:
    found = list(c.iter_nodes(region=a.region, model=a.model))
    return Output({"nodes": [r.to_json(n) for n in found]}, rf.nodes_table(found))


def rollout(c: RegistryClient, a: argparse.Namespace) -> Output:
    """A stage's rollout: the server's fleet view; with regions, every region's, added up."""
    listed = _regions_or_none(c) if not a.region else None
    if listed is None or len(listed[1]) <= 1:
        resp = c.rollout_status(a.model, a.stage, region=a.region)
        return Output(r.to_json(resp), rf.rollout_text(resp))
    views = rg.survey(c, a, rg.model_rollout(a.model, a.stage), listed)
    parts = [rg.rollouts_by_region(views)]
    parts += [f"{r.last_segment(v.region.name)}:\n{rf.rollout_text(v.rollout)}" for v in views
              if v.rollout is not None and v.rollout.lagging]
    return Output(rg.rollout_json(views), "\n\n".join(parts))


def _regions_or_none(c: RegistryClient) -> tuple[str, list[Any]] | None:
    """The deployment's regions, or None from a server that predates them."""
    try:
        return rg.list_regions(c)
    except RegistryError as exc:
        if exc.code != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return None


def watch(c: RegistryClient, a: argparse.Namespace) -> Output:
    if a.from_revision < 0:
        raise UsageError("--start-revision must be >= 0")
    messages = c.watch_stages(
        models=[rq.model_id(a.model)], stages=a.stage, start_revision=a.from_revision
    )
    return Output(None, "", stream=_watch_output(messages, bookmarks=a.bookmarks))


def _watch_output(
    messages: Iterable[ws.WatchStagesResponse], *, bookmarks: bool
) -> Generator[Output, None, None]:
    for msg in messages:
        if msg.type == ws.WATCH_MESSAGE_TYPE_BOOKMARK and not bookmarks:
            continue
        yield Output(r.to_json(msg), "\n".join(rf.watch_lines(msg, bookmarks=bookmarks)))


def _follow_rollout(
    c: RegistryClient, rollout: res.Rollout, first: str
) -> Generator[Output, None, None]:
    """A line per change of the rollout until it is done; an abort ends in an error (exit 1)."""
    yield Output(r.to_json(rollout), first)
    last = ro.progress_line(rollout)
    for msg in c.watch_rollout(rollout.name):
        line = ro.progress_line(msg.rollout)
        if line != last:
            last = line
            yield Output(r.to_json(msg), line)
        if msg.rollout.state == res.ROLLOUT_STATE_ABORTED:
            raise AbortedError(f"rollout {rollout.name} aborted: {msg.rollout.abort_reason}",
                               reason="ROLLOUT_ABORTED",
                               metadata={"rollout": rollout.name})


def rollouts_list(c: RegistryClient, a: argparse.Namespace) -> Output:
    rollouts = _take(c.iter_rollouts(a.model, a.stage), a.limit)
    return Output({"rollouts": [r.to_json(x) for x in rollouts]}, ro.rollouts_table(rollouts))


def _rollout_arg(a: argparse.Namespace) -> str:
    if a.id is None:
        return rq.rollout_name(a.model)
    if a.stage is None:
        raise UsageError("give a rollout name (models/M/stages/S/rollouts/N) or MODEL STAGE ID")
    return rq.rollout_name(a.model, a.stage, a.id)


def rollouts_get(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.get_rollout(_rollout_arg(a))
    return Output(r.to_json(resp), ro.rollout_details(resp.rollout))


def rollouts_watch(c: RegistryClient, a: argparse.Namespace) -> Output:
    def lines() -> Generator[Output, None, None]:
        for msg in c.watch_rollout(_rollout_arg(a)):
            yield Output(r.to_json(msg), ro.progress_line(msg.rollout))

    return Output(None, "", stream=lines())


def rollouts_cancel(c: RegistryClient, a: argparse.Namespace) -> Output:
    if not a.reason.strip():
        raise UsageError("--reason is required: it is recorded in the rollout and the audit")
    resp = c.cancel_rollout(_rollout_arg(a), reason=a.reason)
    return Output(r.to_json(resp), ro.progress_line(resp.rollout))


def _take(items: Iterable[_T], limit: int) -> list[_T]:
    return list(itertools.islice(items, limit or None))
