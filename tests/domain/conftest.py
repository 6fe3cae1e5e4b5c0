"""Fixtures of the domain unit tests."""

from __future__ import annotations

import pytest

from tests.domain.env import Env


@pytest.fixture
def env() -> Env:
    """A registry over an empty in-memory store with a fake clock."""
    return Env()
