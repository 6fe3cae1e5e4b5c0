"""A modelreg child process (a server, a replicator) that lives no longer than its launcher.

``modelreg up --regions`` runs each region's server and replicator as a child process, with the
guarantees :mod:`modelreg.server.etcd_lifetime` gives an embedded etcd:

* **Parent-death signal** (Linux): the child is started through the same trampoline as etcd
  (:func:`~modelreg.server.etcd_lifetime.die_with_parent`), so the kernel SIGKILLs it when the
  launcher dies, however it dies. The launcher forks from its main thread (its event loop's),
  since the signal follows the thread that forked.
* **Pid file**: each child's pid and command line are recorded beside its log. The launcher
  holds the data dir's lock while it runs, so a pid file found by the next launcher on the same
  data dir is a dead launcher's: :func:`stop_leftover` stops the process it names if that
  process still runs the recorded command line (a reused pid never matches).

Each child leads its own session, so a Ctrl-C in the terminal reaches the launcher only, and
the launcher decides the order of shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from modelreg.server.etcd_lifetime import die_with_parent

__all__ = ["ChildProcess", "stop_leftover"]

LOG_TAIL_LINES = 15
"""Lines of a child's log quoted when it fails to start."""


def _cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] or None


def stop_leftover(pid_file: Path, grace: float = 5.0) -> int | None:
    """Stops the process ``pid_file`` names if it still runs its recorded command; its pid.

    Call only while holding the lock that the recording launcher held: then that launcher is
    gone and the process is its leftover.
    """
    try:
        recorded = json.loads(pid_file.read_text())
        pid, argv = int(recorded["pid"]), [str(a) for a in recorded["argv"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    running = _cmdline(pid)
    stopped = None
    # Arguments only: argv[0] may differ once the trampoline has exec'd the command.
    if running is not None and running[1:] == argv[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while _cmdline(pid) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            if _cmdline(pid) is not None:
                os.killpg(pid, signal.SIGKILL)
        stopped = pid
    with contextlib.suppress(OSError):
        pid_file.unlink()
    return stopped


class ChildProcess:
    """One command run as a child that dies with this process; output appended to a log.

    Args:
        name: For messages, such as ``"eu replicator"``.
        argv: The command.
        log_path: File its stdout and stderr are appended to (across restarts).
        pid_file: Where its pid and command are recorded while it runs.

    """

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, pid_file: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.pid_file = pid_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self.restarts = 0
        """How often :meth:`start` ran after the first time."""

    @property
    def pid(self) -> int | None:
        """The pid of the running child, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def poll(self) -> int | None:
        """The exit status if the child exited (negative: killed by that signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> None:
        """Start (or start again) the command; call from the main thread."""
        if self.pid is not None:
            raise RuntimeError(f"{self.name} already runs (pid {self.pid})")
        if self._proc is not None:
            self.restarts += 1
        command = self.argv
        if threading.current_thread() is threading.main_thread():
            command = die_with_parent(self.argv)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          close_fds=True)
        record = {"pid": self._proc.pid, "argv": self.argv, "parent": os.getpid()}
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.pid_file)

    async def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; its exit status (None: never ran)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL at once and reap (cleanup after a failed start)."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
        with contextlib.suppress(OSError):
            self.pid_file.unlink()

    def log_tail(self) -> str:
        """The last lines the child wrote since it was last started."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)  # its own session: the group is the child's
