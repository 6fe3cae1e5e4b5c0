"""The rollout guard from the CLI on ``modelreg up`` (one region, its coordinator on):
``models set-policy --guard ...`` puts a guard on production, a node that serves the new
version reports a breaching figure, and ``rollouts get`` shows the guard's verdict and
evidence once it has rolled the stage back.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from modelreg.v1 import fleet_service_pb2 as fs
from modelreg.v1 import fleet_service_pb2_grpc as fs_grpc
from tests.up_process import Up


def _report(up: Up, model: str, **served: Any) -> None:
    """The model's one serving node reports what it does with production."""
    with grpc.insecure_channel(up.target) as channel:
        fs_grpc.FleetServiceStub(channel).ReportNode(fs.ReportNodeRequest(
            node=fs.Node(node_id=f"{model}-node", stages=[
                fs.ServedStage(stage=f"models/{model}/stages/production", **served)]),
            ttl_seconds=300), timeout=10)


def _until(check: Any, what: str, timeout: float = 60.0) -> Any:
    """Calls ``check()`` until it is truthy; returns it (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.1)
    return value


class TestGuardCommands:
    def test_set_policy_with_a_guard_then_the_guard_rolls_back(self, up: Up) -> None:
        """v1 serves in production; a policy with a guard; v2 rolled out and served; the node
        reports an error rate of 0.3: production is back on v1, and ``rollouts get`` says the
        guard rolled it back, with the evidence.
        """
        model = "guarded"
        up.cli("models", "create", model)
        for n in (1, 2):
            up.cli("versions", "create", model, "--artifact-uri", f"file:///m/{model}-{n}.bin",
                   "--sha256", f"{n}" * 64, "--size-bytes", "10")
        up.cli("promote", model, "staging", "1")
        up.cli("promote", model, "production", "1")
        up.cli("promote", model, "staging", "2")
        _report(up, model, serving_version=1, prepared_version=1)
        shown = up.cli("models", "set-policy", model, "production", "--guard", "error_rate<=0.05",
                       "--guard", "latency_p99_ms<=250", "--bake-window", "60",
                       "--breach-duration", "0", "--activation-margin", "0.1").stdout
        assert ("guard error_rate<=0.05, latency_p99_ms<=250 for 60s after the switch (breach "
                "0s, 50% of nodes)") in shown
        policy = up.cli_json("models", "get", model)["model"]["rollout_policies"]["production"]
        assert policy["guard"]["max_values"] == {"error_rate": 0.05, "latency_p99_ms": 250.0}

        name = up.cli_json("promote", model, "production", "2", "--no-wait")["rollout"]["name"]
        _report(up, model, serving_version=1, prepared_version=2, rollout=name)
        watched = up.cli("rollouts", "watch", name).stdout.strip().splitlines()
        assert watched[-1].startswith("committed v1 -> v2: committed at revision ")
        watching = up.cli("rollouts", "get", name).stdout
        assert "guard status: watching until " in watching
        _report(up, model, serving_version=2, prepared_version=2, health={"error_rate": 0.3})

        def verdict() -> dict[str, Any] | None:
            got: dict[str, Any] = up.cli_json("rollouts", "get", name)["rollout"]
            return got if "guard" in got else None
        got = _until(verdict, "the guard's verdict")
        assert got["guard"]["rollback"].endswith("/rollouts/2")
        assert up.cli_json("stages", "get", model, "production")["stage"]["version"] == 1
        details = up.cli("rollouts", "get", name).stdout
        assert "guard status: rolled back by its guard at " in details
        assert "evidence:" in details
        assert "error_rate 0.3 > max 0.05 on 1 of 1 live nodes" in details
        assert "BREACHED" in details  # the health table of the look that fired

    def test_guard_usage_errors(self, up: Up) -> None:
        """Guard shape without figures, and a threshold that is not FIGURE<=MAX, are refused
        locally (exit 2); a bad figure name by the server (exit 1, the field named).
        """
        up.cli("models", "create", "guard-usage")
        shape = up.cli("models", "set-policy", "guard-usage", "production", "--bake-window", "60",
                       check=False)
        assert shape.returncode == 2 and "--guard FIGURE<=MAX" in shape.stderr
        bad = up.cli("models", "set-policy", "guard-usage", "production", "--guard",
                      "error_rate=0.05", check=False)
        assert bad.returncode == 2 and "FIGURE<=MAX" in bad.stderr
        name = up.cli("models", "set-policy", "guard-usage", "production", "--guard",
                      "Error Rate<=0.05", check=False)
        assert name.returncode == 1
        assert 'guard.max_values["Error Rate"]' in name.stderr
