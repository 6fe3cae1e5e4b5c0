"""The rollout commands end to end on ``modelreg up`` (one region, its coordinator on): a stage
governed by ``models set-policy``, ``promote`` following its rollout to the commit,
``--no-wait``, ``rollouts list|get|watch|cancel``, and clearing the policy.
"""

from __future__ import annotations

import json

import grpc

from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc as fs_grpc
from tests.up_process import Up


def _node_not_preparing(up: Up, model: str, stage: str) -> None:
    """A live node that follows the stage and never prepares: the region is never ready."""
    with grpc.insecure_channel(up.target) as channel:
        fs_grpc.FleetServiceStub(channel).ReportNode(fs.ReportNodeRequest(
            node=fs.Node(node_id=f"{model}-node", stages=[
                fs.ServedStage(stage=f"models/{model}/stages/{stage}")]),
            ttl_seconds=300), timeout=10)


def _model(up: Up, model: str, versions: int = 2) -> None:
    up.cli("models", "create", model)
    for n in range(1, versions + 1):
        up.cli("versions", "create", model, "--artifact-uri", f"file:///models/{model}-{n}.bin",
               "--sha256", f"{n}" * 64, "--size-bytes", "10")
        up.cli("promote", model, "staging", str(n))


class TestRolloutCommands:
    def test_set_policy_then_promote_follows_the_rollout_to_its_commit(self, up):
        """A governed production promotion prints the rollout's progress and ends committed
        (the region has no node following the stage: nothing to wait for), exit 0; the
        pointer moved with an activation time; the rollout is listed and shown.
        """
        _model(up, "governed")
        shown = up.cli("models", "set-policy", "governed", "production",
                       "--readiness-fraction", "0.9", "--prepare-deadline", "60",
                       "--activation-margin", "0.5").stdout
        assert "rollout policies: production: every region; 90% ready; deadline 60s; " \
               "margin 0.5s" in shown
        done = up.cli("promote", "governed", "production", "2", "--reason", "first")
        lines = done.stdout.splitlines()
        assert lines[0].startswith("rollout models/governed/stages/production/rollouts/1 started")
        assert lines[-1].startswith("committed - -> v2: committed at revision ")
        stage = up.cli_json("stages", "get", "governed", "production")["stage"]
        assert stage["version"] == 2 and stage["rollout"].endswith("/rollouts/1")
        assert stage["activation_time"]
        listed = up.cli("rollouts", "list", "governed", "production").stdout.splitlines()
        assert listed[0].split()[:4] == ["ID", "STATE", "KIND", "MOVE"]
        assert listed[1].split()[:3] == ["1", "committed", "promote"]
        got = up.cli_json("rollouts", "get", "governed", "production", "1")["rollout"]
        assert got["state"] == "committed" and got["done"] is True
        assert got["commit_revision"] > 0 and got["readiness"][0]["ready"] is True
        details = up.cli("rollouts", "get", "models/governed/stages/production/rollouts/1")
        assert "state:" in details.stdout and "committed" in details.stdout
        cleared = up.cli("models", "clear-policy", "governed", "production").stdout
        assert "rollout policies" not in cleared
        assert up.cli_json("models", "get", "governed")["model"]["rollout_policies"] == {}
        again = up.cli("models", "clear-policy", "governed", "production", check=False)
        assert again.returncode == 2 and "no rollout policy" in again.stderr

    def test_no_wait_then_watch_and_cancel(self, up):
        """--no-wait returns the rollout at once; a cancel names the reason and nothing moves;
        watching a done rollout prints its final line and ends; a second cancel exits 1.
        """
        _model(up, "slow")
        up.cli("models", "set-policy", "slow", "production", "--prepare-deadline", "3600")
        _node_not_preparing(up, "slow", "production")
        started = up.cli_json("promote", "slow", "production", "2", "--no-wait")
        name = started["rollout"]["name"]
        assert started["rollout"]["state"] == "preparing"
        assert started["stage"]["pending_rollout"] == name
        cancelled = up.cli_json("rollouts", "cancel", name, "--reason", "wrong version")
        assert cancelled["rollout"]["state"] == "aborted"
        assert cancelled["rollout"]["cancelled_by"] == "ops"
        assert "wrong version" in cancelled["rollout"]["abort_reason"]
        watched = up.cli("rollouts", "watch", name).stdout.strip().splitlines()
        assert watched[-1] == "aborted - -> v2: aborted: " + cancelled["rollout"]["abort_reason"]
        again = up.cli("--json", "rollouts", "cancel", name, "--reason", "x", check=False)
        assert again.returncode == 1
        assert json.loads(again.stderr)["error"]["reason"] == "ROLLOUT_DONE"
        stage = up.cli_json("stages", "get", "slow", "production")["stage"]
        assert stage["version"] == 0 and stage["pending_rollout"] == ""

    def test_usage_errors(self, up):
        """A cancel without a reason and a half-given rollout name are refused locally."""
        no_reason = up.cli("rollouts", "cancel", "models/m/stages/production/rollouts/1",
                           check=False)
        assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
        half = up.cli("rollouts", "get", "m", "production", check=False)
        assert half.returncode == 2
