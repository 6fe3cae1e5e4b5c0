"""The installed ``modelreg``'s tables: the same rules in every one, and a node's error that
keeps its cause in ``rollout`` and ``nodes``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import grpc
import pytest

from modelreg.client import _render_fleet as render
from modelreg.client.artifacts import DigestMismatchError, fetch_artifact
from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc
from tests.up_process import Up

VERSION_COLUMNS = {"VERSION", "PREVIOUS", "FROM", "TO", "SERVING", "PREPARED"}


def _columns(text: str) -> list[dict[str, str]]:
    """Parse a table by its header: columns start where a header word follows 2+ spaces.

    Asserts the rules every table keeps: a header per column, no empty cell, and no space in
    any cell but the last column's (free text).
    """
    header, *rows = text.splitlines()
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", header)]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    names = [header[a:b].strip() for a, b in bounds]
    assert all(names), header
    parsed = []
    for row in rows:
        cells = [row[a:b] for a, b in bounds]
        for name, cell in zip(names[:-1], cells[:-1], strict=True):
            assert cell.strip() and " " not in cell.rstrip() and cell.endswith("  "), (name, row)
        assert cells[-1].strip(), (names[-1], row)
        parsed.append(dict(zip(names, (c.strip() for c in cells), strict=True)))
    return parsed


def _report(up: Up, node_id: str, stage: str, serving: int, failed: int, error: str) -> None:
    with grpc.insecure_channel(up.target) as channel:
        fleet_service_pb2_grpc.FleetServiceStub(channel).ReportNode(
            fs.ReportNodeRequest(ttl_seconds=60, node=fs.Node(
                node_id=node_id, region="eu", labels={"pool": "gpu", "zone": "b"},
                stages=[fs.ServedStage(stage=stage, serving_version=serving,
                                       prepared_version=serving, failed_version=failed,
                                       error=error)])),
            timeout=10)


def _sdk_error(tmp_path: Path) -> str:
    """What the watcher SDK reports for a tampered artifact: its own message, not a copy."""
    artifact = tmp_path.joinpath("srv", "models", "fraud-detector", "artifacts", "v3",
                                 "fraud-detector-526ccf00e7e67301.tmdl")
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"x" * 44 + b"tampered\n")
    with pytest.raises(DigestMismatchError) as info:
        fetch_artifact(artifact.as_uri(), tmp_path / "cache",
                       sha256=hashlib.sha256(b"x" * 44).hexdigest(), size_bytes=44)
    return f"{type(info.value).__name__}: {info.value}"


class TestTables:
    def test_every_table_keeps_the_same_rules(self, up: Up) -> None:
        """models, versions, status, history, audit, nodes and rollout print a header over every
        column, `-` for nothing, versions as vN (audit included), and free text last only.
        """
        up.cli("models", "create", "tables", "--custom-stage", "canary",
               "--custom-stage", "shadow")
        for n in (1, 2):
            up.cli("versions", "create", "tables", "--artifact-uri", f"file:///t/{n}.bin",
                   "--sha256", f"{n}" * 64, "--size-bytes", "10")
        up.cli("promote", "tables", "staging", "1")
        up.cli("promote", "tables", "production", "1")
        up.cli("promote", "tables", "production", "2", "--hotfix", "--reason", "hot fix")
        up.cli("rollback", "tables", "production")
        _report(up, "node-t", "models/tables/stages/production", 1, 0, "")

        tables = {
            "models": up.cli("models", "list").stdout,
            "versions": up.cli("versions", "list", "tables").stdout,
            "status": up.cli("status", "tables").stdout,
            "history": up.cli("history", "tables", "production").stdout,
            "audit": up.cli("audit", "--model", "tables").stdout,
            "nodes": up.cli("nodes", "--model", "tables").stdout,
        }
        blocks = up.cli("rollout", "tables", "production").stdout.rstrip().split("\n\n")
        tables["rollout"] = blocks[1]
        parsed = {name: _columns(text) for name, text in tables.items()}
        for name, rows in parsed.items():
            assert rows, name
            for row in rows:
                for column in VERSION_COLUMNS & row.keys():
                    if name != "audit" or row["ACTION"] in ("promote", "rollback"):
                        assert re.fullmatch(r"v\d+|-", row[column]), (name, row)

        history = parsed["history"]
        assert [(r["KIND"], r["FROM"], r["TO"], r["FLAGS"]) for r in history] == [
            ("rollback", "v2", "v1", "-"), ("promote", "v1", "v2", "hotfix"),
            ("promote", "-", "v1", "-")]
        audit = [r for r in parsed["audit"] if r["RESOURCE"].endswith("/production")]
        assert [(r["ACTION"], r["FROM"], r["TO"], r["FLAGS"]) for r in audit] == [
            ("rollback", "v2", "v1", "-"), ("promote", "v1", "v2", "hotfix"),
            ("promote", "-", "v1", "-")]
        assert parsed["rollout"] == [{"VERSION": "v1", "NODES": "1", "COMMITTED": "yes"}]
        assert parsed["nodes"][0]["LABELS"] == "pool=gpu,zone=b"
        model = next(r for r in parsed["models"] if r["MODEL"] == "tables")
        assert model["CUSTOM STAGES"] == "canary,shadow"
        assert re.fullmatch(r"\d+", parsed["status"][0]["ETAG"])


class TestNodeErrors:
    def test_rollout_keeps_the_cause_and_shortens_the_path(self, up: Up, tmp_path: Path) -> None:
        """A node's digest error shows in the rollout summary, the lagging table and `nodes`
        with its cause and the artifact's file name, the directories elided; --json has it all.
        """
        error = _sdk_error(tmp_path)
        assert error.endswith(": more than the registered 44 bytes") and str(tmp_path) in error
        up.cli("models", "create", "fraud-detector")
        for n in (1, 2):
            up.cli("versions", "create", "fraud-detector", "--artifact-uri",
                   f"file:///m/{n}.bin", "--sha256", f"{n}" * 64, "--size-bytes", "44")
            up.cli("promote", "fraud-detector", "staging", str(n))
            up.cli("promote", "fraud-detector", "production", str(n))
        stage = "models/fraud-detector/stages/production"
        _report(up, "demo-1", stage, serving=1, failed=2, error=error)
        short = ("DigestMismatchError: file://{}/fraud-detector-526ccf00e7e67301.tmdl: "
                 "more than the registered 44 bytes")

        out = up.cli("rollout", "fraud-detector", "production").stdout
        summary, _, lagging = out.rstrip().split("\n\n")
        assert summary.endswith(f"1 not yet: demo-1 (v1, v2 failed: {short.format('/...')})")
        row = _columns(lagging.split("\n", 1)[1])[0]
        assert row["FAILED"] == f"v2: {short.format('/…')}"
        nodes = _columns(up.cli("nodes", "--model", "fraud-detector").stdout)
        assert nodes[0]["FAILED"] == f"v2: {short.format('/…')}"
        data = up.cli_json("rollout", "fraud-detector", "production")
        assert data["lagging"][0]["stages"][0]["error"] == error

    def test_a_long_error_keeps_its_end(self, up: Up) -> None:
        """An error too long even without directories loses its middle, marked, not its end."""
        up.cli("models", "create", "long-error")
        up.cli("versions", "create", "long-error", "--artifact-uri", "file:///m/1.bin",
               "--sha256", "1" * 64, "--size-bytes", "1")
        up.cli("promote", "long-error", "staging", "1")
        error = "LoaderError: " + "weights " * 60 + "the real cause"
        _report(up, "node-long", "models/long-error/stages/staging", 0, 1, error)
        summary = up.cli("rollout", "long-error", "staging").stdout.split("\n\n")[0]
        assert re.search(r"v1 failed: LoaderError: weights .*\.\.\..* the real cause\)$",
                         summary)
        assert len(summary) < 250
        cell = _columns(up.cli("nodes", "--model", "long-error").stdout)[0]["FAILED"]
        assert cell.startswith("v1: LoaderError: ") and cell.endswith(" the real cause")
        assert "…" in cell and len(cell) <= len("v1: ") + 120


class TestShortError:
    def test_paths_lose_directories_and_long_text_its_middle(self) -> None:
        """URIs and absolute paths keep scheme, host and file name; short text stays whole."""
        assert render.short_error(
            "ArtifactFetchError: fetching 'https://h.example/a/b/m.bin' failed: "
            "[Errno 2] No such file or directory: '/srv/x/y/z.bin'"
        ) == ("ArtifactFetchError: fetching 'https://h.example/…/m.bin' failed: "
              "[Errno 2] No such file or directory: '/…/z.bin'")
        assert render.short_error("ValueError: bad /tmp/x file:///m/1.bin") == (
            "ValueError: bad /tmp/x file:///m/1.bin")
        assert render.short_error("a\n  b") == "a b"
        cut = render.short_error("E: " + "x" * 300 + " cause", 60)
        assert len(cut) == 60 and cut.startswith("E: x") and cut.endswith("x cause")
