"""The README's two fresh-machine commands stay true to what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class TestReadme:
    def test_ci_runs_the_readme_test_command_verbatim(self):
        """.ci/run ends by running, character for character, the README's test command."""
        readme = (ROOT / "README.md").read_text()
        blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
        test_command = next(b for b in blocks if "pytest" in b)
        assert "modelreg up" in blocks[0]
        last = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")][-1]
        assert last == test_command
