"""Checks a ``modelreg ...`` command line written somewhere (a compose file, a Kubernetes
manifest, the launcher's plan) with the real parsers, and the real config objects behind them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from modelreg.client import cli
from modelreg.replication.config import AgentConfig
from modelreg.replication.main import build_parser as replicate_parser
from modelreg.server import main as server_main
from modelreg.server import regions_up
from modelreg.server.config import ServerConfig


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


"""Whether ``modelreg serve`` has the regional server mode's flags (another branch adds them)."""


def check_modelreg_command(
    argv: Sequence[str], env: Mapping[str, str] | None = None,
    files: Mapping[str, Path] | None = None,
) -> argparse.Namespace:
    """Parses ``argv`` (``modelreg WORD ...``) as the installed command would; for ``serve`` and
    ``replicate`` also builds and validates the process's config from the flags and ``env``.

    ``files`` maps a path as the command names it (inside a container, say) to the local file
    the config check reads instead.

    Raises:
        AssertionError: The parser or the config refuses it; the message is theirs.

    """
    assert Path(argv[0]).name == "modelreg", f"not a modelreg command: {argv}"
    word, rest = argv[1], list(argv[2:])
    parser: argparse.ArgumentParser
    if word == "replicate":
        parser = replicate_parser()
    elif word == "up" and any(a.startswith("--regions") for a in rest):
        parser = regions_up.build_parser()
    elif word in ("serve", "up"):
        parser = server_main.build_parser(word)
    else:
        parser, rest = cli.build_parser(), list(argv[1:])
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            args = parser.parse_args(rest)
        flags = {k: (files or {}).get(str(v), v) for k, v in vars(args).items() if k != "config"}
        if word == "serve":
            ServerConfig.from_sources(flags, env or {})
        elif word == "replicate":
            AgentConfig.from_sources(flags, env or {})
    except (SystemExit, ValueError, Exception) as err:
        raise AssertionError(f"{' '.join(argv)}: {said.getvalue().strip() or err}") from None
    return args
