"""The incident of issue 14 end to end: ``modelreg up`` as a process, real watcher nodes that
fetch, verify and load artifacts, and the real ``modelreg`` binary for every operator command.

v1 served, v3 refused by every node (its artifact no longer matches its digest), v4 promoted:
``modelreg rollback fraud-detector production`` must land on v1 and say it skipped v3. The
fleet view must drop a failure once it no longer applies, and a node that stops cleanly must
leave the fleet view at once. ``modelreg stages clear`` empties stages until the model can go.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from modelreg.client import RegistryClient
from modelreg.client.watcher import Backoff, ThreadedModelWatcher
from modelreg.v1 import resources_pb2 as res
from tests.up_process import Up

MODEL = "fraud-detector"
POLL = 30.0
T = TypeVar("T")


def poll(check: Callable[[], T], what: str, timeout: float = POLL) -> T:
    """The first truthy result of ``check``; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.05)
    return result


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    """``modelreg up`` on a fresh data dir, stopped after the test."""
    server = Up(tmp_path / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _register(up: Up, directory: Path, n: int) -> Path:
    path = directory / f"fraud-{n}.bin"
    path.write_bytes(f"fraud model {n}\n".encode() * 50)
    up.cli("versions", "create", MODEL, "--artifact", str(path))
    return path


def _promote(up: Up, version: int) -> None:
    for stage in ("staging", "production"):
        up.cli("promote", MODEL, stage, str(version), "--reason", f"ship v{version}")


def _served(client: RegistryClient) -> dict[str, tuple[int, int]]:
    """Map node id to (serving, failed) in production, as the fleet view reports it."""
    name = f"models/{MODEL}/stages/production"
    return {n.node_id: next((s.serving_version, s.failed_version) for s in n.stages
                            if s.stage == name)
            for n in client.list_nodes(model=MODEL).nodes}


class TestRollbackIncident:
    def test_rollback_skips_refused_version_and_the_fleet_view_tells_the_truth(
        self, up: Up, tmp_path: Path
    ) -> None:
        """The issue's incident through the real CLI: rollback lands on v1 naming v3 as
        refused; naming v3 is refused; after a rollback away from a refused version the
        FAILED column clears without a swap; a stopped node leaves the fleet view at once.
        """
        artifacts = tmp_path / "artifacts"
        artifacts.mkdir()
        up.cli("models", "create", MODEL)
        for n in (1, 2, 3, 4):
            path = _register(up, artifacts, n)
            if n == 3:  # the artifact changes after registration: its digest no longer holds
                path.write_bytes(path.read_bytes() + b"tampered")
        _promote(up, 1)
        nodes = {
            node_id: ThreadedModelWatcher(
                MODEL, "production", Path.read_bytes, target=up.target, node_id=node_id,
                cache_dir=tmp_path / node_id, retry_backoff=Backoff(0.2, 1.0))
            for node_id in ("node-a", "node-b")
        }
        with RegistryClient(up.target) as client:
            try:
                for watcher in nodes.values():
                    watcher.start()
                for watcher in nodes.values():
                    watcher.wait_for_version(1, timeout=POLL)
                poll(lambda: _served(client) == {"node-a": (1, 0), "node-b": (1, 0)},
                     "both nodes report serving v1")

                _promote(up, 3)
                poll(lambda: _served(client) == {"node-a": (1, 3), "node-b": (1, 3)},
                     "both nodes refuse v3 and keep serving v1")
                _promote(up, 4)
                for watcher in nodes.values():
                    watcher.wait_for_version(4, timeout=POLL)
                poll(lambda: _served(client) == {"node-a": (4, 0), "node-b": (4, 0)},
                     "both nodes report serving v4")

                done = up.cli("rollback", MODEL, "production", "--reason", "v4 regressed")
                assert "rolled back v4 -> v1" in done.stdout, done.stdout
                assert "skipped v3: refused by the fleet" in done.stdout, done.stdout
                for watcher in nodes.values():
                    watcher.wait_for_version(1, timeout=POLL)
                event = next(client.iter_audit_events(model=MODEL))
                assert event.action == res.AUDIT_ACTION_ROLLBACK
                assert (event.from_value, event.to_value) == ("4", "1")
                assert [(s.version, s.reason) for s in event.skipped] == [
                    (3, res.SKIP_REASON_REFUSED)]

                refused = up.cli("rollback", MODEL, "production", "--to", "3", check=False)
                assert refused.returncode == 1
                assert "VERSION_REFUSED_BY_FLEET" in refused.stderr
                assert "version 3" in refused.stderr

                # v3 again, refused again; a rollback away from it leaves the nodes on v1
                # without a swap: the failure must still leave the fleet view.
                _promote(up, 3)
                poll(lambda: _served(client) == {"node-a": (1, 3), "node-b": (1, 3)},
                     "both nodes refuse v3 again")
                assert "v3 failed" in up.cli("rollout", MODEL, "production").stdout
                up.cli("rollback", MODEL, "production", "--reason", "v3 is broken")
                poll(lambda: _served(client) == {"node-a": (1, 0), "node-b": (1, 0)},
                     "the nodes stop reporting the failure of v3")
                rollout = up.cli("rollout", MODEL, "production").stdout
                assert "failed" not in rollout and "2/2 nodes serve v1" in rollout, rollout

                nodes["node-b"].stop()
                assert set(_served(client)) == {"node-a"}  # at once, not after its lease
                assert "node-b" not in up.cli("nodes").stdout
            finally:
                for watcher in nodes.values():
                    watcher.stop()
            assert _served(client) == {}

    def test_stages_clear_until_the_model_can_be_deleted(self, up: Up, tmp_path: Path) -> None:
        """``modelreg stages clear`` empties a custom stage, refuses production without
        --force, clears it with --force and a reason, and then the model can be deleted.
        """
        up.cli("models", "create", MODEL, "--custom-stage", "canary")
        _register(up, tmp_path, 1)
        _promote(up, 1)
        up.cli("promote", MODEL, "canary", "1")
        assert "canary: cleared (was v1)" in up.cli("stages", "clear", MODEL, "canary").stdout
        refused = up.cli("stages", "clear", MODEL, "production", check=False)
        assert refused.returncode == 1 and "PROTECTED_STAGE" in refused.stderr
        no_reason = up.cli("stages", "clear", MODEL, "production", "--force", check=False)
        assert no_reason.returncode == 1 and "reason" in no_reason.stderr
        up.cli("stages", "clear", MODEL, "production", "--force", "--reason", "retired")
        staged = up.cli("models", "delete", MODEL, check=False)
        assert staged.returncode == 1 and "MODEL_HAS_STAGED_VERSIONS" in staged.stderr
        assert "staging (v1)" in staged.stderr
        up.cli("stages", "clear", MODEL, "staging")
        up.cli("models", "delete", MODEL)
        gone = up.cli("models", "get", MODEL, check=False)
        assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr
