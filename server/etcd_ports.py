"""Loopback ports for an embedded etcd: picking free ones, and finding who holds a taken one."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

__all__ = ["free_port", "free_ports", "pids_with", "port_in_use", "who_listens"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    Another process may take it before the caller binds it; :class:`EmbeddedEtcd` retries with
    fresh ports when that happens.
    """
    return free_ports(host, 1)[0]


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays open until all are chosen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something else has it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As etcd binds: SO_REUSEADDR, so a port in TIME_WAIT from a killed etcd is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def who_listens(port: int) -> list[int]:
    """Pids (that we may inspect) with a TCP socket listening on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)
            for line in lines:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # LISTEN
                    inodes.add(cols[9])
    return [pid for inode in sorted(inodes) for pid in pids_with(f"socket:[{inode}]")]


def pids_with(link: str) -> list[int]:
    """Processes (that we may inspect) with an open descriptor whose target is ``link``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == link:
                        found.append(int(proc.name))
                        break
    return found
