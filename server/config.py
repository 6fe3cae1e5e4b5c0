"""``ServerConfig``: one frozen object per server process, from flags, environment and a file.

Precedence, highest first: command-line flags, ``MODELREG_*`` environment variables, the TOML
file given by ``--config`` (or ``MODELREG_CONFIG``), then the defaults below.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/modelreg``, else ``~/.local/share/modelreg``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "modelreg"


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server process needs to run."""

    listen: str = "127.0.0.1:50051"
    """gRPC listen address, HOST:PORT (port 0 picks a free one)."""
    etcd: tuple[str, ...] = ()
    """etcd endpoints HOST:PORT; empty means start an embedded etcd in ``data_dir``."""
    data_dir: Path = field(default_factory=default_data_dir)
    """Persistent directory of the embedded etcd."""
    etcd_listen: str = "127.0.0.1:0"
    """Client address HOST:PORT of the embedded etcd, loopback only (port 0 picks a free one);
    fix it to let ``modelreg serve --etcd`` or etcdctl join the same etcd."""
    prefix: str = "/modelreg/"
    """Key prefix of this deployment in etcd: many deployments or tests can share a cluster."""
    etcd_timeout: float = 5.0
    """Deadline of each etcd call, seconds; past it a request fails UNAVAILABLE."""
    metrics_listen: str = "127.0.0.1:9464"
    """Prometheus endpoint HOST:PORT; empty disables it."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_format: str = "json"
    """json (one object per line) or console (human-readable)."""
    grace: float = 5.0
    """Seconds in-flight RPCs get to finish on shutdown."""
    bookmark_interval: float = 10.0
    """Seconds an idle watch stream waits before it gets a bookmark (its current revision)."""

    ENV = {
        "listen": "MODELREG_LISTEN",
        "etcd": "MODELREG_ETCD",
        "data_dir": "MODELREG_DATA_DIR",
        "etcd_listen": "MODELREG_ETCD_LISTEN",
        "prefix": "MODELREG_PREFIX",
        "etcd_timeout": "MODELREG_ETCD_TIMEOUT",
        "metrics_listen": "MODELREG_METRICS_LISTEN",
        "log_level": "MODELREG_LOG_LEVEL",
        "log_format": "MODELREG_LOG_FORMAT",
        "grace": "MODELREG_GRACE",
        "bookmark_interval": "MODELREG_BOOKMARK_INTERVAL",
    }

    @classmethod
    def from_sources(
        cls,
        flags: Mapping[str, Any],
        env: Mapping[str, str],
        config_file: Path | None = None,
    ) -> ServerConfig:
        """Merges defaults, the file, the environment and flags (``None`` flags are unset)."""
        config = cls()
        if config_file is not None:
            config = config.merged(tomllib.loads(config_file.read_text()), source=str(config_file))
        config = config.merged(
            {name: env[var] for name, var in cls.ENV.items() if env.get(var)}, source="env"
        )
        config = config.merged({k: v for k, v in flags.items() if v is not None}, source="flags")
        config.validate()
        return config

    def merged(self, values: Mapping[str, Any], *, source: str) -> ServerConfig:
        """A copy with ``values`` applied, converted to each field's type."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name == "etcd":
                items = value.split(",") if isinstance(value, str) else list(value)
                converted[name] = tuple(i.strip() for i in items if i.strip())
            elif name == "data_dir":
                converted[name] = Path(value).expanduser()
            elif name in ("etcd_timeout", "grace", "bookmark_interval"):
                converted[name] = float(value)
            else:
                converted[name] = str(value)
        return replace(self, **converted)

    @property
    def etcd_listen_host(self) -> str:
        """The host of ``etcd_listen``, without IPv6 brackets."""
        return self.etcd_listen.rpartition(":")[0].strip("[]")

    @property
    def etcd_listen_port(self) -> int:
        """The port of ``etcd_listen`` (0: pick a free one)."""
        return int(self.etcd_listen.rpartition(":")[2])

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad setting."""
        for name, value in (("listen", self.listen), ("etcd_listen", self.etcd_listen),
                            *(("etcd", e) for e in self.etcd)):
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{name}: {value!r} must be HOST:PORT")
        try:
            loopback = ipaddress.ip_address(self.etcd_listen_host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            # The embedded etcd has no TLS and no authentication: this machine only.
            raise ValueError(f"etcd_listen: {self.etcd_listen!r} must be a loopback IP address "
                             "(such as 127.0.0.1); use a real etcd cluster for anything else")
        if self.metrics_listen and not self.metrics_listen.rpartition(":")[2].isdigit():
            raise ValueError(f"metrics_listen: {self.metrics_listen!r} must be HOST:PORT or ''")
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"prefix: {self.prefix!r} must start and end with '/'")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level: {self.log_level!r} is not debug/info/warning/error")
        if self.log_format not in ("json", "console"):
            raise ValueError(f"log_format: {self.log_format!r} is not json or console")
        if self.etcd_timeout <= 0 or self.grace < 0 or self.bookmark_interval <= 0:
            raise ValueError(
                "etcd_timeout and bookmark_interval must be positive, grace not negative")
