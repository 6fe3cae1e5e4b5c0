"""The README's commands stay true: the fresh-machine ones to what CI runs, the CLI examples to
what a person can type in a fresh clone and what the CLI accepts.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from modelreg.client import cli

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

    def test_cli_examples_run_as_typed_in_a_fresh_clone(self):
        """Every `modelreg` the README's shell blocks run is on PATH where it runs: the block
        activates the venv before it, or calls `.venv/bin/modelreg`.
        """
        readme = (ROOT / "README.md").read_text()
        unreachable = []
        for block in re.findall(r"```sh\n(.*?)\n```", readme, re.S):
            active = False
            for command in _commands(block):
                if command[:2] == ["source", ".venv/bin/activate"]:
                    active = True
                elif command[0] == "modelreg" and not active:
                    unreachable.append(" ".join(command))
        assert unreachable == []

    def test_cli_examples_parse(self):
        """Every `modelreg` command line in the README's shell blocks is one the CLI accepts."""
        parser = cli.build_parser()
        readme = (ROOT / "README.md").read_text()
        commands = [c for block in re.findall(r"```sh\n(.*?)\n```", readme, re.S)
                    for c in _commands(block) if Path(c[0]).name == "modelreg"]
        assert len(commands) >= 3
        for command in commands:
            if command[1] not in cli.SERVER_COMMANDS:
                parser.parse_args(command[1:])


def _commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block, in order: lines, split at `&&`, comments dropped."""
    found = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            if words[:cut]:
                found.append(words[:cut])
            words = words[cut + 1:]
    return found
