"""The ``modelreg`` command line: operate the registry, or start its server.

Exit codes: 0 success (also when the reader of stdout stops early, as ``| head`` does); 1 the
server refused the request (invalid, not found, lifecycle rule, stale etag, ...); 2 usage error
(bad flags or local input); 3 no answer (server or its etcd unavailable, or the deadline
passed); 4 ``serve``/``up`` cannot start on this machine (an address in use, the data dir held
by another modelreg, no etcd binary, no server extra installed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from modelreg.client import _commands as cmd
from modelreg.client import _json
from modelreg.client import _render as r
from modelreg.client._config import DEFAULT_TARGET, TARGET_ENV
from modelreg.client._sync_client import RegistryClient
from modelreg.client.errors import DeadlineExceededError, RegistryError, UnavailableError

SERVER_COMMANDS = {
    "serve": (
        "run the gRPC server against an etcd cluster (--etcd host:port,...) or an embedded one"
    ),
    "up": "run a local server on an embedded etcd with a persistent data dir; Ctrl-C stops both",
    "replicate": "run a region's replicator: copy the primary's etcd prefix into the region's",
}
"""Commands owned by ``modelreg.server.main`` (``replicate``: ``modelreg.replication.main``):
their arguments are passed through untouched."""

_DESCRIPTION = """\
Operate the modelreg registry (models, versions, stage pointers, audit), see what the serving
fleet runs (nodes, rollout) and how each region is doing (regions), follow stage pointers live
(watch), or start its server.

exit codes: 0 ok (also when a reader such as `| head` closes stdout early), 1 refused by the
            server, 2 usage error, 3 server or etcd unavailable (or deadline exceeded),
            4 serve/up cannot start here (address in use, data dir held, no etcd),
            130 interrupted

--json prints what the API returns, shaped for scripts: proto field names (snake_case), every
field present; versions, revisions and other 64-bit integers as numbers; enums as short
lower-case names (promote, production, changes); etags without quotes ("11"), as tables print
them; times as RFC 3339 UTC strings. A failed command prints one object on stderr instead:
{"error": {"code": "FAILED_PRECONDITION", "reason": "STAGING_REQUIRED", "message": "...",
"metadata": {...}, "field_violations": [{"field": "...", "description": "..."}]}}; input the
CLI refuses itself has code INVALID_ARGUMENT and reason USAGE (exit 2).

Flags are named after the API fields they set (--size-bytes sets size_bytes); a repeatable
flag takes the singular (--tag sets tags). --etag takes an etag as printed (11) or as the API
spells it ('"11"').
"""

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_LOCAL = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


class _ParseError(Exception):
    """A usage error argparse found; :func:`main` prints it as text or, with ``--json``, JSON."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(f"{parser.prog}: {message}")
        self.usage = parser.format_usage()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through ``add_subparsers``, subparsers) that raises on misuse.

    argparse prints usage errors itself, as text; raising lets ``--json`` print them as JSON.
    """

    def error(self, message: str) -> NoReturn:
        raise _ParseError(self, message)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``modelreg`` argument parser (everything but ``serve``/``up`` arguments)."""
    # Global flags are accepted before or after the command; SUPPRESS keeps a flag given
    # before the command from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection and output")
    g.add_argument("--target", default=argparse.SUPPRESS, help="server host:port")
    g.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds per call")
    g.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="JSON (see modelreg -h)"
    )
    # `audit --actor` filters by actor, so only the other commands take the identity flag here.
    common_actor = argparse.ArgumentParser(add_help=False, parents=[common])
    common_actor.add_argument_group("identity").add_argument(
        "--actor", default=argparse.SUPPRESS, help="who you are, for the audit trail"
    )

    parser = _Parser(
        prog="modelreg",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # No default here: the client's config resolves $MODELREG_TARGET, as for every other tool.
    target = f"${TARGET_ENV}, else {DEFAULT_TARGET}"
    parser.add_argument("--target", help=f"server host:port (default {target})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (10)")
    parser.add_argument("--actor", help="who you are (default $MODELREG_ACTOR or OS user)")
    parser.add_argument(
        "--json", action="store_true", help="JSON for scripts, errors too (shape below)"
    )
    cmds = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, handler: cmd.Handler, text: str) -> Any:
        parent = common if handler is cmd.audit else common_actor
        p = group.add_parser(name, help=text, description=text, parents=[parent])
        p.set_defaults(handler=handler)
        return p

    def renamed(p: Any, old: str, dest: str, **kw: Any) -> None:
        # The spelling from before flags followed the API's field names: accepted, not shown.
        p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)

    def model_arg(p: Any) -> None:
        p.add_argument("model", help="model id (fraud-detector) or name (models/fraud-detector)")

    def annotations(p: Any, what: str) -> None:
        p.add_argument("--description", help=f"{what} description")
        p.add_argument(
            "--tag",
            type=r.parse_key_value,
            action="append",
            default=[],
            metavar="K=V",
            help="tag (repeatable; replaces all tags on update)",
        )

    models = cmds.add_parser("models", help="create, read, update and delete models")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(msub, "create", cmd.models_create, "register a model id")
    model_arg(p)
    annotations(p, "model")
    p.add_argument(
        "--custom-stage",
        action="append",
        default=[],
        metavar="STAGE",
        help="declare a stage besides staging/production, e.g. canary (repeatable)",
    )
    model_arg(leaf(msub, "get", cmd.models_get, "show one model"))
    p = leaf(msub, "list", cmd.models_list, "list models in name order")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default all)")
    p = leaf(msub, "update", cmd.models_update, "change description, tags or custom stages")
    model_arg(p)
    annotations(p, "new")
    p.add_argument("--clear-tags", action="store_true", help="remove every tag")
    p.add_argument(
        "--custom-stage",
        action="append",
        metavar="STAGE",
        help="the full new list of custom stages (repeatable)",
    )
    p.add_argument("--clear-custom-stages", action="store_true", help="declare no custom stage")
    p.add_argument("--etag", type=r.parse_etag, help="only if the model's etag is still this")
    p = leaf(msub, "set-policy", cmd.models_set_policy,
             "govern a stage by a rollout policy: its promotions become two-phase rollouts "
             "that switch every region together")
    model_arg(p)
    p.add_argument("stage", help="the stage it governs, e.g. production")
    p.add_argument("--region", action="append", metavar="REGION",
                   help="a region that must be ready (repeatable; default every region)")
    p.add_argument("--readiness-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of a region's live nodes that must have prepared (default 1)")
    p.add_argument("--prepare-deadline", type=float, metavar="SECONDS",
                   help="abort if not every region is ready by then (default 300)")
    p.add_argument("--activation-margin", type=float, metavar="SECONDS",
                   help="how far after the commit every node switches (default 2)")
    p.add_argument("--guard", action="append", type=r.parse_guard, metavar="FIGURE<=MAX",
                   help="roll back by itself when nodes report FIGURE above MAX after a commit, "
                        "e.g. error_rate<=0.05 (repeatable; the rollout guard)")
    p.add_argument("--bake-window", type=float, metavar="SECONDS",
                   help="how long after the switch the guard watches (default 600)")
    p.add_argument("--breach-duration", type=float, metavar="SECONDS",
                   help="how long a region must breach before the guard rolls back (default 0)")
    p.add_argument("--node-fraction", type=float, default=0.0, metavar="F",
                   help="fraction of a region's nodes on the new version that must breach "
                        "for the guard (default 0.5)")
    p = leaf(msub, "clear-policy", cmd.models_clear_policy,
             "remove a stage's rollout policy: its promotions move the pointer at once again")
    model_arg(p)
    p.add_argument("stage", help="the stage it governs, e.g. production")
    p = leaf(msub, "delete", cmd.models_delete, "delete a model and its versions (no stage set)")
    model_arg(p)
    p.add_argument("--etag", type=r.parse_etag, help="only if the model's etag is still this")

    versions = cmds.add_parser("versions", help="register, read and annotate model versions")
    vsub = versions.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(vsub, "create", cmd.versions_create, "register the next immutable version of a model")
    model_arg(p)
    p.add_argument(
        "--artifact",
        type=Path,
        metavar="FILE",
        help="local artifact: computes --sha256 and --size-bytes, URI file://FILE",
    )
    p.add_argument("--artifact-uri", help="where the artifact lives (file://, s3://, https://)")
    p.add_argument("--sha256", help="lowercase hex sha256 of the artifact")
    p.add_argument("--size-bytes", type=int, dest="size", metavar="N", help="artifact size")
    renamed(p, "--size", "size", type=int)
    p.add_argument("--framework", default="", help="e.g. sklearn, pytorch, onnx")
    p.add_argument("--signature", default="", help="input/output signature (JSON recommended)")
    p.add_argument(
        "--metric",
        type=r.parse_metric,
        action="append",
        default=[],
        metavar="K=V",
        help="evaluation metric, a number (repeatable)",
    )
    p.add_argument(
        "--param",
        type=r.parse_key_value,
        action="append",
        default=[],
        metavar="K=V",
        help="training parameter (repeatable)",
    )
    for flag in ("training-run", "code-commit", "dataset-version", "dataset-sha256"):
        p.add_argument(f"--{flag}", default="", help=f"lineage: {flag.replace('-', ' ')}")
    p.add_argument("--model-card-file", type=Path, metavar="FILE", help="Markdown model card")
    annotations(p, "version")
    p.set_defaults(description="")
    p = leaf(vsub, "get", cmd.versions_get, "show one version with its state and stages")
    model_arg(p)
    p.add_argument("version", type=int, help="version number")
    p = leaf(vsub, "list", cmd.versions_list, "list a model's versions in number order")
    model_arg(p)
    p.add_argument("--state", choices=sorted(cmd.STATES), help="only versions in this state")
    p.add_argument("--limit", type=int, default=0, help="at most this many (default all)")
    p = leaf(vsub, "update", cmd.versions_update, "change a version's description, tags or sunset")
    model_arg(p)
    p.add_argument("version", type=int, help="version number")
    annotations(p, "new")
    p.add_argument("--clear-tags", action="store_true", help="remove every tag")
    p.add_argument(
        "--sunset-time",
        type=r.parse_time,
        dest="sunset",
        metavar="ISO",
        help="deprecate from this time",
    )
    renamed(p, "--sunset", "sunset", type=r.parse_time)
    p.add_argument(
        "--clear-sunset-time", action="store_true", dest="clear_sunset", help="remove the sunset"
    )
    renamed(p, "--clear-sunset", "clear_sunset", action="store_true")
    p.add_argument("--etag", type=r.parse_etag, help="only if the version's etag is still this")

    stages = cmds.add_parser("stages", help="read stage pointers, or empty one")
    ssub = stages.add_subparsers(dest="action", metavar="ACTION", required=True)
    model_arg(leaf(ssub, "list", cmd.stages_list, "show every stage of a model with its version"))
    p = leaf(ssub, "get", cmd.stages_get, "show one stage pointer, rollback candidates included")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p = leaf(ssub, "clear", cmd.stages_clear, "empty a stage pointer (production needs --force)")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("--reason", default="", help="why (recorded; required with --force)")
    p.add_argument("--force", action="store_true", help="required to clear production")
    p.add_argument("--etag", help="only if the stage's etag is still this")
    p = leaf(ssub, "unpin", cmd.stages_unpin,
             "clear a region's break-glass pin (rollback --local): it follows the primary again")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("--region", required=True,
                   help="the pinned region; --target must be a server of it")
    p.add_argument("--reason", required=True, help="why (recorded in the region's audit trail "
                   "and, once reachable, the primary's)")
    model_arg(leaf(cmds, "status", cmd.status, "show every stage of a model with its version, "
                   "and with regions the version in each region and its lag"))
    leaf(cmds, "regions", cmd.regions,
         "list the deployment's regions: health, applied revision, replication lag")

    p = leaf(cmds, "promote", cmd.promote, "point a stage at a version, under the lifecycle rules")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("version", type=int, help="version number")
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    p.add_argument(
        "--hotfix",
        action="store_true",
        help="straight to production without staging; needs --reason",
    )
    p.add_argument("--etag", type=r.parse_etag, help="only if the stage's etag is still this")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="on a stage with a rollout policy: print the rollout's name and return, instead "
        "of following it until every region switched (or it aborted: exit 1)",
    )
    p = leaf(cmds, "rollback", cmd.rollback, "move a stage back to its last known-good version")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument(
        "--to-version", type=int, default=0, dest="to", metavar="VERSION", help="a named former one"
    )
    renamed(p, "--to", "to", type=int)
    p.add_argument(
        "--allow-unserved",
        action="store_true",
        help="with --to-version and --reason: even if that version never served in the stage",
    )
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    p.add_argument("--etag", type=r.parse_etag, help="only if the stage's etag is still this")
    p.add_argument(
        "--local",
        action="store_true",
        help="break glass: pin the stage in --region only, written by that region's server "
        "(--target) with the primary unreachable or not; needs --reason; served there until "
        "`modelreg stages unpin`, and reported to the primary once reachable",
    )
    p.add_argument("--region", default="", help="with --local: the region to pin (the "
                   "--target server's own)")
    rollouts = cmds.add_parser(
        "rollouts", help="follow and cancel the rollouts of stages with a rollout policy",
        description="follow and cancel the two-phase rollouts of stages with a rollout policy: "
        "every region prepares the target, then all switch together at one activation time")
    rsub = rollouts.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(rsub, "list", cmd.rollouts_list, "list a stage's rollouts, newest first")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("--limit", type=int, default=50, help="at most this many (50; 0 for all)")
    for action, handler, text in (
        ("get", cmd.rollouts_get, "show one rollout: state, move, readiness per region"),
        ("watch", cmd.rollouts_watch, "follow one rollout: a line per change until it is done"),
        ("cancel", cmd.rollouts_cancel, "abort a rollout still preparing: nothing moves"),
    ):
        p = leaf(rsub, action, handler, text)
        p.add_argument("model", help="a rollout name (models/M/stages/S/rollouts/N), or a model")
        p.add_argument("stage", nargs="?", help="with a model: the stage")
        p.add_argument("id", nargs="?", type=int, help="with a model and stage: the rollout id")
        if action == "cancel":
            p.add_argument("--reason", default="", help="why (required; recorded)")
    p = leaf(cmds, "history", cmd.history, "list the moves of a stage pointer, newest first")
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("--limit", type=int, default=50, help="at most this many (50; 0 for all)")
    p = leaf(cmds, "audit", cmd.audit, "list audit events, newest first")
    p.add_argument("--model", help="only events of this model")
    p.add_argument("--actor", dest="actor_filter", help="only events by this actor (not you)")
    for flag, dest, text in (("start", "since", "at or after"), ("end", "until", "before")):
        p.add_argument(
            f"--{flag}-time", type=r.parse_time, dest=dest, metavar="ISO", help=f"{text} this time"
        )
        renamed(p, f"--{dest}", dest, type=r.parse_time)
    p.add_argument("--limit", type=int, default=50, help="at most this many (50; 0 for all)")

    p = leaf(cmds, "nodes", cmd.nodes, "list live serving nodes: one row per node and stage")
    p.add_argument("--region", help="only nodes of this region")
    p.add_argument("--model", help="only nodes following a stage of this model")
    p = leaf(
        cmds, "rollout", cmd.rollout,
        "show how many live nodes serve a stage's committed version, in every region",
    )
    model_arg(p)
    p.add_argument("stage", help="staging, production or a custom stage")
    p.add_argument("--region", help="only count nodes of this region")
    p = leaf(
        cmds,
        "watch",
        cmd.watch,
        "follow stage pointers live: the current ones, then every change, until Ctrl-C",
    )
    model_arg(p)
    p.add_argument("stage", nargs="*", help="only these stages (default every stage)")
    p.add_argument(
        "--start-revision",
        type=int,
        default=0,
        dest="from_revision",
        metavar="N",
        help="every change from etcd revision N on, instead of the current pointers first",
    )
    renamed(p, "--from-revision", "from_revision", type=int)
    p.add_argument(
        "--bookmarks", action="store_true", help="also print the bookmarks sent while idle"
    )
    p.epilog = (
        "One line per change: REVISION  models/M/stages/S  v1 -> v2  (promote)  by ACTOR  reason"
        "; --json prints each message as one JSON object per line (shaped as modelreg -h says)."
        " Runs until Ctrl-C (exit 130) or until the server ends the stream (exit 0); it does"
        " not reconnect."
    )

    for name, text in SERVER_COMMANDS.items():
        # Listed for --help only: main() hands these commands to the server before parsing.
        cmds.add_parser(name, help=text, description=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``modelreg`` command line and return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    server_command = _server_command(args_list)
    if server_command is not None:
        return _run_server(*server_command)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except _ParseError as exc:
        as_json = "--json" in args_list
        if not as_json:
            print(exc.usage, end="", file=sys.stderr)
        return _fail(exc, EXIT_USAGE, as_json=as_json)
    except SystemExit as exc:  # --help or --version, already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code = run(args)
        sys.stdout.flush()  # so that a closed pipe shows here, not at the interpreter's exit
    except BrokenPipeError:
        # `modelreg audit | head`: the reader has had enough. Python's documented recipe
        # (signal module, "Note on SIGPIPE"): point stdout at devnull, so the flush at exit
        # cannot fail again, and end quietly; 0, as the command itself did its work.
        _silence_stdout()
        return EXIT_OK
    return code


def _server_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """Find ``serve``/``up`` after any global flags; the server parses what follows.

    A ``serve``/``up`` word is the command if this parser, given the words up to it, reads it
    as the command (not as a flag's value or a model id): the parser knows its own flags.
    """
    candidates = [i for i, arg in enumerate(argv) if arg in SERVER_COMMANDS]
    if not candidates:
        return None
    parser = build_parser()
    for i in candidates:
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            try:
                command = parser.parse_args(argv[: i + 1]).command
            except (SystemExit, _ParseError):
                continue
        if command == argv[i]:
            return command, argv[i + 1 :]
    return None


def run(args: argparse.Namespace) -> int:
    """Execute parsed arguments against the server; print the result or one error line."""
    handler: cmd.Handler = args.handler
    try:
        with RegistryClient(args.target, actor=args.actor, timeout=args.timeout) as client:
            out = handler(client, args)
            if out.stream is not None:
                # Printed as it arrives, while the client (and its stream) is open. Closing the
                # stream first cancels its call, whatever ended the loop (Ctrl-C included),
                # before the channel goes: no call is left for the channel's teardown.
                with contextlib.closing(out.stream) as stream:
                    for item in stream:
                        _print_line(item, json_lines=args.json)
                return EXIT_OK
    except (UnavailableError, DeadlineExceededError) as exc:
        return _fail(exc, EXIT_UNAVAILABLE, as_json=args.json)
    except RegistryError as exc:
        return _fail(exc, EXIT_REFUSED, as_json=args.json)
    except (cmd.UsageError, ValueError) as exc:
        return _fail(exc, EXIT_USAGE, as_json=args.json)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(out.data, indent=2, sort_keys=True))
    elif out.text:
        print(out.text)
    return EXIT_OK


def _print_line(out: cmd.Output, *, json_lines: bool) -> None:
    if json_lines:
        if out.data is not None:
            print(json.dumps(out.data, sort_keys=True), flush=True)
    elif out.text:
        print(out.text, flush=True)


def _silence_stdout() -> None:
    # Python would report the broken pipe again when flushing stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fail(exc: Exception, code: int, *, as_json: bool) -> int:
    """Print the error on stderr, one line (one JSON object with ``--json``); return ``code``."""
    if as_json:
        print(json.dumps(_json.error_to_json(exc), sort_keys=True), file=sys.stderr)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return code


def _version() -> str:
    try:
        return metadata.version("modelreg")
    except metadata.PackageNotFoundError:
        return "unknown"


def _run_server(command: str, rest: list[str]) -> int:
    # The sanctioned imports of server and replicator code (see the import-linter contract in
    # pyproject): lazy, so the client never loads them, and they own these flags and --help.
    try:
        if command == "replicate":
            from modelreg.replication.main import main as replicate
        else:
            from modelreg.server import main as server_main
    except ModuleNotFoundError as exc:
        # A base install (an inference node's) has the CLI but not the server's packages.
        print(f"error: modelreg {command} needs the server extra (missing {exc.name}): "
              "pip install 'modelreg[server]'", file=sys.stderr)
        return EXIT_LOCAL
    if command == "replicate":
        return replicate(rest)
    return server_main.main([command, *rest])


if __name__ == "__main__":
    sys.exit(main())
