"""``AgentConfig``: one frozen object per replicator process, from flags and environment.

Precedence, highest first: command-line flags, ``MODELREG_*`` environment variables, then the
defaults below. etcd credentials come from the environment only, never from flags (which other
users of the machine can read in the process list) and never into logs.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from modelreg.replication.etcd import parse_endpoint

_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_TUPLES = ("primary", "region_etcd")
_INTS = ("lease_ttl", "max_txn_ops", "max_txn_bytes")
_FLOATS = ("etcd_timeout", "probe_interval", "idle_flush", "status_interval")


@dataclass(frozen=True)
class AgentConfig:
    """Everything a replicator process needs."""

    primary: tuple[str, ...] = ()
    """The primary region's etcd endpoints, HOST:PORT."""
    region_etcd: tuple[str, ...] = ()
    """This region's etcd endpoints, HOST:PORT."""
    region: str = ""
    """This region's name (``a-z0-9-``, up to 32 characters): labels logs and metrics."""
    prefix: str = "/modelreg/"
    """The deployment's key prefix on the primary."""
    region_prefix: str = ""
    """The deployment's key prefix in the regional etcd; empty means the same as ``prefix``."""
    replica_id: str = field(default_factory=socket.gethostname)
    """This replica's id, unique among live replicas of the region (default: the host name,
    which is the pod name on Kubernetes). A restarted replica with the same id takes its
    leadership back at once."""
    lease_ttl: int = 10
    """Seconds the leader's lease lasts without renewal: how long a dead leader blocks."""
    etcd_timeout: float = 5.0
    """Deadline of each etcd call, seconds."""
    probe_interval: float = 1.0
    """Seconds of watch silence before the primary is probed (liveness, lag)."""
    idle_flush: float = 0.5
    """Seconds a primary revision that changed no replicated key may wait before the applied
    revision is moved past it (such revisions are batched instead of costing a Txn each)."""
    status_interval: float = 5.0
    """Seconds between renewals of the status record (``replica/status``); 0 disables it."""
    max_txn_ops: int = 128
    """The regional etcd's ``--max-txn-ops``."""
    max_txn_bytes: int = 1_000_000
    """Bytes of keys and values per regional Txn, below the regional ``--max-request-bytes``."""
    metrics_listen: str = ""
    """Prometheus endpoint HOST:PORT (port 0 picks one); empty disables it."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_format: str = "json"
    """json (one object per line) or console."""
    primary_username: str | None = field(default=None, repr=False)
    """etcd user on the primary (environment only)."""
    primary_password: str | None = field(default=None, repr=False)
    """Its password (environment only)."""
    region_username: str | None = field(default=None, repr=False)
    """etcd user on the regional cluster (environment only)."""
    region_password: str | None = field(default=None, repr=False)
    """Its password (environment only)."""

    ENV = {
        "primary": "MODELREG_PRIMARY_ETCD",
        "region_etcd": "MODELREG_REGION_ETCD",
        "region": "MODELREG_REGION",
        "prefix": "MODELREG_PREFIX",
        "region_prefix": "MODELREG_REGION_PREFIX",
        "replica_id": "MODELREG_REPLICA_ID",
        "lease_ttl": "MODELREG_REPLICA_LEASE_TTL",
        "etcd_timeout": "MODELREG_ETCD_TIMEOUT",
        "probe_interval": "MODELREG_REPLICA_PROBE_INTERVAL",
        "idle_flush": "MODELREG_REPLICA_IDLE_FLUSH",
        "status_interval": "MODELREG_REPLICA_STATUS_INTERVAL",
        "max_txn_ops": "MODELREG_REGION_MAX_TXN_OPS",
        "max_txn_bytes": "MODELREG_REGION_MAX_TXN_BYTES",
        "metrics_listen": "MODELREG_REPLICA_METRICS_LISTEN",
        "log_level": "MODELREG_LOG_LEVEL",
        "log_format": "MODELREG_LOG_FORMAT",
        "primary_username": "MODELREG_PRIMARY_ETCD_USERNAME",
        "primary_password": "MODELREG_PRIMARY_ETCD_PASSWORD",
        "region_username": "MODELREG_REGION_ETCD_USERNAME",
        "region_password": "MODELREG_REGION_ETCD_PASSWORD",
    }

    @classmethod
    def from_sources(cls, flags: Mapping[str, Any], env: Mapping[str, str]) -> AgentConfig:
        """Merges defaults, the environment and flags (``None`` flags are unset), validated."""
        config = cls().merged({n: env[v] for n, v in cls.ENV.items() if env.get(v)}, "env")
        config = config.merged({k: v for k, v in flags.items() if v is not None}, "flags")
        config.validate()
        return config

    def merged(self, values: Mapping[str, Any], source: str) -> AgentConfig:
        """A copy with ``values`` applied, converted to each field's type."""
        unknown = sorted(set(values) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            try:
                if name in _TUPLES:
                    items = value.split(",") if isinstance(value, str) else list(value)
                    converted[name] = tuple(i.strip() for i in items if i.strip())
                elif name in _INTS:
                    converted[name] = int(value)
                elif name in _FLOATS:
                    converted[name] = float(value)
                else:
                    converted[name] = str(value)
            except ValueError:
                raise ValueError(f"{source}: {name}: {value!r} is not a number") from None
        return replace(self, **converted)

    @property
    def regional_prefix(self) -> str:
        """The prefix in the regional etcd."""
        return self.region_prefix or self.prefix

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad setting."""
        for name in _TUPLES:
            endpoints = getattr(self, name)
            if not endpoints:
                raise ValueError(f"{name}: at least one etcd endpoint HOST:PORT is required")
            for endpoint in endpoints:
                try:
                    parse_endpoint(endpoint)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        if not _REGION.fullmatch(self.region):
            raise ValueError(f"region: {self.region!r} must be 1-32 characters of a-z0-9- "
                             "starting with a letter or digit")
        for name in ("prefix", "region_prefix"):
            value = getattr(self, name)
            if (value or name == "prefix") and not (value.startswith("/") and value.endswith("/")):
                raise ValueError(f"{name}: {value!r} must start and end with '/'")
        if set(self.primary) & set(self.region_etcd) and (
                self.prefix.startswith(self.regional_prefix)
                or self.regional_prefix.startswith(self.prefix)):
            raise ValueError("region_prefix: on the primary's own cluster the regional prefix "
                             "must not overlap the primary prefix (the replicator would copy "
                             "its own writes)")
        if not self.replica_id or "/" in self.replica_id:
            raise ValueError(f"replica_id: {self.replica_id!r} must be non-empty, without '/'")
        if self.lease_ttl < 2:
            raise ValueError("lease_ttl: must be at least 2 seconds")
        if min(self.etcd_timeout, self.probe_interval, self.idle_flush) <= 0 or (
                self.status_interval < 0):
            raise ValueError("etcd_timeout, probe_interval and idle_flush must be positive, "
                             "status_interval not negative")
        if self.max_txn_ops < 2 or self.max_txn_bytes < 4096:
            raise ValueError("max_txn_ops must be at least 2 and max_txn_bytes at least 4096")
        if self.metrics_listen and not self.metrics_listen.rpartition(":")[2].isdigit():
            raise ValueError(f"metrics_listen: {self.metrics_listen!r} must be HOST:PORT or ''")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log_level: {self.log_level!r} is not debug/info/warning/error")
        if self.log_format not in ("json", "console"):
            raise ValueError(f"log_format: {self.log_format!r} is not json or console")
