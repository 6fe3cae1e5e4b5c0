"""One way to point every tool at a server: ``MODELREG_TARGET``, read by the one client config.

Each tool is built with no target while ``MODELREG_TARGET`` names a real server on a free port
(the default, 127.0.0.1:50051, is not it), and must reach that server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from modelreg.client import (
    DEFAULT_TARGET,
    AsyncModelWatcher,
    AsyncRegistryClient,
    ClientConfig,
    RegistryClient,
    ThreadedModelWatcher,
)
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2 as res
from tests.helpers import MODEL, RunningServer, load_toy, register, stage
from tests.up_process import MODELREG


@pytest.fixture
async def canary_v1(
    server: RunningServer, stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> RunningServer:
    """The server, with the model's canary stage at v1 and MODELREG_TARGET naming it."""
    await stub.CreateModel(
        svc.CreateModelRequest(model_id=MODEL, model=res.RegisteredModel(custom_stages=["canary"]))
    )
    await register(stub, tmp_path, 1)
    await stub.PromoteVersion(svc.PromoteVersionRequest(name=stage("canary"), version=1))
    monkeypatch.setenv("MODELREG_TARGET", server.target)
    assert server.target != DEFAULT_TARGET
    return server


class TestTargetFromEnvironment:
    async def test_async_client(self, canary_v1: RunningServer) -> None:
        """An AsyncRegistryClient built without a target reads from the server it names."""
        async with AsyncRegistryClient() as client:
            assert client.config.target == canary_v1.target
            assert (await client.get_stage(MODEL, "canary")).stage.version == 1

    async def test_blocking_client(self, canary_v1: RunningServer) -> None:
        """A RegistryClient built without a target reads from the server it names."""

        def read() -> int:
            with RegistryClient() as client:
                return client.get_stage(MODEL, "canary").stage.version

        assert await asyncio.to_thread(read) == 1

    async def test_async_watcher(self, canary_v1: RunningServer, tmp_path: Path) -> None:
        """An AsyncModelWatcher built without a target loads the version the stage names."""
        async with AsyncModelWatcher(
            MODEL, "canary", load_toy, report=False, cache_dir=tmp_path / "cache"
        ) as watcher:
            assert (await watcher.wait_for_version(1, timeout=30)).model.version == 1

    async def test_threaded_watcher(self, canary_v1: RunningServer, tmp_path: Path) -> None:
        """A ThreadedModelWatcher built without a target loads the version the stage names."""
        with ThreadedModelWatcher(
            MODEL, "canary", load_toy, report=False, cache_dir=tmp_path / "cache"
        ) as watcher:
            loaded = await asyncio.to_thread(watcher.wait_for_version, 1, 30)
        assert loaded.model.version == 1

    async def test_cli(self, canary_v1: RunningServer) -> None:
        """The modelreg command without --target shows the stages of the server it names."""
        proc = await asyncio.create_subprocess_exec(
            MODELREG, "--json", "stages", "get", MODEL, "canary",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)  # fmt: skip
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert '"version": "1"' in out.decode() or '"version": 1' in out.decode()


class TestTargetResolution:
    def test_default_without_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without MODELREG_TARGET (unset or empty), the tools connect to 127.0.0.1:50051."""
        monkeypatch.delenv("MODELREG_TARGET", raising=False)
        assert ClientConfig.create().target == DEFAULT_TARGET == "127.0.0.1:50051"
        monkeypatch.setenv("MODELREG_TARGET", "")
        assert RegistryClient().config.target == DEFAULT_TARGET

    def test_explicit_target_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A target given to a tool beats MODELREG_TARGET."""
        monkeypatch.setenv("MODELREG_TARGET", "elsewhere:1")
        assert AsyncRegistryClient("here:2").config.target == "here:2"
        assert RegistryClient().config.target == "elsewhere:1"

    def test_read_at_construction(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The variable is read when a tool is built, not when the package is imported."""
        monkeypatch.setenv("MODELREG_TARGET", "first:1")
        first = RegistryClient()
        monkeypatch.setenv("MODELREG_TARGET", "second:2")
        assert (first.config.target, RegistryClient().config.target) == ("first:1", "second:2")

    def test_unknown_setting_refused(self) -> None:
        """A misspelt connection setting raises TypeError naming it, as a bad keyword would."""
        with pytest.raises(TypeError, match="actr"):
            RegistryClient(actr="me")  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="regoin"):
            ThreadedModelWatcher(MODEL, "canary", load_toy, regoin="eu")  # type: ignore[call-arg]
