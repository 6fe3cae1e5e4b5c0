"""Whether an etcd child came up, and if not, why: its ``/health`` and the tail of its log.

A start that fails must say what etcd said; a bare timeout sends people to read logs by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

__all__ = ["EtcdStartError", "healthy", "log_tail", "wait_healthy"]

_LOG_TAIL_BYTES = 4000


class EtcdStartError(RuntimeError):
    """etcd cannot start: something holds its dir or port, or it exited or stayed unhealthy.

    The message names the process in the way, or ends with the tail of etcd's log.
    """


def _opener() -> urllib.request.OpenerDirector:
    # Never via a proxy: HTTP(S)_PROXY in CI would otherwise capture a loopback request.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def healthy(client_url: str, opener: urllib.request.OpenerDirector | None = None) -> bool:
    """Whether etcd at ``client_url`` answers ``/health`` with ``{"health": "true"}``."""
    try:
        with (opener or _opener()).open(client_url + "/health", timeout=1.0) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        # Connection refused while etcd binds, or 503 while it elects itself.
        return False
    return isinstance(body, dict) and body.get("health") == "true"


def log_tail(path: Path, start: int) -> str:
    """``log PATH ends with: ...``: what etcd wrote to ``path`` after offset ``start``."""
    try:
        with path.open("rb") as log:
            log.seek(max(start, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            tail = log.read().decode(errors="replace").strip()
    except OSError as exc:
        return f"its log {path} is unreadable: {exc}"
    return f"log {path} ends with:\n{tail or '(empty)'}"


def wait_healthy(
    proc: subprocess.Popen[bytes], client_url: str, timeout: float, log: Path, log_start: int
) -> None:
    """Polls ``/health`` until it is true.

    Raises:
        EtcdStartError: If the process exits first or ``timeout`` seconds pass; the message
            ends with the log tail.

    """
    opener = _opener()
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise EtcdStartError(
                f"etcd exited with status {code} during startup; {log_tail(log, log_start)}"
            )
        if healthy(client_url, opener):
            return
        if time.monotonic() >= deadline:
            raise EtcdStartError(
                f"etcd was not healthy at {client_url}/health within {timeout:g}s; "
                f"{log_tail(log, log_start)}"
            )
        time.sleep(0.05)
