"""Building blocks of the ``modelreg up --regions`` tests: a cluster on free ports in a temp
dir, the parts of it that run with the primary's server only, and a scan for leftovers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import aetcd

from modelreg.server.regions_cluster import Cluster, Options

PREFIX = "/modelreg/"



def options(data_dir: Path, regions: tuple[str, ...] = ("us", "eu", "ap"),
            latency: float = 0.01) -> Options:
    """Free ports, short grace, the cluster's files in ``data_dir``."""
    return Options(regions, latency, data_dir=data_dir, base_port=0, grace=2.0,
                   log_level="info", start_timeout=60.0)


async def start_parts(cluster: Cluster) -> None:
    """Everything but the regional servers: etcds, links, topology files, replicators and the
    primary's server (SERVING); on failure, stops what started.
    """
    try:
        await cluster.start_etcds()
        await cluster.start_links()
        cluster.write_topologies()
        await cluster.start_replicators()
        cluster.spawn_server(cluster.primary)
        await cluster.wait_serving(cluster.primary)
    except BaseException:
        await cluster.stop()
        raise
    cluster.write_description()


def etcd_client(endpoint: str) -> aetcd.Client:
    """An aetcd client of ``HOST:PORT`` (use with ``async with``)."""
    host, _, port = endpoint.rpartition(":")
    return aetcd.Client(host, int(port), timeout=10)


def described_pids(data_dir: Path) -> set[int]:
    """Every pid ``cluster.json`` names: etcds, servers, replicators."""
    description = json.loads((data_dir / "cluster.json").read_text())
    return {pid for region in description["regions"].values()
            for key in ("etcd_pid", "server_pid", "replicator_pid")
            if (pid := region[key]) is not None}


def leftovers(data_dir: Path, etcd_endpoints: list[str]) -> list[str]:
    """Live processes whose command line names the data dir or one of the etcds: what a
    stopped (or killed) launcher must not leave behind.
    """
    marks = re.compile("|".join(re.escape(m) + r"(?!\d)" for m in [str(data_dir), *etcd_endpoints]))
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and marks.search(cmdline):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found
