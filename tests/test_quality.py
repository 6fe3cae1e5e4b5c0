"""The code stays ruff-clean, mypy --strict clean, and within its import contracts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*command: str) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"


class TestQuality:
    def test_ruff(self):
        """Ruff finds nothing to complain about anywhere in the repository."""
        _run(sys.executable, "-m", "ruff", "check", ".")

    @pytest.mark.slow
    def test_mypy_strict(self):
        """The server, client and replication packages type-check under mypy --strict."""
        _run(sys.executable, "-m", "mypy", "--strict", "server", "client", "replication")

    def test_import_contracts(self):
        """The domain, the client and replication import only what their layer allows."""
        _run(str(BIN / "lint-imports"))
