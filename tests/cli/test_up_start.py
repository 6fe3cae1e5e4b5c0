"""``modelreg up`` that cannot start says why in one line, exits 4, and leaves nothing running.

Through the real ``modelreg`` binary: a taken gRPC or metrics address, a data dir another
``modelreg up`` is using (even while that one still waits for its etcd), and a SIGTERM while
etcd starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelreg.client import cli
from modelreg.server.embedded_etcd import find_etcd_binary
from tests.up_process import MODELREG, UpProcess, alive, end_pid, etcd_pid, wait_for

EXIT_LOCAL = 4
"""``modelreg``'s exit code for "cannot start on this machine" (see ``modelreg --help``)."""


@pytest.fixture
def taken() -> Iterator[str]:
    """A loopback address another process (this one) listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


@pytest.fixture
def ups() -> Iterator[list[UpProcess]]:
    """``modelreg up`` processes started by the test, ended (with their etcd) at teardown."""
    started: list[UpProcess] = []
    try:
        yield started
    finally:
        for up in started:
            up.close()


def _up(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``modelreg up`` on ``data_dir`` to its end (it is expected to fail at once)."""
    return subprocess.run(
        [MODELREG, "up", "--data-dir", str(data_dir), "--log-format", "json", *args],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def _one_line(stderr: str) -> str:
    """The stderr lines that are not JSON log lines: what a person reads."""
    lines = [line for line in stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, stderr
    return lines[0]


def _script(path: Path, body: str) -> Path:
    """An executable /bin/sh script standing in for etcd (``MODELREG_ETCD_BINARY``)."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


class TestBusyAddress:
    def test_busy_grpc_port_is_one_line_naming_address_and_flag(
        self, tmp_path: Path, taken: str
    ) -> None:
        """A taken --listen address ends `modelreg up` with exit 4 and one line naming the
        address, the flag and who holds it, before any etcd starts.
        """
        done = _up(tmp_path / "data", "--listen", taken, "--metrics-listen", "")
        assert done.returncode == EXIT_LOCAL, done.stderr
        line = _one_line(done.stderr)
        assert f"cannot listen on {taken} (--listen): address already in use" in line
        assert f"pid {os.getpid()}" in line
        assert "Traceback" not in done.stderr
        assert etcd_pid(tmp_path / "data") is None

    def test_busy_metrics_port_is_one_line_naming_address_and_flag(
        self, tmp_path: Path, taken: str
    ) -> None:
        """A taken --metrics-listen address ends `modelreg up` with exit 4 and one line naming
        the address and the flag.
        """
        done = _up(tmp_path / "data", "--listen", "127.0.0.1:0", "--metrics-listen", taken)
        assert done.returncode == EXIT_LOCAL, done.stderr
        line = _one_line(done.stderr)
        assert f"cannot listen on {taken} (--metrics-listen): address already in use" in line
        assert etcd_pid(tmp_path / "data") is None


class TestDataDirInUse:
    async def test_second_up_is_refused_at_once_while_the_first_still_starts(
        self, tmp_path: Path, ups: list[UpProcess], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A second `modelreg up` on a data dir whose first `up` is still waiting for its etcd
        exits 4 at once naming that process; the first then comes up on its data as usual.
        """
        gate = tmp_path / "gate"
        slow = _script(tmp_path / "slow-etcd",
                       f'while [ ! -e "{gate}" ]; do sleep 0.05; done\n'
                       f'exec "{find_etcd_binary()}" "$@"\n')
        data = tmp_path / "data"
        monkeypatch.setenv("MODELREG_ETCD_BINARY", str(slow))
        ups.append(first := UpProcess(data))
        monkeypatch.delenv("MODELREG_ETCD_BINARY")
        await wait_for(lambda: first.etcd_pid() is not None, what="the first up's etcd spawned")

        try:
            done = _up(data, "--listen", "127.0.0.1:0", "--metrics-listen", "")
        except subprocess.TimeoutExpired:
            pytest.fail("the second `modelreg up` did not refuse the data dir in use")
        finally:
            gate.touch()
        assert done.returncode == EXIT_LOCAL, done.stderr
        line = _one_line(done.stderr)
        assert f"{data} is in use by a running modelreg, pid {first.proc.pid} " in line
        assert f"`kill {first.proc.pid}`" in line
        await first.wait_serving()


class TestInterruptedStart:
    async def test_sigterm_while_etcd_starts_leaves_no_process_behind(
        self, tmp_path: Path, ups: list[UpProcess], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SIGTERM while `modelreg up` waits for its etcd ends it with exit 130, and nothing it
        started is left running: not the etcd, not a process that etcd started.
        """
        grandchild = tmp_path / "grandchild.pid"
        never_healthy = _script(tmp_path / "never-healthy-etcd",
                                f'sleep 1000 &\necho $! > "{grandchild}"\nwait\n')
        data = tmp_path / "data"
        monkeypatch.setenv("MODELREG_ETCD_BINARY", str(never_healthy))
        ups.append(up := UpProcess(data))
        await wait_for(grandchild.exists, what="the stand-in etcd started its child")
        await wait_for(lambda: grandchild.read_text().strip() != "", what="its child's pid")
        etcd, child = up.etcd_pid(), int(grandchild.read_text())
        try:
            up.proc.send_signal(signal.SIGTERM)
            code = up.proc.wait(timeout=30)
            await wait_for(lambda: etcd is None or not alive(etcd), what="stand-in etcd ended")
            assert not alive(child), "a process of the etcd child's group outlived modelreg up"
            assert etcd_pid(data) is None, "the pid file names an etcd that is gone"
            assert code == 130, up.logs()
            assert "Traceback" not in up.logs()
        finally:
            end_pid(child)


class TestServerCommandWords:
    @pytest.mark.parametrize(
        ("argv", "expected"),
        [
            (["up", "--grace", "1"], ("up", ["--grace", "1"])),
            (["--json", "--target", "h:1", "serve", "--etcd", "a:1"],
             ("serve", ["--etcd", "a:1"])),
            (["--actor", "up", "up", "--listen", "x:1"], ("up", ["--listen", "x:1"])),
            (["--actor=up", "serve"], ("serve", [])),
            (["watch", "up"], None),
            (["models", "create", "serve"], None),
            (["--help", "up"], None),
        ],
    )
    def test_serve_and_up_are_found_by_the_cli_parser(
        self, argv: list[str], expected: tuple[str, list[str]] | None,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`serve`/`up` is the command only where the CLI's own parser reads it as one (not a
        flag's value, not a model id), with no list of flags kept by hand; it prints nothing.
        """
        assert cli._server_command(argv) == expected
        assert capsys.readouterr() == ("", "")
