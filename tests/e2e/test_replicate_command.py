"""``modelreg replicate``: the installed command runs a region's replicator between two etcds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelreg.replication import layout
from modelreg.server.embedded_etcd import EmbeddedEtcd
from tests.replication.region_env import client, region_keyspace, start_pair
from tests.replication.replica_process import Replica
from tests.up_process import MODELREG

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="etcd wheel")

PREFIX = "/cmd/"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedEtcd, EmbeddedEtcd]]:
    """A primary and a regional etcd, stopped at teardown."""
    primary, region = start_pair(tmp_path, None)
    try:
        yield primary, region
    finally:
        region.stop()
        primary.stop()


class TestReplicateCommand:
    def test_help_names_the_replicator_flags(self) -> None:
        """`modelreg replicate --help` is the replicator's own help, and exits 0."""
        done = subprocess.run([MODELREG, "replicate", "--help"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        for flag in ("--primary", "--region-etcd", "--region", "--prefix"):
            assert flag in done.stdout

    def test_missing_settings_exit_2_with_one_line(self) -> None:
        """Without the primary's endpoints the command says which setting is missing, exit 2."""
        done = subprocess.run([MODELREG, "replicate", "--region", "eu"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 2
        assert "primary" in done.stderr

    async def test_copies_a_primary_key_into_the_region(
        self, pair: tuple[EmbeddedEtcd, EmbeddedEtcd]
    ) -> None:
        """A key written on the primary shows up in the regional etcd's current generation,
        with its value and the primary's revision; SIGTERM stops the command with exit 0.
        """
        primary, region = pair
        replica = await Replica.start([
            MODELREG, "replicate", "--primary", primary.endpoint,
            "--region-etcd", region.endpoint, "--region", "eu", "--prefix", PREFIX,
            "--replica-id", "r1", "--lease-ttl", "2", "--probe-interval", "0.2",
            "--status-interval", "0.5", "--log-format", "json"])
        try:
            async with client(primary) as p, client(region) as r:
                put = await p.put(f"{PREFIX}models/fraud".encode(), b"v1")
                revision = put.header.revision
                view: dict[bytes, layout.Envelope] = {}

                async def replicated() -> bool:
                    state, keys = await region_keyspace(r, PREFIX.encode())
                    view.update(keys)
                    return state is not None and state.applied >= revision

                deadline = time.monotonic() + 60  # a bound against a hang, not a measurement
                while not await replicated():
                    assert replica.proc.returncode is None, "\n".join(replica.lines[-20:])
                    assert time.monotonic() < deadline, "\n".join(replica.lines[-20:])
                    await asyncio.sleep(0.05)
                assert view[b"models/fraud"].value == b"v1"
                assert view[b"models/fraud"].mod_revision == revision
            assert await replica.stop() == 0
        finally:
            await replica.end()
