"""An embedded etcd never outlives its modelreg, and a start on a busy data dir says who holds it.

Real processes throughout: a parent that starts etcd and is SIGKILLed (``tests/etcd_parent.py``),
a bare etcd started by hand, a socket holding a port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelreg.server.embedded_etcd import EmbeddedEtcd, EtcdStartError, find_etcd_binary
from modelreg.server.etcd_health import wait_healthy
from modelreg.server.etcd_ports import free_port
from tests.up_process import ETCD_PARENT, alive, end_pid, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


class Parent:
    """``tests/etcd_parent.py`` in a child process, with the pid of the etcd it started."""

    def __init__(self, data_dir: Path, die_with_parent: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ETCD_PARENT), str(data_dir), "1" if die_with_parent else "0"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("etcd "), f"the parent did not start etcd: {line!r}"
        self.etcd_pid = int(line.split()[1])

    def kill(self) -> None:
        """SIGKILL the parent, as a crash would."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """End the parent and its etcd, whatever the test did."""
        self.kill()
        end_pid(self.etcd_pid)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def parents() -> Iterator[list[Parent]]:
    """Parents started by the test, ended at teardown with their etcd children."""
    started: list[Parent] = []
    try:
        yield started
    finally:
        for parent in started:
            parent.close()


class TestParentDeath:
    async def test_etcd_dies_when_its_parent_is_sigkilled(
        self, tmp_path: Path, parents: list[Parent]
    ) -> None:
        """SIGKILLing the process that started an embedded etcd ends that etcd too."""
        parents.append(parent := Parent(tmp_path / "data", die_with_parent=True))
        assert alive(parent.etcd_pid)
        parent.kill()
        await wait_for(lambda: not alive(parent.etcd_pid), what="etcd gone after its parent")


class TestStaleEtcd:
    def test_leftover_etcd_of_a_dead_parent_is_stopped_and_replaced(
        self, tmp_path: Path, parents: list[Parent]
    ) -> None:
        """A start finds the etcd a dead parent left on the data dir, stops it and takes over."""
        parents.append(parent := Parent(tmp_path / "data", die_with_parent=False))
        parent.kill()
        assert alive(parent.etcd_pid), "without the parent-death signal the etcd is orphaned"

        with EmbeddedEtcd(tmp_path / "data") as etcd:
            assert etcd.stale_stopped == parent.etcd_pid
            assert not alive(parent.etcd_pid)
            assert etcd.running

    def test_etcd_of_a_live_modelreg_is_left_alone(
        self, tmp_path: Path, parents: list[Parent]
    ) -> None:
        """A second start on a data dir whose owner still runs fails, naming it; nothing dies."""
        parents.append(parent := Parent(tmp_path / "data", die_with_parent=True))
        owner = f"running modelreg, pid {parent.proc.pid} "
        with pytest.raises(EtcdStartError, match=owner) as err:
            EmbeddedEtcd(tmp_path / "data").start(timeout=5)
        assert f"kill {parent.proc.pid}" in str(err.value)
        assert alive(parent.etcd_pid)

    def test_foreign_etcd_holding_the_data_dir_is_named(self, tmp_path: Path) -> None:
        """An etcd someone started by hand on the data dir is not killed; the error names it."""
        data = tmp_path / "data"
        client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        data.mkdir()
        with open(tmp_path / "foreign.log", "wb") as log:
            foreign = subprocess.Popen(
                [str(find_etcd_binary()), "--data-dir", str(data / "etcd"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"default={peer}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            wait_healthy(foreign, client, 30, tmp_path / "foreign.log", 0)
            with pytest.raises(EtcdStartError, match=f"locked by pid {foreign.pid} ") as err:
                EmbeddedEtcd(data).start(timeout=5)
            assert f"kill {foreign.pid}" in str(err.value)
            assert foreign.poll() is None
        finally:
            foreign.kill()
            foreign.wait()

    def test_port_held_by_another_process_is_named(self, tmp_path: Path) -> None:
        """A fixed client port that another process listens on fails at once, naming that pid."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            with pytest.raises(EtcdStartError, match=f"port {port} .* pid {os.getpid()} ") as err:
                EmbeddedEtcd(tmp_path / "data", client_port=port).start(timeout=5)
        assert f"kill {os.getpid()}" in str(err.value)
