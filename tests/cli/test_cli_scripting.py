"""The installed ``modelreg`` as scripts use it: the ``--json`` shape, errors as JSON on stderr,
``--etag`` as printed, flags named after the API's fields, and a reader that stops early.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from typing import Any

from modelreg.client import cli
from modelreg.server.embedded_etcd import free_port
from modelreg.v1 import (
    fleet_service_pb2,
    model_service_pb2,
    resources_pb2,
    rollout_service_pb2,
    watch_service_pb2,
)
from tests.up_process import MODELREG, Up


def _model(up: Up, model: str, versions: int = 2) -> None:
    up.cli("models", "create", model)
    for n in range(1, versions + 1):
        up.cli("versions", "create", model, "--artifact-uri", f"file:///models/{model}-{n}.bin",
               "--sha256", f"{n:x}" * 64, "--size-bytes", str(40 + n))


def _json_error(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON object a failed ``--json`` command printed on stderr (nothing on stdout)."""
    assert done.stdout == ""
    assert done.stderr.endswith("\n") and done.stderr.count("\n") == 1, done.stderr
    data = json.loads(done.stderr)
    assert list(data) == ["error"]
    assert sorted(data["error"]) == ["code", "field_violations", "message", "metadata", "reason"]
    return data["error"]


def _etag_cell(up: Up, model: str, stage: str) -> str:
    rows = [line.split() for line in up.cli("status", model).stdout.splitlines()]
    return next(r[-1] for r in rows if r[0] == stage)


class TestJsonShape:
    def test_numbers_short_enums_and_bare_etags(self, up: Up) -> None:
        """--json prints versions and revisions as numbers, enums as short lower-case names and
        etags without quotes, in every command's output.
        """
        _model(up, "json-shape")
        up.cli("promote", "json-shape", "staging", "1")
        promoted: Any = up.cli_json("promote", "json-shape", "production", "1", "--reason", "r")
        stage = promoted["stage"]
        assert isinstance(promoted["revision"], int) and stage["version"] == 1
        assert stage["last_move"] == "promote"
        assert stage["etag"] == str(promoted["revision"]) == _etag_cell(up, "json-shape",
                                                                         "production")
        version: Any = up.cli_json("versions", "get", "json-shape", "1")
        mv = version["model_version"]
        assert (mv["version"], mv["size_bytes"], mv["state"]) == (1, 41, "production")
        assert re.fullmatch(r"\d+", mv["etag"])
        listed: Any = up.cli_json("versions", "list", "json-shape", "--state", "registered")
        assert [v["version"] for v in listed["model_versions"]] == [2]
        history: Any = up.cli_json("history", "json-shape", "production")
        entry = history["entries"][0]
        assert (entry["kind"], entry["from_version"], entry["to_version"]) == ("promote", 0, 1)
        assert entry["generation"] == 1
        audit: Any = up.cli_json("audit", "--model", "json-shape", "--limit", "1")
        event = audit["audit_events"][0]
        assert (event["action"], event["revision"]) == ("promote", promoted["revision"])
        rollout: Any = up.cli_json("rollout", "json-shape", "production")
        assert (rollout["total_nodes"], rollout["stage"]["version"]) == (0, 1)

    def test_watch_lines_share_the_shape(self, up: Up) -> None:
        """`watch --json` prints one object per message, with the same numbers and short enums."""
        _model(up, "json-watch", versions=1)
        revision = up.cli_json("promote", "json-watch", "staging", "1")["revision"]
        proc = subprocess.Popen(
            [MODELREG, "--target", up.target, "--json", "watch", "json-watch",
             "--start-revision", str(revision)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = json.loads(proc.stdout.readline())
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        assert (line["type"], line["revision"]) == ("changes", revision)
        change = line["changes"][0]
        assert (change["from_version"], change["stage"]["version"]) == (0, 1)
        assert change["stage"]["last_move"] == "promote"

    def test_every_enum_has_its_short_name(self) -> None:
        """Each enum value of the API prints as its name without the enum's prefix."""
        from modelreg.client._json import short_enum_name

        modules = (resources_pb2, model_service_pb2, fleet_service_pb2, watch_service_pb2,
                   rollout_service_pb2)
        enums = [e for m in modules for e in m.DESCRIPTOR.enum_types_by_name.values()]
        assert len(enums) >= 4
        for enum in enums:
            names = [short_enum_name(enum, v.name) for v in enum.values]
            assert names[0] == "unspecified"
            assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names), names
            assert len(set(names)) == len(names)


class TestJsonErrors:
    def test_refusal_is_one_json_object_on_stderr(self, up: Up) -> None:
        """A refused request with --json prints code, reason, message, metadata and field
        violations as one JSON object on stderr and exits 1; without --json, one text line.
        """
        _model(up, "json-refused", versions=1)
        err = _json_error(up.cli("--json", "promote", "json-refused", "production", "1",
                                 check=False))
        assert (err["code"], err["reason"]) == ("FAILED_PRECONDITION", "STAGING_REQUIRED")
        assert err["message"] and err["field_violations"] == []
        text = up.cli("promote", "json-refused", "production", "1", check=False)
        assert text.returncode == 1
        assert text.stderr.startswith("error: FAILED_PRECONDITION STAGING_REQUIRED")

        bad = up.cli("--json", "versions", "create", "json-refused", "--artifact-uri",
                     "file:///x.bin", "--sha256", "abc", "--size-bytes", "1", check=False)
        assert bad.returncode == 1
        err = _json_error(bad)
        assert err["code"] == "INVALID_ARGUMENT"
        assert [v["field"] for v in err["field_violations"]] == ["model_version.sha256"]
        assert "64 lowercase hex" in err["field_violations"][0]["description"]

    def test_stale_etag_names_the_current_one_unquoted(self, up: Up) -> None:
        """ABORTED carries the current etag in metadata, bare as every etag in JSON."""
        _model(up, "json-stale", versions=2)
        up.cli("promote", "json-stale", "staging", "1")
        current = _etag_cell(up, "json-stale", "staging")
        stale = up.cli("--json", "promote", "json-stale", "staging", "2", "--etag", "1",
                       check=False)
        assert stale.returncode == 1
        err = _json_error(stale)
        assert (err["code"], err["reason"]) == ("ABORTED", "ETAG_MISMATCH")
        assert err["metadata"]["current_etag"] == current

    def test_local_errors_are_json_too(self, up: Up) -> None:
        """Usage errors (argparse's and the CLI's own) exit 2 and an unreachable server exits
        3, each as one JSON object with --json.
        """
        usage = up.cli("--json", "promote", "json-usage", check=False)
        assert usage.returncode == 2
        err = _json_error(usage)
        assert (err["code"], err["reason"]) == ("INVALID_ARGUMENT", "USAGE")
        assert "required: stage, version" in err["message"]
        own = up.cli("watch", "json-usage", "--start-revision", "-1", "--json", check=False)
        assert own.returncode == 2
        assert "--start-revision" in _json_error(own)["message"]
        text = up.cli("promote", "json-usage", check=False)
        assert text.returncode == 2 and text.stderr.startswith("usage: modelreg promote")

        done = subprocess.run(
            [MODELREG, "--json", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2",
             "models", "list"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL)
        assert done.returncode == 3
        assert _json_error(done)["code"] == "UNAVAILABLE"


class TestEtagAsPrinted:
    def test_bare_and_quoted_etags_both_work(self, up: Up) -> None:
        """--etag takes the etag as tables print it (11) and as the API spells it ("11");
        a stale one in either form is refused with exit 1.
        """
        _model(up, "etag-forms", versions=3)
        up.cli("promote", "etag-forms", "staging", "1")
        bare = _etag_cell(up, "etag-forms", "staging")
        assert re.fullmatch(r"\d+", bare)
        up.cli("promote", "etag-forms", "staging", "2", "--etag", bare)
        quoted = f'"{_etag_cell(up, "etag-forms", "staging")}"'
        up.cli("promote", "etag-forms", "staging", "3", "--etag", quoted)
        for stale in (bare, f'"{bare}"'):
            done = up.cli("rollback", "etag-forms", "staging", "--etag", stale, check=False)
            assert done.returncode == 1 and "ETAG_MISMATCH" in done.stderr

        details = up.cli("models", "get", "etag-forms").stdout
        model_etag = re.search(r"^etag:\s+(\S+)$", details, re.M)
        assert model_etag is not None
        up.cli("models", "update", "etag-forms", "--description", "d", "--etag",
               model_etag.group(1))
        version = up.cli_json("versions", "get", "etag-forms", "1")["model_version"]
        up.cli("versions", "update", "etag-forms", "1", "--description", "d", "--etag",
               version["etag"])


class TestClosedStdout:
    @staticmethod
    def _into_closed_pipe(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
        """Runs the CLI with stdout a pipe nobody reads any more, as `| head -1` leaves it."""
        read, write = os.pipe()
        os.close(read)
        try:
            return subprocess.run([MODELREG, "--target", up.target, *args], stdout=write,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                  timeout=60)
        finally:
            os.close(write)

    def test_closed_pipe_exits_quietly(self, up: Up) -> None:
        """A reader that stops early (`modelreg status m | head -1`) ends the CLI with exit 0
        and nothing on stderr, for tables, JSON and streams alike.
        """
        _model(up, "closed-pipe", versions=1)
        up.cli("promote", "closed-pipe", "staging", "1")
        for args in (("status", "closed-pipe"), ("--json", "audit"),
                     ("history", "closed-pipe", "staging"), ("watch", "closed-pipe")):
            done = self._into_closed_pipe(up, *args)
            assert (done.returncode, done.stderr) == (0, ""), args


class TestFlagNames:
    def test_renamed_flags_and_their_old_spellings(self, up: Up) -> None:
        """--size-bytes registers a version; the old --size still works but --help shows only
        the new name; rollback --to-version and audit --start-time/--end-time work.
        """
        up.cli("models", "create", "flag-names")
        for flag in ("--size-bytes", "--size"):
            up.cli("versions", "create", "flag-names", "--artifact-uri", "file:///f.bin",
                   "--sha256", "f" * 64, flag, "44")
        versions: Any = up.cli_json("versions", "list", "flag-names")
        assert [v["size_bytes"] for v in versions["model_versions"]] == [44, 44]
        help_text = up.cli("versions", "create", "-h").stdout
        assert "--size-bytes" in help_text and not re.search(r"--size\b(?!-)", help_text)
        for v in ("1", "2"):
            up.cli("promote", "flag-names", "staging", v)
        rolled: Any = up.cli_json("rollback", "flag-names", "staging", "--to-version", "1")
        assert rolled["stage"]["version"] == 1
        events: Any = up.cli_json("audit", "--model", "flag-names", "--start-time",
                                  "2000-01-01T00:00:00+00:00", "--end-time", "9999-01-01")
        assert len(events["audit_events"]) == 6

    def test_every_flag_is_an_api_field(self) -> None:
        """Every visible flag of every command names the API field it sets (a repeatable flag
        its singular, --clear-X clears field X, --X-file reads field X from a file), or is one
        of the few flags that only steer the CLI.
        """
        modules = (resources_pb2, model_service_pb2, fleet_service_pb2, watch_service_pb2,
                   rollout_service_pb2)
        fields: set[str] = set()
        pending = [m for mod in modules for m in mod.DESCRIPTOR.message_types_by_name.values()]
        while pending:
            message = pending.pop()
            fields |= set(message.fields_by_name)
            pending += message.nested_types
        cli_only = {"help", "target", "timeout", "json", "artifact", "limit", "bookmarks",
                    # promote --no-wait (do not follow the rollout), rollback --local
                    # (break glass: PinStage)
                    "no_wait", "local"}

        def is_field(name: str) -> bool:
            return name in fields or f"{name}s" in fields

        wrong = []
        for command, flag in _visible_flags(cli.build_parser()):
            name = flag.removeprefix("--").replace("-", "_")
            ok = (name in cli_only or is_field(name)
                  or (name.startswith("clear_") and is_field(name.removeprefix("clear_")))
                  or (name.endswith("_file") and is_field(name.removesuffix("_file"))))
            if not ok:
                wrong.append(f"{command} {flag}")
        assert wrong == []


def _visible_flags(parser: argparse.ArgumentParser, path: str = "modelreg"
                   ) -> list[tuple[str, str]]:
    """(command, flag) for every flag --help shows, subcommands included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _visible_flags(sub, f"{path} {name}")
        elif action.help != argparse.SUPPRESS:
            found += [(path, o) for o in action.option_strings if o.startswith("--")]
    return found
