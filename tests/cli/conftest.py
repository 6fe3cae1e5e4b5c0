"""Fixtures of the CLI tests: one ``modelreg up`` child process per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.up_process import Up


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One ``modelreg up`` for the CLI tests of a module (each test uses its own model ids)."""
    server = Up(tmp_path_factory.mktemp("up") / "data")
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None:
            server.stop()
