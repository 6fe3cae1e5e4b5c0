"""The example inference server (``deploy/example``) end to end, as the README demo runs it:
``modelreg up``, ``publish.py``, the ``modelreg`` CLI and ``serve.py``, each its own process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from modelreg.client import RegistryClient
from modelreg.server.embedded_etcd import free_port
from tests.up_process import Up

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "example"
POLL_TIMEOUT = 30.0
X = "1.0,2.0"

T = TypeVar("T")


def _load_tinymodel() -> ModuleType:
    name = "deploy_example_tinymodel"  # not "tinymodel": nothing else may pick it up by name
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / "tinymodel.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tinymodel = _load_tinymodel()


class Serve:
    """A running ``deploy/example/serve.py`` child process."""

    def __init__(self, target: str, model: str, log: Path) -> None:
        self.target = target
        self.model = model
        self.port = free_port()
        self.node_id = f"example-{uuid.uuid4().hex[:8]}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until ``/healthz`` answers."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(EXAMPLE / "serve.py"), "--target", self.target,
                 "--model", self.model, "--port", str(self.port), "--node-id", self.node_id,
                 "--region", "local"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self.poll(lambda: self.get("/healthz")[0] == 200)

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

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET ``path``; returns the status and the JSON body (status 0 if unreachable)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read())
        except OSError:
            return 0, {}

    def predict(self, x: str = X) -> tuple[int, dict[str, Any]]:
        """GET ``/predict?x=...``."""
        return self.get(f"/predict?x={x}")

    def poll(self, check: Callable[[], T], timeout: float = POLL_TIMEOUT) -> T:
        """Call ``check`` until it returns something truthy, while the process lives."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            result = check()
            if result:
                return result
            assert time.monotonic() < deadline, f"timed out; serve.py log:\n{self.log.read_text()}"
            time.sleep(0.05)

    def wait_for_version(self, version: int) -> dict[str, Any]:
        """Poll ``/predict`` until version ``version`` answers; returns its body."""
        def answered() -> dict[str, Any] | None:
            status, body = self.predict()
            return body if status == 200 and body["version"] == version else None
        return self.poll(answered)


@contextlib.contextmanager
def serving(up: Up, model: str, tmp_path: Path) -> Iterator[Serve]:
    """Run serve.py for ``model`` for the block; it is stopped however the block ends."""
    server = Serve(up.target, model, tmp_path / f"serve-{model}.log")
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None:
            server.stop()


def publish(up: Up, model: str, out: Path, weights: str, bias: float) -> int:
    """Run publish.py; returns the version number it printed."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "publish.py"), "--target", up.target, "--actor", "ci",
         "--model", model, "--weights", weights, "--bias", str(bias), "--out", str(out)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def promote(up: Up, model: str, version: int) -> None:
    """Promote ``version`` through staging to production with the CLI."""
    up.cli("promote", model, "staging", str(version))
    up.cli("promote", model, "production", str(version), "--reason", f"v{version}")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One ``modelreg up`` for this module's tests."""
    server = Up(tmp_path_factory.mktemp("example-up") / "data")
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None:
            server.stop()


class TestTinyModel:
    def test_round_trip_predicts(self, tmp_path):
        """A written model loads back with the same weights and predicts w.x + b."""
        path = tinymodel.write(tmp_path / "m.tmdl", [0.5, 1.25], 0.25)
        model = tinymodel.load(path)
        assert model.weights == (0.5, 1.25) and model.bias == 0.25
        assert model.predict([1.0, 2.0]) == 3.25
        logistic = tinymodel.load(tinymodel.write(tmp_path / "l.tmdl", [1.0], 0.0, "logistic"))
        assert logistic.predict([0.0]) == 0.5

    @pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "extra"])
    def test_corrupt_file_raises(self, tmp_path, damage):
        """Truncation, a flipped bit, a wrong magic or trailing bytes make load raise."""
        data = bytearray(tinymodel.encode([0.5, 1.25], 0.25))
        if damage == "truncate":
            data = data[:-5]
        elif damage == "flip":
            data[20] ^= 0x01
        elif damage == "magic":
            data[0:4] = b"NOPE"
        else:
            data += b"\x00"
        (tmp_path / "bad.tmdl").write_bytes(bytes(data))
        with pytest.raises(tinymodel.FormatError):
            tinymodel.load(tmp_path / "bad.tmdl")

    def test_train_fits_a_line(self):
        """Gradient descent recovers y = 2*x1 - x2 + 1 from exact samples."""
        xs = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
        weights, bias = tinymodel.train(xs, [2 * a - b + 1 for a, b in xs], epochs=5000)
        assert weights == pytest.approx([2.0, -1.0], abs=1e-3)
        assert bias == pytest.approx(1.0, abs=1e-3)

    def test_predict_rejects_wrong_feature_count(self):
        """A feature vector of the wrong length is a ValueError, not a guess."""
        model = tinymodel.decode(tinymodel.encode([1.0, 2.0], 0.0))
        with pytest.raises(ValueError, match="expected 2 features"):
            model.predict([1.0])


class TestExampleServer:
    def test_promotion_rollback_and_bad_artifacts(self, up, tmp_path):
        """serve.py follows promotion and a warm rollback, and keeps serving through a tampered
        artifact and an unloadable one, which the fleet view reports as failed.
        """
        model = "fraud-demo"
        out = tmp_path / "artifacts"
        assert publish(up, model, out, "0.5,1.25", 0.25) == 1  # 0.5 + 2.5 + 0.25 = 3.25
        assert publish(up, model, out, "0.25,2.0", 0.5) == 2  # 0.25 + 4.0 + 0.5 = 4.75
        promote(up, model, 1)
        with serving(up, model, tmp_path) as server, RegistryClient(up.target) as registry:
            assert server.wait_for_version(1)["prediction"] == pytest.approx(3.25)
            first_load = server.get("/model")[1]["serving"]["loaded_at"]

            promote(up, model, 2)
            assert server.wait_for_version(2)["prediction"] == pytest.approx(4.75)

            up.cli("rollback", model, "production", "--reason", "p99")
            assert server.wait_for_version(1)["prediction"] == pytest.approx(3.25)
            info = server.get("/model")[1]
            assert info["serving"]["loaded_at"] == first_load  # the warm model, not a reload
            assert info["warm_previous"]["version"] == 2

            # v3: registered, then its file replaced by another valid model of the same size.
            assert publish(up, model, out, "9.0,9.0", 9.0) == 3
            uri = registry.get_version(model, 3).model_version.artifact_uri
            Path(uri.removeprefix("file://")).write_bytes(tinymodel.encode([7.0, 7.0], 7.0))
            promote(up, model, 3)
            self._wait_failed(server, registry, model, 3, "sha256")

            # v4: its digest matches, but the bytes are not a tinymodel file.
            garbage = out / "garbage.tmdl"
            garbage.write_bytes(b"TINYMDL\x00" + b"\xff" * 36)
            registry.create_version(model, artifact_uri=garbage.as_uri(),
                                    sha256=hashlib.sha256(garbage.read_bytes()).hexdigest(),
                                    size_bytes=garbage.stat().st_size)
            promote(up, model, 4)
            self._wait_failed(server, registry, model, 4, "FormatError")

    @staticmethod
    def _wait_failed(server: Serve, registry: RegistryClient, model: str, version: int,
                     error: str) -> None:
        def reported() -> bool:
            info = server.get("/model")[1]
            return info["committed_version"] == version and info["failed_version"] == version
        server.poll(reported)
        assert error in server.get("/model")[1]["last_error"]
        status, body = server.predict()
        assert status == 200 and body["version"] == 1 and body["prediction"] == 3.25

        def in_fleet_view() -> bool:
            rollout = registry.rollout_status(model, "production")
            lagging = [n for n in rollout.lagging if n.node_id == server.node_id]
            return (rollout.stage.version == version and len(lagging) == 1
                    and lagging[0].stages[0].serving_version == 1
                    and lagging[0].stages[0].failed_version == version)
        server.poll(in_fleet_view)

    def test_503_until_loaded_and_sigterm_exits_cleanly(self, up, tmp_path):
        """Before any version is in production /predict is 503 and /healthz not ready; after
        the first promotion it answers, bad input is a 400, and SIGTERM exits 0.
        """
        model = "empty-demo"
        up.cli("models", "create", model)
        server = Serve(up.target, model, tmp_path / "serve.log")
        code = None
        try:
            server.start()
            assert server.predict()[0] == 503
            assert server.get("/healthz") == (200, {"status": "ok", "ready": False})
            assert server.get("/model")[1]["serving"] is None
            promote(up, model, publish(up, model, tmp_path, "1.0,1.0", 0.0))
            assert server.wait_for_version(1)["prediction"] == 3.0
            assert server.get("/healthz")[1]["ready"] is True
            assert server.predict("1.0")[0] == 400
            assert server.predict("a,b")[0] == 400
            assert server.get("/nope")[0] == 404
        finally:
            if server.proc is not None:
                code = server.stop()
        assert code == 0 and "stopped" in server.log.read_text()


SYS_PIDFD_GETFD = 438
"""The pidfd_getfd(2) syscall number (the same on every Linux architecture since 5.6)."""
TCPI_DATA_SEGS_OUT = 156
"""Offset of ``tcpi_data_segs_out`` (u32) in Linux's ``struct tcp_info`` (since 4.6)."""
PATHS = ["/predict?x=1.0,2.0", "/healthz", "/model", "/predict?x=a", "/nope"]
"""One request of each kind serve.py answers: 200s, a 400 and a 404."""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # a file descriptor closed meanwhile
        return ""


def _accepted_socket(pid: int, port: int, client_port: int) -> socket.socket:
    """A duplicate of the socket process ``pid`` accepted on ``port`` from ``client_port``.

    Found by its inode in ``/proc/<pid>/net/tcp`` and fetched with pidfd_getfd(2): the same
    open socket, so its options and counters are the server's own. Skips where the kernel
    refuses (the test process is the server's parent, which ptrace rules normally allow).
    """
    inode = ""
    with open(f"/proc/{pid}/net/tcp") as table:
        for line in table:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[2].endswith(f":{client_port:04X}"):
                inode = fields[9]
    assert inode, f"no connection from port {client_port} to port {port} in process {pid}"
    fds = [int(name) for name in os.listdir(f"/proc/{pid}/fd")
           if _readlink(f"/proc/{pid}/fd/{name}") == f"socket:[{inode}]"]
    assert len(fds) == 1, fds
    pidfd = os.pidfd_open(pid)
    try:
        fd = ctypes.CDLL(None, use_errno=True).syscall(SYS_PIDFD_GETFD, pidfd, fds[0], 0)
        if fd < 0:
            code = ctypes.get_errno()
            if code in (errno.EPERM, errno.ENOSYS):
                pytest.skip(f"pidfd_getfd is not allowed here: {os.strerror(code)}")
            raise OSError(code, os.strerror(code))
    finally:
        os.close(pidfd)
    return socket.socket(fileno=fd)


def _data_segments_sent(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[TCPI_DATA_SEGS_OUT:TCPI_DATA_SEGS_OUT + 4], sys.byteorder)


@pytest.fixture(scope="module")
def loaded_server(up: Up, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """serve.py with version 1 of its own model loaded."""
    model = "keepalive-demo"
    tmp_path = tmp_path_factory.mktemp("keepalive")
    promote(up, model, publish(up, model, tmp_path, "0.5,1.25", 0.25))
    with serving(up, model, tmp_path) as server:
        server.wait_for_version(1)
        yield server


@contextlib.contextmanager
def kept_alive(server: Serve) -> Iterator[tuple[http.client.HTTPConnection, socket.socket]]:
    """One HTTP connection to ``server``, after a first request, and the server's end of it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        assert conn.sock is not None and server.proc is not None
        client_port = conn.sock.getsockname()[1]
        with _accepted_socket(server.proc.pid, server.port, client_port) as accepted:
            yield conn, accepted
    finally:
        conn.close()


class TestKeepAlive:
    """serve.py on one kept-alive connection, as a client's connection pool uses it.

    The stdlib's handler wrote headers and body in two sends; with Nagle's algorithm the body
    then waited for the ACK of the headers, which a client on a kept-alive connection delays
    (about 40 ms per request). These tests check the causes, never a time.
    """

    def test_each_response_arrives_whole(self, loaded_server):
        """On one kept-alive connection, the first bytes of each response to arrive are the
        whole response: the body never waits behind its headers.
        """
        conn = http.client.HTTPConnection("127.0.0.1", loaded_server.port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            kept = conn.sock
            for path in PATHS * 2:
                conn.request("GET", path)
                assert conn.sock is not None
                first = conn.sock.recv(65536, socket.MSG_PEEK)  # waits for the first bytes
                reply = conn.getresponse()
                body = reply.read()
                assert reply.status in (200, 400, 404) and body
                assert first.endswith(b"\r\n\r\n" + body), (path, first)
                assert not reply.will_close and conn.sock is kept  # the same connection
        finally:
            conn.close()

    def test_each_response_is_one_segment(self, loaded_server):
        """The server's end of a kept-alive connection sends exactly one data segment per
        response (headers and body written together), counted by the kernel (TCP_INFO).
        """
        with kept_alive(loaded_server) as (conn, accepted):
            for path in PATHS * 2:
                before = _data_segments_sent(accepted)
                conn.request("GET", path)
                reply = conn.getresponse()
                reply.read()
                assert _data_segments_sent(accepted) - before == 1, path

    def test_accepted_sockets_have_tcp_nodelay(self, loaded_server):
        """The socket serve.py accepted for a client has TCP_NODELAY set, so a response that
        needs several sends never waits for an ACK either.
        """
        with kept_alive(loaded_server) as (_, accepted):
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
