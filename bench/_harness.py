"""What the benchmark scripts share: the etcd + ``modelreg serve`` processes and their cleanup.

Each script starts a private etcd (real disk, default fsync) and a ``modelreg serve`` child in
its own process group, waits for it to be SERVING, and stops both on every exit path, SIGTERM
included. The scripts run as ``python bench/NAME.py``, so ``bench/`` is on ``sys.path`` and they
import this module as ``_harness``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelreg.server.embedded_etcd import EmbeddedEtcd, free_port
from modelreg.v1 import model_service_pb2 as svc
from modelreg.v1 import resources_pb2

if TYPE_CHECKING:
    from types import FrameType

    from modelreg.v1.model_service_pb2_grpc import ModelServiceAsyncStub

PREFIX = "/bench/"
"""The etcd key prefix the server is started with."""
STAGE = "canary"
"""The custom stage the benchmarks promote on."""
SHA256 = "ab" * 32
"""A well-formed digest for the model versions the benchmarks create."""
RPC_TIMEOUT = 10.0
"""Seconds for any one benchmark RPC."""


# -- statistics ------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``samples``, nearest-rank; NaN if there are none."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- processes -------------------------------------------------------------------------------


def server_command(etcd_endpoint: str, listen: str, extra_args: Sequence[str] = ()) -> list[str]:
    """``modelreg serve`` for this etcd: the console script, or the module if it is missing.

    Args:
        etcd_endpoint: the etcd client URL.
        listen: the gRPC listen address.
        extra_args: further ``serve`` flags, appended after the common ones.

    """
    args = [
        "serve", "--etcd", etcd_endpoint, "--listen", listen, "--metrics-listen", "",
        "--log-level", "warning", "--prefix", PREFIX, *extra_args,
    ]  # fmt: skip
    script = Path(sys.executable).parent / "modelreg"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    code = "import sys; from modelreg.server.main import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def log_tail(path: Path, size: int = 3000) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc})"


async def wait_serving(
    channel: grpc.aio.Channel, proc: subprocess.Popen[bytes], log: Path, limit_s: float = 30.0
) -> None:
    """Polls the grpc health service until it says SERVING; fails if the server exits."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"modelreg serve exited with {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"modelreg serve not SERVING after {limit_s}s:\n{log_tail(log)}")
        await asyncio.sleep(0.05)


def stop_group(proc: subprocess.Popen[Any], sig: signal.Signals | None = signal.SIGTERM) -> None:
    """Signals a child's process group (if given), waits 10 s, then SIGKILLs the group.

    The child must have been started with ``start_new_session=True`` (its pid is its group's).
    With ``sig=None`` the child is only waited for (e.g. after closing its stdin).
    """
    if sig is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Server:
    """A running private etcd and the ``modelreg serve`` child on it."""

    etcd: EmbeddedEtcd
    proc: subprocess.Popen[bytes]
    listen: str
    """The server's gRPC address (``127.0.0.1:port``)."""
    log: Path
    """The server's stdout + stderr."""


@contextlib.contextmanager
def serving(directory: Path, extra_args: Sequence[str] = ()) -> Iterator[Server]:
    """Starts etcd (data in ``directory/data``) and a server (log in ``directory/server.log``).

    Both are stopped on every exit path: the server's process group first, then etcd. The
    server is not yet SERVING when this yields: see `wait_serving`.

    Args:
        directory: an existing directory for etcd's data and the server log.
        extra_args: further ``modelreg serve`` flags.

    """
    etcd = EmbeddedEtcd(directory / "data")
    proc: subprocess.Popen[bytes] | None = None
    log = directory / "server.log"
    try:
        etcd.start()
        listen = f"127.0.0.1:{free_port()}"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                server_command(etcd.endpoint, listen, extra_args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
            )
        yield Server(etcd, proc, listen, log)
    finally:
        if proc is not None:
            stop_group(proc)
        etcd.stop()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Makes SIGTERM raise KeyboardInterrupt, so it cleans up like Ctrl-C does."""
    signal.signal(signal.SIGTERM, _interrupt)


def make_tmpdir() -> Path:
    """A fresh temp dir for one benchmark run, under ``$BENCH_TMPDIR`` if that is set."""
    return Path(tempfile.mkdtemp(prefix="modelreg-bench-", dir=os.environ.get("BENCH_TMPDIR")))


def remove_tmpdir(tmp: Path, keep: bool) -> None:
    """Removes the run's temp dir, or with ``keep`` says on stderr where it is."""
    if keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the model -------------------------------------------------------------------------------


async def create_model(stub: ModelServiceAsyncStub, model_id: str) -> None:
    """A model declaring the canary stage, with versions 1 and 2."""
    await stub.CreateModel(
        svc.CreateModelRequest(
            model_id=model_id, model=resources_pb2.RegisteredModel(custom_stages=[STAGE])
        ),
        timeout=RPC_TIMEOUT,
    )
    for _ in range(2):
        await stub.CreateModelVersion(
            svc.CreateModelVersionRequest(
                parent=f"models/{model_id}",
                model_version=resources_pb2.ModelVersion(
                    artifact_uri="file:///m", sha256=SHA256, size_bytes=1
                ),
            ),
            timeout=RPC_TIMEOUT,
        )
