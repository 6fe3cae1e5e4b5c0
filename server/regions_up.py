"""``modelreg up --regions us,eu,ap``: a local multi-region cluster, one process to stop it all.

Per region: an embedded etcd (:class:`~modelreg.server.embedded_etcd.EmbeddedEtcd`, its data in
``DATA_DIR/REGION``), a modelreg server and, except in the primary (the first region named), a
replicator, all on loopback. Every inter-region link goes through a latency proxy
(:mod:`modelreg.server.latency_proxy`) held by this process: a regional replicator reaches the
primary's etcd, and a regional server the primary's server, through its region's proxies
(``--latency`` one way, 0 by default). What runs is described in
:mod:`modelreg.server.regions_plan`, and :mod:`modelreg.server.regions_cluster` starts, watches
and stops it (child processes that die with this one; see there why).

SIGINT or SIGTERM stops everything; SIGUSR1 cuts every link between regions, SIGUSR2 heals them.
Exit codes, as ``modelreg``'s table: 0 stopped by a signal, 2 bad flags, 4 cannot start here
(a port in use, the data dir held, no etcd, a child that exits or never serves: its log tail is
printed), 130 interrupted while starting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from modelreg.server import regions_plan
from modelreg.server.config import default_data_dir
from modelreg.server.embedded_etcd import EtcdNotFoundError, EtcdStartError
from modelreg.server.regions_cluster import Cluster, Options, StartError, say

__all__ = ["build_parser", "main", "options_from", "run"]

EXIT_OK, EXIT_USAGE, EXIT_LOCAL, EXIT_INTERRUPTED = 0, 2, 4, 130


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``modelreg up --regions``."""
    parser = argparse.ArgumentParser(
        prog="modelreg up --regions",
        description="Run a local multi-region cluster: per region an embedded etcd, a modelreg "
                    "server and (except the primary, the first region) a replicator, on "
                    "loopback, with a latency proxy on every link between regions. Prints "
                    "every endpoint; Ctrl-C (or SIGTERM) stops all of it.",
        epilog="SIGUSR1 cuts every link between regions (connections reset), SIGUSR2 heals "
               "them. Logs, pid files and each region's topology file are in DATA_DIR/REGION; "
               "DATA_DIR/cluster.json lists the endpoints for scripts. Exit codes: 0 stopped by "
               "a signal, 2 bad flags, 4 cannot start here, 130 interrupted while starting.",
    )
    parser.add_argument("--regions", required=True, metavar="A,B,...",
                        help="region names, the primary first (such as us,eu,ap)")
    parser.add_argument("--latency", default="0", metavar="DELAY",
                        help="one-way delay between regions: 40ms, 0.04s or 40 (ms); default 0")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"persistent directory (default {default_data_dir() / 'regions'})")
    parser.add_argument("--base-port", type=int, default=50051,
                        help="gRPC port of the first region's server, the others follow "
                             "(default 50051; 0 picks free ports)")
    parser.add_argument("--prefix", default="/modelreg/", help="key prefix (default /modelreg/)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds each process gets to stop (default 5)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="the servers' and replicators' log level (default info)")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    """Checked options from parsed flags; ``ValueError`` names the first bad one."""
    regions = regions_plan.parse_regions(args.regions)
    latency = regions_plan.parse_latency(args.latency)
    if not 0 <= args.base_port <= 65535 - len(regions):
        raise ValueError(f"--base-port: {args.base_port} leaves no room for {len(regions)} ports")
    if not args.prefix.startswith("/") or not args.prefix.endswith("/"):
        raise ValueError(f"--prefix: {args.prefix!r} must start and end with '/'")
    if args.grace < 0:
        raise ValueError("--grace: must not be negative")
    kw: dict[str, Any] = {} if args.data_dir is None else {"data_dir": args.data_dir.expanduser()}
    return Options(regions, latency, base_port=args.base_port, prefix=args.prefix,
                   grace=args.grace, log_level=args.log_level, **kw)


def main(argv: list[str]) -> int:
    """Entry point for ``modelreg up --regions ...`` (``argv`` without ``up``)."""
    args = build_parser().parse_args(argv)
    try:
        options = options_from(args)
    except ValueError as err:
        print(f"modelreg up: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(run(options))
    except (StartError, EtcdNotFoundError, EtcdStartError, OSError) as err:
        print(f"modelreg up: {err}", file=sys.stderr)
        return EXIT_LOCAL
    except KeyboardInterrupt:  # before the signal handlers are in
        return EXIT_INTERRUPTED


async def run(options: Options) -> int:
    """Runs the cluster until SIGINT or SIGTERM; a signal while starting undoes the start."""
    stop = asyncio.Event()
    starting = asyncio.current_task()
    loop = asyncio.get_running_loop()
    cluster = Cluster(options)
    running = False

    def on_signal() -> None:
        stop.set()
        if starting is not None and not running:
            starting.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGUSR1, cluster.cut)
    loop.add_signal_handler(signal.SIGUSR2, cluster.heal)
    try:
        await cluster.start()
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        say("stopped while starting")
        return EXIT_INTERRUPTED
    running = True
    names = ", ".join(f"{n} (primary)" if n == cluster.primary else n for n in options.regions)
    print(f"modelreg up: regions {names}; {options.latency * 1000:g} ms one way between "
          f"regions; data and logs in {options.data_dir}; Ctrl-C stops everything\n"
          + regions_plan.table(cluster.rows()), flush=True)
    supervisor = asyncio.create_task(cluster.supervise())
    try:
        await stop.wait()
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await cluster.stop()
    say("stopped")
    return EXIT_OK
