"""The installed ``modelreg`` command end to end: ``modelreg up`` in a child process, the CLI
in others, exactly as an operator runs them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelreg.server.embedded_etcd import free_port
from tests.up_process import MODELREG, Up


def _etcd_pids(data_dir: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", "--", f"--data-dir {data_dir}"], capture_output=True,
                           text=True)
    return [int(p) for p in found.stdout.split()]


class TestModelregUp:
    def test_serves_health_reflection_and_metrics(self, up):
        """`modelreg up` answers health SERVING, lists its services by reflection, and
        exports Prometheus metrics.
        """
        with grpc.insecure_channel(up.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name for r in replies for s in r.list_services_response.service}
        assert "modelreg.v1.ModelService" in names
        up.cli("models", "list")
        with urllib.request.urlopen(f"http://{up.metrics}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert 'modelreg_rpcs_total{code="OK",method="ListModels"}' in text

    def test_sigterm_stops_server_and_etcd_and_data_persists(self, tmp_path):
        """SIGTERM stops the server and its etcd child cleanly; a new `up` on the same data
        dir has the state.
        """
        first = Up(tmp_path / "data")
        first.start()
        try:
            first.cli("models", "create", "persisted")
            assert _etcd_pids(first.data_dir / "etcd")
        finally:
            assert first.stop() == 0
        assert _etcd_pids(first.data_dir / "etcd") == []
        second = Up(tmp_path / "data")
        second.start()
        try:
            models = second.cli_json("models", "list")
            assert "persisted" in json.dumps(models)
        finally:
            assert second.stop(signal.SIGINT) == 0


class TestCli:
    def test_seed_flow(self, up):
        """Register, promote through staging to production, roll back, read history and audit."""
        up.cli("models", "create", "fraud-detector", "--description", "card fraud")
        for n in (1, 2):
            up.cli("versions", "create", "fraud-detector", "--artifact-uri",
                   f"file:///models/fd-{n}.bin", "--sha256", f"{n}" * 64, "--size-bytes", "100",
                   "--metric", "auc=0.9")
        up.cli("promote", "fraud-detector", "staging", "1")
        up.cli("promote", "fraud-detector", "production", "1", "--reason", "first")
        up.cli("promote", "fraud-detector", "staging", "2")
        promoted = up.cli_json("promote", "fraud-detector", "production", "2", "--reason", "auc")
        assert promoted["archived_version"] == 1
        assert promoted["stage"]["version"] == 2
        table = up.cli("status", "fraud-detector").stdout
        assert "production" in table and "staging" in table
        rolled = up.cli_json("rollback", "fraud-detector", "production", "--reason", "p99")
        assert rolled["stage"]["version"] == 1 and rolled["rolled_back_version"] == 2
        history = up.cli("history", "fraud-detector", "production").stdout
        assert "ROLLBACK" in history.upper()
        audit = up.cli_json("audit", "--model", "fraud-detector")
        assert json.dumps(audit).count('"ops"') >= 7

    def test_refusals_are_one_line_with_exit_codes(self, up):
        """A refused request prints one error line naming the rule and exits 1; bad usage 2."""
        up.cli("models", "create", "refusals")
        up.cli("versions", "create", "refusals", "--artifact-uri", "file:///r.bin",
               "--sha256", "a" * 64, "--size-bytes", "1")
        skipped = up.cli("promote", "refusals", "production", "1", check=False)
        assert skipped.returncode == 1
        assert skipped.stderr.count("\n") == 1 and "STAGING_REQUIRED" in skipped.stderr
        latest = up.cli("promote", "refusals", "latest", "1", check=False)
        assert latest.returncode == 1 and "INVALID_ARGUMENT" in latest.stderr
        usage = up.cli("promote", "refusals", check=False)
        assert usage.returncode == 2

    def test_unreachable_server_exits_3(self):
        """With no server listening the CLI says so in one line and exits 3."""
        done = subprocess.run(
            [MODELREG, "--target", f"127.0.0.1:{free_port()}", "--timeout", "2", "models",
             "list"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 3
        assert done.stderr.strip().count("\n") == 0 and "UNAVAILABLE" in done.stderr
