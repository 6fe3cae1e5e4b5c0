"""Fixtures of the replication tests: a primary etcd and a regional etcd of their own (a test
may compact, stop or kill them), on each etcd build, stopped at teardown whatever happened.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest

from modelreg.server.embedded_etcd import EmbeddedEtcd
from tests.conftest import ETCD_BUILDS, etcd_binary
from tests.replication.region_env import client, start_pair


def _pair(tmp_path: Path, build: str) -> Iterator[tuple[EmbeddedEtcd, EmbeddedEtcd]]:
    primary, region = start_pair(tmp_path, etcd_binary(build))
    try:
        yield primary, region
    finally:
        region.stop()
        primary.stop()


@pytest.fixture(params=sorted(ETCD_BUILDS), ids=lambda b: f"etcd{b}")
def pair(request: pytest.FixtureRequest,
         tmp_path: Path) -> Iterator[tuple[EmbeddedEtcd, EmbeddedEtcd]]:
    """A primary and a regional etcd of one build (each test runs on every build)."""
    yield from _pair(tmp_path, request.param)


@pytest.fixture
def pair35(tmp_path: Path) -> Iterator[tuple[EmbeddedEtcd, EmbeddedEtcd]]:
    """A primary and a regional etcd of the shipped build (3.5) only, for the costly tests."""
    yield from _pair(tmp_path, "3.5")


@pytest.fixture
def prefix() -> str:
    """A fresh deployment prefix."""
    return f"/mr-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def clients(
    pair: tuple[EmbeddedEtcd, EmbeddedEtcd],
) -> AsyncIterator[tuple[aetcd.Client, aetcd.Client]]:
    """Aetcd clients of the pair: (primary, region)."""
    async with client(pair[0]) as p, client(pair[1]) as r:
        yield p, r
