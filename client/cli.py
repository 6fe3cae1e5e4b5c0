"""The ``modelreg`` command line: operate the registry, or start its server.

Exit codes: 0 success; 1 the server refused the request (invalid, not found, lifecycle rule,
stale etag, ...); 2 usage error (bad flags or local input); 3 no answer (server or its etcd
unavailable, or the deadline passed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from modelreg.client import _render as r
from modelreg.client._common import DEFAULT_TARGET
from modelreg.client._sync_client import RegistryClient
from modelreg.client.errors import DeadlineExceededError, RegistryError, UnavailableError
from modelreg.v1 import resources_pb2 as res

SERVER_COMMANDS = {
    "serve": "run the gRPC server against an etcd cluster (--etcd host:port,...) or an embedded one",
    "up": "run a local server on an embedded etcd with a persistent data dir; Ctrl-C stops both",
}
"""Commands owned by ``modelreg.server.main``: their arguments are passed through untouched."""

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_STATES = {r.state_name(v): v for v in res.VersionState.values() if v}


class UsageError(Exception):
    """Local input the CLI cannot use (exit code 2)."""


@dataclass(frozen=True)
class Output:
    """What a command prints: ``data`` with ``--json``, ``text`` otherwise."""

    data: Any
    text: str


Handler = Callable[[RegistryClient, argparse.Namespace], Output]


def _models_create(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.create_model(
        a.model, description=a.description or "", tags=dict(a.tag), custom_stages=a.custom_stage
    )
    return Output(r.to_json(resp), r.model_details(resp.model))


def _models_get(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.get_model(a.model)
    return Output(r.to_json(resp), r.model_details(resp.model))


def _models_list(c: RegistryClient, a: argparse.Namespace) -> Output:
    models = _take(c.iter_models(), a.limit)
    return Output({"models": [r.to_json(m) for m in models]}, r.models_table(models))


def _models_update(c: RegistryClient, a: argparse.Namespace) -> Output:
    tags = {} if a.clear_tags else (dict(a.tag) if a.tag else None)
    stages = [] if a.clear_custom_stages else (a.custom_stage or None)
    if a.description is None and tags is None and stages is None:
        raise UsageError("nothing to update: give --description, --tag or --custom-stage")
    resp = c.update_model(
        a.model, description=a.description, tags=tags, custom_stages=stages, etag=a.etag
    )
    return Output(r.to_json(resp), r.model_details(resp.model))


def _models_delete(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.delete_model(a.model, etag=a.etag)
    return Output(r.to_json(resp), f"deleted {a.model} at revision {resp.revision}")


def _versions_create(c: RegistryClient, a: argparse.Namespace) -> Output:
    uri, sha256, size = a.artifact_uri, a.sha256, a.size
    if a.artifact is not None:
        try:
            sha256, size = r.file_digest(a.artifact)
        except OSError as exc:
            raise UsageError(f"--artifact: {exc}") from None
        uri = uri or a.artifact.resolve().as_uri()
    if not uri or not sha256 or size is None:
        raise UsageError("give --artifact FILE, or all of --artifact-uri, --sha256 and --size")
    try:
        card = a.model_card_file.read_text(encoding="utf-8") if a.model_card_file else ""
    except OSError as exc:
        raise UsageError(f"--model-card-file: {exc}") from None
    lineage = res.Lineage(
        training_run=a.training_run, code_commit=a.code_commit,
        dataset_version=a.dataset_version, dataset_sha256=a.dataset_sha256,
    )  # fmt: skip
    resp = c.create_version(
        a.model, artifact_uri=uri, sha256=sha256, size_bytes=size, framework=a.framework,
        signature=a.signature, metrics=dict(a.metric), params=dict(a.param), lineage=lineage,
        model_card=card, description=a.description, tags=dict(a.tag),
    )  # fmt: skip
    return Output(r.to_json(resp), r.version_details(resp.model_version))


def _versions_get(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.get_version(a.model, a.version)
    return Output(r.to_json(resp), r.version_details(resp.model_version))


def _versions_list(c: RegistryClient, a: argparse.Namespace) -> Output:
    state = _STATES[a.state] if a.state else None
    versions = _take(c.iter_versions(a.model, state=state), a.limit)
    return Output({"model_versions": [r.to_json(v) for v in versions]}, r.versions_table(versions))


def _versions_update(c: RegistryClient, a: argparse.Namespace) -> Output:
    tags = {} if a.clear_tags else (dict(a.tag) if a.tag else None)
    if a.description is None and tags is None and a.sunset is None and not a.clear_sunset:
        raise UsageError("nothing to update: give --description, --tag, --sunset or --clear-sunset")
    resp = c.update_version(
        a.model, a.version, description=a.description, tags=tags, sunset_time=a.sunset,
        clear_sunset_time=a.clear_sunset, etag=a.etag,
    )  # fmt: skip
    return Output(r.to_json(resp), r.version_details(resp.model_version))


def _stages_list(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.list_stages(a.model)
    return Output(r.to_json(resp), r.stages_table(resp.stages))


def _stages_get(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.get_stage(a.model, a.stage)
    return Output(r.to_json(resp), r.stage_details(resp.stage))


def _promote(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.promote(a.model, a.stage, a.version, etag=a.etag, reason=a.reason, hotfix=a.hotfix)
    p = resp.stage
    text = f"{r.last_segment(p.name)}: {r.version_label(p.previous_version)} -> v{p.version}"
    if resp.archived_version:
        text += f" (archived v{resp.archived_version})"
    if p.backfill_required:
        text += " [hotfix: back-fill through staging required]"
    return Output(r.to_json(resp), f"{text}\netag {p.etag}, revision {resp.revision}")


def _rollback(c: RegistryClient, a: argparse.Namespace) -> Output:
    resp = c.rollback(a.model, a.stage, to_version=a.to, etag=a.etag, reason=a.reason)
    p = resp.stage
    text = f"{r.last_segment(p.name)}: rolled back v{resp.rolled_back_version} -> v{p.version}"
    return Output(r.to_json(resp), f"{text}\netag {p.etag}, revision {resp.revision}")


def _history(c: RegistryClient, a: argparse.Namespace) -> Output:
    entries = _take(c.iter_stage_history(a.model, a.stage), a.limit)
    return Output({"entries": [r.to_json(e) for e in entries]}, r.history_table(entries))


def _audit(c: RegistryClient, a: argparse.Namespace) -> Output:
    events = _take(
        c.iter_audit_events(model=a.model, actor=a.actor, start_time=a.since, end_time=a.until),
        a.limit,
    )
    return Output({"audit_events": [r.to_json(e) for e in events]}, r.audit_table(events))


def _take(items: Any, limit: int) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if limit and len(out) >= limit:
            break
        out.append(item)
    return out


def build_parser() -> argparse.ArgumentParser:
    """Build the ``modelreg`` argument parser (everything but ``serve``/``up`` arguments)."""
    # Global flags are accepted before or after the command; SUPPRESS keeps a flag given
    # before the command from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection and output")
    g.add_argument("--target", default=argparse.SUPPRESS, help="server host:port")
    g.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per call")
    g.add_argument("--actor", default=argparse.SUPPRESS, help="who you are, for the audit trail")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    parser = argparse.ArgumentParser(
        prog="modelreg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    target = os.environ.get("MODELREG_TARGET") or DEFAULT_TARGET
    parser.add_argument("--target", default=target, help=f"server host:port (default {target})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (10)")
    parser.add_argument("--actor", help="who you are (default $MODELREG_ACTOR or OS user)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    cmds = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, handler: Handler, text: str, **kw: Any) -> Any:
        p = group.add_parser(name, help=text, description=text, parents=[common], **kw)
        p.set_defaults(handler=handler)
        return p

    def model_arg(p: Any) -> None:
        p.add_argument("model", help="model id (fraud-detector) or name (models/fraud-detector)")

    def annotations(p: Any, what: str) -> None:
        p.add_argument("--description", help=f"{what} description")
        p.add_argument("--tag", type=r.parse_key_value, action="append", default=[],
                       metavar="K=V", help="tag (repeatable; replaces all tags on update)")  # fmt: skip

    models = cmds.add_parser("models", help="create, read, update and delete models")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(msub, "create", _models_create, "register a model id")
    model_arg(p)
    annotations(p, "model")
    p.add_argument("--custom-stage", action="append", default=[], metavar="STAGE",
                   help="declare a stage besides staging/production, e.g. canary (repeatable)")  # fmt: skip
    model_arg(leaf(msub, "get", _models_get, "show one model"))
    p = leaf(msub, "list", _models_list, "list models in name order")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default all)")
    p = leaf(msub, "update", _models_update, "change description, tags or custom stages")
    model_arg(p)
    annotations(p, "new")
    p.add_argument("--clear-tags", action="store_true", help="remove every tag")
    p.add_argument("--custom-stage", action="append", metavar="STAGE",
                   help="the full new list of custom stages (repeatable)")  # fmt: skip
    p.add_argument("--clear-custom-stages", action="store_true", help="declare no custom stage")
    p.add_argument("--etag", help="only if the model's etag is still this")
    p = leaf(msub, "delete", _models_delete, "delete a model and its versions (no stage set)")
    model_arg(p)
    p.add_argument("--etag", help="only if the model's etag is still this")

    versions = cmds.add_parser("versions", help="register, read and annotate model versions")
    vsub = versions.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(vsub, "create", _versions_create, "register the next immutable version of a model")
    model_arg(p)
    p.add_argument("--artifact", type=Path, metavar="FILE",
                   help="local artifact: computes --sha256 and --size, URI file://FILE")  # fmt: skip
    p.add_argument("--artifact-uri", help="where the artifact lives (file://, s3://, https://)")
    p.add_argument("--sha256", help="lowercase hex sha256 of the artifact")
    p.add_argument("--size", type=int, help="artifact size in bytes")
    p.add_argument("--framework", default="", help="e.g. sklearn, pytorch, onnx")
    p.add_argument("--signature", default="", help="input/output signature (JSON recommended)")
    p.add_argument("--metric", type=r.parse_metric, action="append", default=[], metavar="K=V",
                   help="evaluation metric, a number (repeatable)")  # fmt: skip
    p.add_argument("--param", type=r.parse_key_value, action="append", default=[],
                   metavar="K=V", help="training parameter (repeatable)")  # fmt: skip
    for flag in ("training-run", "code-commit", "dataset-version", "dataset-sha256"):
        p.add_argument(f"--{flag}", default="", help=f"lineage: {flag.replace('-', ' ')}")
    p.add_argument("--model-card-file", type=Path, metavar="FILE", help="Markdown model card")
    annotations(p, "version")
    p.set_defaults(description="")
    p = leaf(vsub, "get", _versions_get, "show one version with its state and stages")
    model_arg(p)
    p.add_argument("version", type=int, help="version number")
    p = leaf(vsub, "list", _versions_list, "list a model's versions in number order")
    model_arg(p)
    p.add_argument("--state", choices=sorted(_STATES), help="only versions in this state")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default all)")
    p = leaf(vsub, "update", _versions_update, "change a version's description, tags or sunset")
    model_arg(p)
    p.add_argument("version", type=int, help="version number")
    annotations(p, "new")
    p.add_argument("--clear-tags", action="store_true", help="remove every tag")
    p.add_argument("--sunset", type=r.parse_time, metavar="ISO", help="deprecate from this time")
    p.add_argument("--clear-sunset", action="store_true", help="remove the sunset time")
    p.add_argument("--etag", help="only if the version's etag is still this")

    stages = cmds.add_parser("stages", help="read stage pointers")
    ssub = stages.add_subparsers(dest="action", metavar="ACTION", required=True)
    model_arg(leaf(ssub, "list", _stages_list, "show every stage of a model with its version"))
    p = leaf(ssub, "get", _stages_get, "show one stage pointer, rollback candidates included")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    model_arg(leaf(cmds, "status", _stages_list, "show every stage of a model with its version"))

    p = leaf(cmds, "promote", _promote, "point a stage at a version, under the lifecycle rules")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("version", type=int, help="version number")
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    p.add_argument("--hotfix", action="store_true",
                   help="straight to production without staging; needs --reason")  # fmt: skip
    p.add_argument("--etag", help="only if the stage's etag is still this")
    p = leaf(cmds, "rollback", _rollback, "move a stage back to its last known-good version")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("--to", type=int, default=0, metavar="VERSION", help="a named former version")
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    p.add_argument("--etag", help="only if the stage's etag is still this")
    p = leaf(cmds, "history", _history, "list the moves of a stage pointer, newest first")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("--limit", type=int, default=50, help="at most this many (50; 0 for all)")
    p = leaf(cmds, "audit", _audit, "list audit events, newest first")
    p.add_argument("--model", help="only events of this model")
    p.add_argument("--actor", dest="actor_filter", help="only events by this actor")
    p.add_argument("--since", type=r.parse_time, metavar="ISO", help="at or after this time")
    p.add_argument("--until", type=r.parse_time, metavar="ISO", help="before this time")
    p.add_argument("--limit", type=int, default=50, help="at most this many (50; 0 for all)")

    for name, text in SERVER_COMMANDS.items():
        p = cmds.add_parser(name, help=text, description=text, add_help=False)
        p.add_argument("server_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``modelreg`` command line and return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in SERVER_COMMANDS:
        return _run_server(args_list[0], args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command in SERVER_COMMANDS:
        return _run_server(args.command, args.server_args)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Execute parsed arguments against the server; print the result or one error line."""
    handler: Handler = args.handler
    if args.command == "audit":  # --actor of audit filters; the global --actor identifies
        args.actor, args.actor_filter = getattr(args, "actor_filter", None), args.actor
        args.actor, args.actor_filter = args.actor_filter, args.actor
    try:
        with RegistryClient(args.target, actor=args.actor, timeout=args.timeout) as client:
            out = handler(client, _audit_args(args))
    except (UnavailableError, DeadlineExceededError) as exc:
        return _fail(exc, EXIT_UNAVAILABLE)
    except RegistryError as exc:
        return _fail(exc, EXIT_REFUSED)
    except (UsageError, ValueError) as exc:
        return _fail(exc, EXIT_USAGE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(out.data, indent=2, sort_keys=True))
    elif out.text:
        print(out.text)
    return EXIT_OK


def _audit_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.command != "audit":
        return args
    return argparse.Namespace(**{**vars(args), "actor": args.actor_filter})


def _fail(exc: Exception, code: int) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return code


def _version() -> str:
    try:
        return metadata.version("modelreg")
    except metadata.PackageNotFoundError:
        return "unknown"


def _run_server(command: str, rest: list[str]) -> int:
    # The one sanctioned import of server code (see the import-linter contract in pyproject):
    # lazy, so the client never loads the server, and the server owns these flags and --help.
    from modelreg.server import main as server_main  # noqa: PLC0415

    return server_main.main([command, *rest])


if __name__ == "__main__":
    sys.exit(main())
