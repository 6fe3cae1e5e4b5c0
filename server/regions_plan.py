"""What ``modelreg up --regions`` runs, as data: flags, command lines, topology files, table.

Pure (no process, no socket): :mod:`modelreg.server.regions_up` starts what this module
describes, and tests check the descriptions without starting anything.

Every region gets an etcd, a server and (except the primary, the first region named) a
replicator. Every address a region's processes use to reach *another* region is a latency
proxy of that region's own (:mod:`modelreg.server.latency_proxy`): region ``eu`` reaches the
primary's etcd and servers, and every other region's, through ``eu->us``, ``eu->ap`` links.
Each region therefore has its own topology file, naming the other regions by the addresses it
reaches them at, as each region's configuration would in a real deployment (where the names
differ by network path).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODELREG",
    "Endpoints",
    "parse_latency",
    "parse_regions",
    "replicator_command",
    "server_command",
    "table",
    "topology_toml",
]

MODELREG = (sys.executable, "-m", "modelreg.client.cli")
"""How a child runs ``modelreg``: this interpreter, so the children run the launcher's install."""

_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_LATENCY = re.compile(r"(?P<number>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>ms|s)?")
MAX_LATENCY = 10.0
"""Seconds: a longer one-way delay is surely a typo (40s for 40ms), and would stall etcd."""


def parse_latency(text: str) -> float:
    """``40ms``, ``0.04s`` or ``40`` (milliseconds) as seconds.

    Raises:
        ValueError: Not a number of milliseconds or a number with ``ms`` or ``s``, negative, or
            more than :data:`MAX_LATENCY` seconds; the message says what is accepted.

    """
    match = _LATENCY.fullmatch(text.strip().lower())
    accepted = "a one-way delay such as 40ms, 0.04s or 40 (milliseconds)"
    if match is None:
        raise ValueError(f"--latency: {text!r} is not {accepted}")
    value = float(match["number"])
    seconds = value if match["unit"] == "s" else value / 1000
    if not math.isfinite(seconds) or seconds > MAX_LATENCY:
        raise ValueError(f"--latency: {text!r} is more than {MAX_LATENCY:g} s; "
                         f"give {accepted}")
    return seconds


def parse_regions(text: str) -> tuple[str, ...]:
    """``us,eu,ap`` as region names, the primary first.

    Raises:
        ValueError: An empty list, a repeated name, or a name that is not 1-32 characters of
            ``a-z0-9-`` starting with a letter or digit (the replicator's rule).

    """
    names = tuple(name.strip() for name in text.split(","))
    if not any(names):
        raise ValueError("--regions: name at least one region, such as us,eu,ap")
    for name in names:
        if not _REGION.fullmatch(name):
            raise ValueError(f"--regions: {name!r} must be 1-32 characters of a-z0-9- "
                             "starting with a letter or digit")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--regions: {', '.join(repeated)} named twice")
    return names


@dataclass(frozen=True)
class Endpoints:
    """Where one region's etcd and servers are, as seen from some region."""

    etcd: tuple[str, ...]
    """etcd client endpoints HOST:PORT."""
    servers: tuple[str, ...]
    """modelreg gRPC servers HOST:PORT."""


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def topology_toml(primary: str, regions: Mapping[str, Endpoints], *, seen_from: str) -> str:
    """The topology file of region ``seen_from``: every region, at the addresses it uses.

    The format the regional server mode reads (``modelreg serve --topology``)::

        primary = "us"
        [regions.us]
        etcd = ["127.0.0.1:2379"]
        servers = ["127.0.0.1:50051"]
    """
    lines = [f"# Region {seen_from}'s view: other regions through its latency proxies.",
             f'primary = "{primary}"']
    for name, endpoints in regions.items():
        lines += ["", f"[regions.{name}]", f"etcd = {_toml_list(endpoints.etcd)}",
                  f"servers = {_toml_list(endpoints.servers)}"]
    return "\n".join(lines) + "\n"


def server_command(
    region: str, *, listen: str, metrics: str, topology: Path, prefix: str,
    grace: float, log_level: str,
) -> list[str]:
    """The one command line of a region's server (primary or regional).

    ``--region`` and ``--topology`` make it serve ``region`` of the topology, on the etcd the
    topology names for it: the primary commits to its etcd; a regional server reads its
    region's replica through the regional store and forwards mutations to the primary.
    """
    return [*MODELREG, "serve", "--listen", listen, "--metrics-listen", metrics,
            "--prefix", prefix, "--region", region, "--topology", str(topology),
            "--grace", f"{grace:g}", "--log-level", log_level, "--log-format", "json"]


def replicator_command(
    region: str, *, primary_etcd: str, region_etcd: str, metrics: str, prefix: str,
    log_level: str,
) -> list[str]:
    """The command line of a region's replicator (one replica; a restart keeps its id)."""
    return [*MODELREG, "replicate", "--primary", primary_etcd, "--region-etcd", region_etcd,
            "--region", region, "--prefix", prefix, "--replica-id", f"{region}-1",
            "--metrics-listen", metrics, "--log-level", log_level, "--log-format", "json"]


def table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    """Rows of (region, role, address, details) as aligned columns under a header."""
    header = ("REGION", "ROLE", "ADDRESS", "DETAILS")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  " + row[3]
        for row in (header, *rows)
    )
