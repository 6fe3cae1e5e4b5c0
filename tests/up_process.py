"""``modelreg up`` (and a bare embedded-etcd parent) as real child processes for crash tests.

Every process started here is ended by :meth:`UpProcess.close` / :func:`end_pid`, including
the etcd child a crash leaves behind, so a failing test never leaks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelreg.server.embedded_etcd import free_port

BIN = Path(sys.executable).parent
MODELREG = shutil.which("modelreg", path=str(BIN)) or "modelreg"
ETCD_PARENT = Path(__file__).with_name("etcd_parent.py")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def end_pid(pid: int | None) -> None:
    """SIGKILL ``pid`` if it still runs (test cleanup)."""
    if pid is not None and alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def wait_for(condition: object, timeout: float = 30.0, what: str = "condition") -> None:
    """Polls a callable until it returns true; fails the test after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g}s"
        await asyncio.sleep(0.05)


async def health(target: str) -> int | None:
    """The gRPC health status of the server at ``target``, or None if it does not answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


async def wait_serving(target: str, proc: subprocess.Popen[bytes], logs: Callable[[], str],
                       timeout: float = 30.0) -> None:
    """Waits until ``proc``'s health says SERVING; fails with its log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while await health(target) != health_pb2.HealthCheckResponse.SERVING:
        assert proc.poll() is None, f"{proc.args} exited:\n{logs()}"
        assert time.monotonic() < deadline, f"not SERVING in {timeout:g}s:\n{logs()}"
        await asyncio.sleep(0.05)


def etcd_pid(data_dir: Path) -> int | None:
    """The etcd pid recorded in the data dir's pid file, if any."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((data_dir / "etcd.pid").read_text())["pid"])
    return None


class UpProcess:
    """A ``modelreg up`` child process on free ports, logging to a file beside the data dir."""

    def __init__(self, data_dir: Path, *, etcd_port: int = 0, metrics: bool = False) -> None:
        self.data_dir = data_dir
        self.target = f"127.0.0.1:{free_port()}"
        self.etcd_port = etcd_port or free_port()
        self.metrics = f"127.0.0.1:{free_port()}" if metrics else ""
        self.log = data_dir.parent / f"{data_dir.name}-up-{time.monotonic_ns()}.log"
        self.out = self.log.with_suffix(".out")
        self.etcd_pids: set[int] = set()
        with open(self.log, "ab") as log, open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [MODELREG, "up", "--data-dir", str(data_dir), "--listen", self.target,
                 "--etcd-listen", f"127.0.0.1:{self.etcd_port}", "--metrics-listen", self.metrics,
                 "--grace", "1", "--log-format", "json"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=log, start_new_session=True)

    def etcd_pid(self) -> int | None:
        """The pid of its etcd child now (remembered for cleanup)."""
        pid = etcd_pid(self.data_dir)
        if pid is not None:
            self.etcd_pids.add(pid)
        return pid

    def logs(self) -> str:
        """Everything it wrote to stderr so far."""
        return self.log.read_text(errors="replace")

    async def health(self) -> int | None:
        """The gRPC health status, or None if the server does not answer."""
        return await health(self.target)

    async def wait_serving(self, timeout: float = 30.0) -> None:
        """Waits until health says SERVING; fails with its log if it exits or never does."""
        await wait_serving(self.target, self.proc, self.logs, timeout)
        self.etcd_pid()

    def kill(self) -> None:
        """SIGKILLs the modelreg process only, as a crash would; its etcd is not touched."""
        self.etcd_pid()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        """Ends modelreg (SIGTERM, then SIGKILL) and any etcd child of it still running."""
        self.etcd_pid()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.etcd_pids:
            end_pid(pid)


class Up:
    """A running ``modelreg up`` child process."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.target = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.log = data_dir.parent / f"{data_dir.name}-up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until the gRPC health service says SERVING."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [MODELREG, "up", "--data-dir", str(self.data_dir), "--listen", self.target,
                 "--metrics-listen", self.metrics, "--grace", "1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it and wait for it to exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise
        return self.proc.returncode

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``modelreg --target ... ARGS`` as user ``ops``."""
        done = subprocess.run(
            [MODELREG, "--target", self.target, "--actor", "ops", *args],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def cli_json(self, *args: str) -> object:
        """Run the CLI with ``--json`` and parse its output."""
        return json.loads(self.cli("--json", *args).stdout)
