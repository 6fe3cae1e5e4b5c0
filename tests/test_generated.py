"""The committed generated protobuf code is exactly what protos/gen.sh produces."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "modelreg" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generated_names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


class TestGeneratedCode:
    def test_regenerating_the_protos_changes_nothing(self, tmp_path: Path) -> None:
        """Running protos/gen.sh's protoc command on the .proto files reproduces every file."""
        # A missing generator is a failure, never a skip: the check would silently stop running.
        assert importlib.util.find_spec("grpc_tools") is not None, (
            "grpc_tools is not installed; install the test extra: pip install -e '.[test]'"
        )
        scripts = sysconfig.get_path("scripts")
        # gen.sh finds the mypy plugins on PATH; so must we, even from an unactivated venv.
        path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
        for plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
            assert shutil.which(plugin, path=path), f"{plugin} not found; install mypy-protobuf"

        work_dir = tmp_path / "modelreg" / "v1"
        work_dir.mkdir(parents=True)
        protos = sorted(PROTO_DIR.glob("*.proto"))
        assert protos, f"no .proto files in {PROTO_DIR}"
        for proto in protos:
            shutil.copy2(proto, work_dir / proto.name)

        # The same invocation as protos/gen.sh, run from the temporary protos root.
        result = subprocess.run(
            [
                sys.executable, "-m", "grpc_tools.protoc", "-I.",
                "--python_out=.", "--grpc_python_out=.", "--mypy_out=.", "--mypy_grpc_out=.",
                *(f"modelreg/v1/{proto.name}" for proto in protos),
            ],
            cwd=tmp_path,
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"protoc failed:\n{result.stdout}\n{result.stderr}"

        generated = _generated_names(work_dir)
        committed = _generated_names(PROTO_DIR)
        assert generated, "protoc produced no files"
        assert committed == generated, (
            f"missing from the repo: {sorted(generated - committed)}; "
            f"stale in the repo: {sorted(committed - generated)}; run protos/gen.sh"
        )
        differing = [
            name
            for name in sorted(generated)
            if (work_dir / name).read_bytes() != (PROTO_DIR / name).read_bytes()
        ]
        assert not differing, f"out of date, run protos/gen.sh and commit: {differing}"
