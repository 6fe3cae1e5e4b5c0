"""``Topology``: the regions of a deployment, which one is the primary, and where each one is.

One TOML file describes the whole deployment, and every server (and the tools that start them)
reads the same file; a server learns from ``--region`` which of the regions it is::

    primary = "us"                       # every write commits in this region's etcd

    [regions.us]
    etcd = ["10.0.1.10:2379", "10.0.1.11:2379", "10.0.1.12:2379"]
    servers = ["10.0.1.20:50051", "10.0.1.21:50051"]

    [regions.eu]
    etcd = ["10.1.1.10:2379"]
    servers = ["10.1.1.20:50051"]
    prefix = "/modelreg-eu/"             # optional: the deployment's prefix in this etcd

``etcd`` lists the region's own etcd cluster (client endpoints); ``servers`` its modelreg
servers (gRPC ``HOST:PORT``): a regional server forwards every mutation to one of the
primary's, and ``modelreg regions`` asks each region's. ``prefix`` is the deployment's key
prefix in that region's etcd (default: the server's ``--prefix``).

Pure: no I/O beyond reading the file, nothing of the registry, so the config layer can load
and check it before anything starts (:meth:`Topology.validate` names the bad key).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
"""A region's name: 1-32 characters of a-z, 0-9 and '-' (the replicator's rule)."""

_REGION_KEYS = frozenset({"etcd", "servers", "prefix"})


def _address(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host.strip("[]")) and port.isdigit() and 0 < int(port) < 65536


@dataclass(frozen=True)
class Region:
    """One region of the topology."""

    name: str
    """Its name (``eu``)."""
    etcd: tuple[str, ...]
    """Client endpoints ``HOST:PORT`` of the region's own etcd cluster."""
    servers: tuple[str, ...]
    """gRPC addresses ``HOST:PORT`` of the region's modelreg servers."""
    prefix: str = ""
    """The deployment's key prefix in the region's etcd; "" means the server's ``--prefix``."""


@dataclass(frozen=True)
class Topology:
    """The regions of a deployment and its primary; see the module docstring for the file."""

    primary: str
    """The region whose etcd every write commits to."""
    regions: tuple[Region, ...]
    """Every region, the primary included, in the order the file gives them."""
    source: str = "topology"
    """Where it was read from (the file's path), for error messages."""

    @classmethod
    def from_file(cls, path: Path) -> Topology:
        """Reads and checks a topology file.

        Raises:
            ValueError: The file is not TOML, or a key is missing or wrong (named, with the
                file, in the message).
            OSError: The file cannot be read.

        """
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "topology") -> Topology:
        """Builds a topology from parsed TOML (or an equal mapping) and checks it.

        Raises:
            ValueError: A key is missing, unknown or of the wrong type; the message names it.

        """
        unknown = sorted(set(data) - {"primary", "regions"})
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} "
                             "(a topology has `primary` and `[regions.NAME]` tables)")
        primary = data.get("primary")
        if not isinstance(primary, str):
            raise ValueError(f"{source}: primary: must name the primary region, e.g. "
                             'primary = "us"')
        tables = data.get("regions")
        if not isinstance(tables, Mapping) or not tables:
            raise ValueError(f"{source}: regions: needs at least one [regions.NAME] table")
        regions = []
        for name, table in tables.items():
            where = f"{source}: regions.{name}"
            if not isinstance(table, Mapping):
                raise ValueError(f"{where}: must be a table with etcd and servers")
            extra = sorted(set(table) - _REGION_KEYS)
            if extra:
                raise ValueError(f"{where}: unknown key(s) {', '.join(extra)} "
                                 f"(a region has {', '.join(sorted(_REGION_KEYS))})")
            lists = {}
            for key in ("etcd", "servers"):
                value = table.get(key, [])
                if isinstance(value, str):  # one address, or a comma-separated list
                    value = value.split(",")
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{where}.{key}: must be a list of HOST:PORT strings")
                lists[key] = tuple(v.strip() for v in value if v.strip())
            prefix = table.get("prefix", "")
            if not isinstance(prefix, str):
                raise ValueError(f"{where}.prefix: must be a string such as '/modelreg/'")
            regions.append(Region(str(name), lists["etcd"], lists["servers"], prefix))
        topology = cls(primary, tuple(regions), source)
        topology.validate()
        return topology

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad key (with the file it came from)."""
        if not REGION_NAME.fullmatch(self.primary):
            raise ValueError(f"{self.source}: primary: {self.primary!r} must be a region name "
                             "(1-32 characters of a-z, 0-9 and '-')")
        for region in self.regions:
            where = f"{self.source}: regions.{region.name}"
            if not REGION_NAME.fullmatch(region.name):
                raise ValueError(f"{where}: the region name must be 1-32 characters of a-z, "
                                 "0-9 and '-'")
            for key in ("etcd", "servers"):
                addresses = getattr(region, key)
                if not addresses:
                    raise ValueError(f"{where}.{key}: at least one HOST:PORT is required")
                for address in addresses:
                    if not _address(address):
                        raise ValueError(f"{where}.{key}: {address!r} must be HOST:PORT")
                if len(set(addresses)) != len(addresses):
                    raise ValueError(f"{where}.{key}: lists an address twice")
            if region.prefix and not (region.prefix.startswith("/")
                                      and region.prefix.endswith("/")):
                raise ValueError(f"{where}.prefix: {region.prefix!r} must start and end "
                                 "with '/'")
        if self.primary not in self.names:
            raise ValueError(f"{self.source}: primary: {self.primary!r} is not one of the "
                             f"regions ({', '.join(self.names)})")
        # A server address belongs to one region: a regional server forwarding to itself, or
        # two regions sharing a server, would be a loop or a lie.
        seen: dict[str, str] = {}
        for region in self.regions:
            for address in region.servers:
                if address in seen:
                    raise ValueError(f"{self.source}: regions.{region.name}.servers: "
                                     f"{address!r} is also a server of region {seen[address]}")
                seen[address] = region.name

    @property
    def names(self) -> tuple[str, ...]:
        """The region names, in file order."""
        return tuple(r.name for r in self.regions)

    def region(self, name: str) -> Region:
        """The region called ``name``; ``KeyError`` if there is none."""
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(name)

    @property
    def primary_region(self) -> Region:
        """The primary region."""
        return self.region(self.primary)
