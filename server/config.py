"""``ServerConfig``: one frozen object per server process, from flags, environment and a file.

Precedence, highest first: command-line flags, ``MODELREG_*`` environment variables, the TOML
file given by ``--config`` (or ``MODELREG_CONFIG``), then the defaults below.

The fields are the single list of settings: each one's flag (``--etcd-timeout``), environment
variable (``MODELREG_ETCD_TIMEOUT``), TOML key (``etcd_timeout``), type conversion and help
text derive from its name, type and metadata (:func:`about`), so a new setting is one field.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from modelreg.server.topology import REGION_NAME, Topology

ENV_PREFIX = "MODELREG_"
CONFIG_FILE_ENV = "MODELREG_CONFIG"
"""Names the TOML file when ``--config`` is not given."""
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/modelreg``, else ``~/.local/share/modelreg``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "modelreg"


def about(
    help: str, *, choices: tuple[str, ...] = (), external_etcd: bool = False
) -> dict[str, Any]:
    """A field's metadata: what its flag's ``--help`` says and accepts.

    Args:
        help: One line for ``--help``; the default is appended.
        choices: The only values accepted.
        external_etcd: Only for ``modelreg serve``, which may use an existing cluster;
            ``modelreg up`` always runs its own etcd.

    """
    return {"help": help, "choices": choices, "external_etcd": external_etcd}


@dataclass(frozen=True)
class ServerConfig:
    """Everything a server process needs to run; see each field's ``help``."""

    listen: str = field(default="127.0.0.1:50051", metadata=about(
        "gRPC listen address HOST:PORT (port 0 picks a free one)"))
    etcd: tuple[str, ...] = field(default=(), metadata=about(
        "etcd endpoints HOST:PORT[,HOST:PORT...]; none: run an embedded etcd in data_dir",
        external_etcd=True))
    data_dir: Path = field(default_factory=default_data_dir, metadata=about(
        "persistent directory of the embedded etcd"))
    etcd_listen: str = field(default="127.0.0.1:0", metadata=about(
        "client address of the embedded etcd, loopback HOST:PORT (port 0 picks a free one); "
        "fix it to let `modelreg serve --etcd` or etcdctl join the same etcd"))
    prefix: str = field(default="/modelreg/", metadata=about(
        "key prefix of this deployment in etcd, so many deployments or tests share a cluster"))
    etcd_timeout: float = field(default=5.0, metadata=about(
        "deadline of each etcd call in seconds; past it a request fails UNAVAILABLE"))
    metrics_listen: str = field(default="127.0.0.1:9464", metadata=about(
        "Prometheus endpoint HOST:PORT; '' disables it"))
    log_level: str = field(default="info", metadata=about("log level", choices=LOG_LEVELS))
    log_format: str = field(default="json", metadata=about(
        "json (one object per line) or console (for people)", choices=LOG_FORMATS))
    grace: float = field(default=5.0, metadata=about(
        "seconds in-flight RPCs get to finish on shutdown"))
    bookmark_interval: float = field(default=10.0, metadata=about(
        "seconds an idle watch stream waits before it gets a bookmark (its current revision)"))
    watch_queue: int = field(default=256, metadata=about(
        "messages a watch stream may fall behind before it is cut off (RESOURCE_EXHAUSTED; "
        "its client resumes from its last revision)"))
    health_interval: float = field(default=2.0, metadata=about(
        "seconds between the etcd pings that keep the gRPC health status true"))
    topology: Path | None = field(default=None, metadata=about(
        "TOML file naming the regions, the primary, each region's etcd and servers (README: "
        "Regions); none: one region, this server commits its own writes", external_etcd=True))
    region: str = field(default="", metadata=about(
        "this server's region, a name in --topology; a server outside the primary region "
        "forwards every mutation to the primary's servers", external_etcd=True))
    region_reads: str = field(default="replica", metadata=about(
        "outside the primary region, where reads come from: the region's replica, kept in its "
        "etcd (--etcd, else the topology's) by modelreg replicate; or direct: the --etcd "
        "cluster read as is (a region without an etcd of its own, served from the primary's)",
        choices=("replica", "direct"), external_etcd=True))
    forward_timeout: float = field(default=10.0, metadata=about(
        "longest a mutation forwarded to the primary may take, in seconds (less when the "
        "caller's deadline is nearer)"))
    forward_connect_timeout: float = field(default=1.0, metadata=about(
        "seconds a forwarded mutation waits for a connection to the primary's servers before "
        "it fails UNAVAILABLE (PRIMARY_UNAVAILABLE); a primary known down fails at once"))
    min_revision_wait: float = field(default=10.0, metadata=about(
        "longest a call with x-modelreg-min-revision waits for this region to apply that "
        "revision, in seconds (less when the caller's deadline is nearer)"))
    coordinator: str = field(default="auto", metadata=about(
        "run the rollout coordinator (commits or aborts rollouts; the servers running it elect "
        "one through the primary etcd): auto runs it in the primary region's servers and "
        "without a topology, on runs it in any region's, off never",
        choices=("auto", "on", "off")))
    rollout_interval: float = field(default=0.2, metadata=about(
        "seconds between the coordinator's looks at the rollouts that are preparing"))
    coordinator_lease: int = field(default=5, metadata=about(
        "seconds the coordinator's leader lease lasts: a successor takes over this long after "
        "the leader died (at once after it stopped cleanly)"))

    @staticmethod
    def env_var(name: str) -> str:
        """The environment variable of setting ``name``: ``MODELREG_`` and the name."""
        return ENV_PREFIX + name.upper()

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of setting ``name``: ``--`` and the name with dashes."""
        return "--" + name.replace("_", "-")

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
        from_env = {f.name: env[cls.env_var(f.name)] for f in fields(cls)
                    if env.get(cls.env_var(f.name))}
        config = config.merged(from_env, source="environment")
        config = config.merged({k: v for k, v in flags.items() if v is not None}, source="flags")
        config.validate()
        return config

    def merged(self, values: Mapping[str, Any], *, source: str) -> ServerConfig:
        """A copy with ``values`` applied, each converted to its field's type."""
        types = get_type_hints(type(self))
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            kind = types[name]
            try:
                if kind == tuple[str, ...]:
                    items = value.split(",") if isinstance(value, str) else list(value)
                    converted[name] = tuple(str(i).strip() for i in items if str(i).strip())
                elif kind in (Path, Path | None):
                    converted[name] = Path(value).expanduser() if str(value) else None
                elif kind in (float, int):
                    converted[name] = kind(value)
                else:
                    converted[name] = str(value)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {name}: {value!r} is not a valid "
                                 f"{getattr(kind, '__name__', kind)}") from None
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
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: {getattr(self, f.name)!r} is not one of "
                                 f"{', '.join(choices)}")
        if self.etcd_timeout <= 0 or self.grace < 0 or self.bookmark_interval <= 0:
            raise ValueError(
                "etcd_timeout and bookmark_interval must be positive, grace not negative")
        if self.watch_queue < 1 or self.health_interval <= 0:
            raise ValueError("watch_queue and health_interval must be positive")
        if self.coordinator_lease < 2:
            raise ValueError(f"coordinator_lease: {self.coordinator_lease!r} must be at least 2 "
                             "seconds (the lease is renewed every third of it)")
        for name in ("forward_timeout", "forward_connect_timeout", "min_revision_wait",
                     "rollout_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be positive")
        if self.region and not REGION_NAME.fullmatch(self.region):
            raise ValueError(f"region: {self.region!r} must be 1-32 characters of a-z, 0-9 "
                             "and '-'")
        self.load_topology()

    def load_topology(self) -> Topology | None:
        """The topology file's regions, checked against ``region``; None without a file.

        Raises:
            ValueError: The file or ``region`` is wrong (the message names the key).
            OSError: The file cannot be read.

        """
        if self.topology is None:
            return None
        topology = Topology.from_file(self.topology)
        if not self.region:
            raise ValueError(f"region: a server with --topology needs --region, one of "
                             f"{', '.join(topology.names)}")
        if self.region not in topology.names:
            raise ValueError(f"region: {self.region!r} is not a region of {topology.source} "
                             f"({', '.join(topology.names)})")
        return topology

    @property
    def region_name(self) -> str:
        """This server's region: ``region``, else ``default`` (a deployment of one region)."""
        return self.region or "default"
